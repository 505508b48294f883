// QuantizedPageBytes / QuantizePage / DequantizePage against a float64 reference built from the
// stored (dtype-rounded) values, plus a reader of the documented byte layout.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "cachesvc/base/dtype.h"
#include "gtest/gtest.h"
#include "kernels/attention.h"

namespace headwise::kernels {
namespace {

constexpr DType kDTypes[] = {DType::kF32, DType::kF16, DType::kBF16};

// Upper bound of |round_to_dtype(z) - z| for a normal-range result y = round_to_dtype(z).
double DTypeRounding(DType dtype, double y) {
  switch (dtype) {
    case DType::kF32:
      return std::abs(y) * std::ldexp(1.0, -24);
    case DType::kF16:
      return std::abs(y) * std::ldexp(1.0, -11) + std::ldexp(1.0, -25);
    case DType::kBF16:
      return std::abs(y) * std::ldexp(1.0, -8);
  }
  return 0.0;
}

// A page of nonzero random values in [-2, -0.01] U [0.01, 2]. Keys get outlier channels
// (every 7th channel x 8) so that per-channel grouping matters.
std::vector<std::byte> RandomPage(std::mt19937& rng, DType dtype, int p, int d) {
  std::vector<std::byte> page(static_cast<size_t>(PageBytes(p, d, dtype)));
  std::uniform_real_distribution<float> mag(0.01f, 2.0f);
  std::bernoulli_distribution sign(0.5);
  for (int block = 0; block < 2; ++block) {
    for (int t = 0; t < p; ++t) {
      for (int c = 0; c < d; ++c) {
        float x = mag(rng) * (sign(rng) ? 1.0f : -1.0f);
        if (block == 0 && c % 7 == 3) x *= 8.0f;
        StoreFromFloat(page.data(), dtype, (static_cast<size_t>(block) * p + t) * d + c, x);
      }
    }
  }
  return page;
}

double Stored(const std::vector<std::byte>& page, DType dtype, size_t i) {
  return LoadAsFloat(page.data(), dtype, i);
}

// Reads the documented layout (docs/kernels.md, "Quantized page layout").
struct LayoutReader {
  const std::byte* q;
  int p, d, bits, g;

  int64_t CodeBytes() const { return int64_t{p} * d * bits / 8; }
  int64_t KParams() const { return int64_t{p / g} * d * 4; }
  int64_t VParams() const { return int64_t{p} * (d / g) * 4; }

  int Code(int block, int t, int c) const {
    const int64_t i = int64_t{t} * d + c;
    const uint8_t byte = static_cast<uint8_t>(q[block * CodeBytes() + i * bits / 8]);
    return (byte >> ((i * bits) % 8)) & ((1 << bits) - 1);
  }
  float F32(int64_t offset) const {
    float f;
    std::memcpy(&f, q + offset, sizeof(f));
    return f;
  }
  float KScale(int t, int c) const { return F32(2 * CodeBytes() + (int64_t{t / g} * d + c) * 4); }
  float KMin(int t, int c) const {
    return F32(2 * CodeBytes() + KParams() + (int64_t{t / g} * d + c) * 4);
  }
  float VScale(int t, int c) const {
    return F32(2 * CodeBytes() + 2 * KParams() + (int64_t{t} * (d / g) + c / g) * 4);
  }
  float VMin(int t, int c) const {
    return F32(2 * CodeBytes() + 2 * KParams() + VParams() + (int64_t{t} * (d / g) + c / g) * 4);
  }
};

// Checks one quantize -> dequantize round trip of `page` against the float64 reference.
void CheckRoundTrip(const std::vector<std::byte>& page, DType dtype, int p, int d, int bits,
                    int g) {
  const QuantParams params{bits, g};
  const int64_t bytes = QuantizedPageBytes(p, d, params);
  ASSERT_EQ(bytes,
            2 * int64_t{p} * d * bits / 8 + 8 * int64_t{p / g} * d + 8 * int64_t{p} * (d / g));
  std::vector<std::byte> q(static_cast<size_t>(bytes));
  ASSERT_TRUE(QuantizePage(page.data(), dtype, p, d, params, q.data()).ok());
  std::vector<std::byte> out(page.size());
  ASSERT_TRUE(DequantizePage(q.data(), p, d, params, dtype, out.data()).ok());

  const LayoutReader layout{q.data(), p, d, bits, g};
  const double levels = (1 << bits) - 1;
  for (int block = 0; block < 2; ++block) {
    for (int t = 0; t < p; ++t) {
      for (int c = 0; c < d; ++c) {
        // The group of (t, c): K groups run along tokens, V groups along channels.
        double lo = INFINITY;
        double hi = -INFINITY;
        if (block == 0) {
          for (int u = t / g * g; u < t / g * g + g; ++u) {
            const double x = Stored(page, dtype, static_cast<size_t>(u) * d + c);
            lo = std::min(lo, x);
            hi = std::max(hi, x);
          }
        } else {
          for (int e = c / g * g; e < c / g * g + g; ++e) {
            const double x = Stored(page, dtype, (static_cast<size_t>(p) + t) * d + e);
            lo = std::min(lo, x);
            hi = std::max(hi, x);
          }
        }
        const double scale = (hi - lo) / levels;
        const float stored_min = block == 0 ? layout.KMin(t, c) : layout.VMin(t, c);
        const float stored_scale = block == 0 ? layout.KScale(t, c) : layout.VScale(t, c);
        ASSERT_EQ(stored_min, static_cast<float>(lo))
            << "block " << block << " t " << t << " c " << c;
        ASSERT_NEAR(stored_scale, scale, scale * 1e-6) << "block " << block << " t " << t;

        const size_t i = (static_cast<size_t>(block) * p + t) * d + c;
        const double x = Stored(page, dtype, i);
        // f32 slack for computing (x - min) / scale and code * scale + min.
        const double f32_slack = 1e-4 * scale + 4e-7 * std::max(std::abs(lo), std::abs(hi));
        // The code, read through the documented layout, reconstructs x within scale / 2.
        const int code = layout.Code(block, t, c);
        const double from_code = code * double{stored_scale} + stored_min;
        ASSERT_LE(std::abs(x - from_code), scale / 2 + f32_slack)
            << "block " << block << " t " << t << " c " << c << " code " << code;
        // The dequantized page adds only the output dtype's rounding.
        const double y = Stored(out, dtype, i);
        ASSERT_LE(std::abs(x - y), scale / 2 + DTypeRounding(dtype, y) + f32_slack)
            << "block " << block << " t " << t << " c " << c << " x " << x << " y " << y
            << " scale " << scale;
      }
    }
  }
}

TEST(QuantizeTest, RoundTripWithinHalfStep) {
  std::mt19937 rng(20240611);
  int cases = 0;
  for (DType dtype : kDTypes) {
    for (int d : {8, 64, 128, 256}) {
      for (int p : {16, 64}) {
        for (int bits : {2, 4, 8}) {
          for (int g : {4, 8, 16, 32, 64}) {
            if (p % g != 0 || d % g != 0) continue;
            SCOPED_TRACE(testing::Message() << DTypeName(dtype) << " d=" << d << " p=" << p
                                            << " bits=" << bits << " g=" << g);
            const auto page = RandomPage(rng, dtype, p, d);
            CheckRoundTrip(page, dtype, p, d, bits, g);
            if (HasFatalFailure()) return;
            ++cases;
          }
        }
      }
    }
  }
  EXPECT_GT(cases, 100);
}

// Other supported head dims (16, 32, 96) and a tiny page.
TEST(QuantizeTest, OtherShapes) {
  std::mt19937 rng(77);
  for (DType dtype : kDTypes) {
    for (auto [d, p, g] :
         {std::tuple{16, 16, 16}, {32, 8, 8}, {96, 32, 32}, {96, 16, 16}, {8, 1, 1}, {8, 2, 2}}) {
      for (int bits : {2, 4, 8}) {
        SCOPED_TRACE(testing::Message() << DTypeName(dtype) << " d=" << d << " p=" << p
                                        << " bits=" << bits << " g=" << g);
        CheckRoundTrip(RandomPage(rng, dtype, p, d), dtype, p, d, bits, g);
        if (HasFatalFailure()) return;
      }
    }
  }
}

// A constant group has scale 0 and decodes to its value exactly; mixed with ordinary groups.
TEST(QuantizeTest, ConstantGroupsDecodeExactly) {
  std::mt19937 rng(5);
  constexpr int kP = 32;
  constexpr int kD = 64;
  constexpr int kG = 16;
  for (DType dtype : kDTypes) {
    for (int bits : {2, 4, 8}) {
      auto page = RandomPage(rng, dtype, kP, kD);
      // K: channel 5 constant over tokens 16..31. V: token 7, channels 32..47 constant.
      for (int t = 16; t < 32; ++t) StoreFromFloat(page.data(), dtype, t * kD + 5, -1.375f);
      for (int c = 32; c < 48; ++c) StoreFromFloat(page.data(), dtype, (kP + 7) * kD + c, 0.71f);
      const QuantParams params{bits, kG};
      std::vector<std::byte> q(static_cast<size_t>(QuantizedPageBytes(kP, kD, params)));
      ASSERT_TRUE(QuantizePage(page.data(), dtype, kP, kD, params, q.data()).ok());
      std::vector<std::byte> out(page.size());
      ASSERT_TRUE(DequantizePage(q.data(), kP, kD, params, dtype, out.data()).ok());
      const LayoutReader layout{q.data(), kP, kD, bits, kG};
      EXPECT_EQ(layout.KScale(16, 5), 0.0f);
      EXPECT_EQ(layout.VScale(7, 32), 0.0f);
      for (int t = 16; t < 32; ++t) {
        EXPECT_EQ(Stored(out, dtype, t * kD + 5), Stored(page, dtype, t * kD + 5));
      }
      for (int c = 32; c < 48; ++c) {
        const size_t i = (kP + 7) * kD + c;
        EXPECT_EQ(Stored(out, dtype, i), Stored(page, dtype, i));
      }
      CheckRoundTrip(page, dtype, kP, kD, bits, kG);
    }
  }
}

// Group extremes are codes 0 and 2^b - 1, so the minimum is reproduced exactly.
TEST(QuantizeTest, GroupMinimumIsExact) {
  std::mt19937 rng(11);
  constexpr int kP = 16;
  constexpr int kD = 8;
  for (DType dtype : kDTypes) {
    const auto page = RandomPage(rng, dtype, kP, kD);
    const QuantParams params{4, 8};
    std::vector<std::byte> q(static_cast<size_t>(QuantizedPageBytes(kP, kD, params)));
    ASSERT_TRUE(QuantizePage(page.data(), dtype, kP, kD, params, q.data()).ok());
    std::vector<std::byte> out(page.size());
    ASSERT_TRUE(DequantizePage(q.data(), kP, kD, params, dtype, out.data()).ok());
    for (int t = 0; t < kP; ++t) {
      // V group (t, 0) spans the whole row.
      double lo = INFINITY;
      int arg = 0;
      for (int c = 0; c < kD; ++c) {
        const double x = Stored(page, dtype, (kP + t) * kD + c);
        if (x < lo) {
          lo = x;
          arg = c;
        }
      }
      EXPECT_EQ(Stored(out, dtype, (kP + t) * kD + arg), lo);
    }
  }
}

TEST(QuantizeTest, NonFiniteInputIsRejected) {
  std::mt19937 rng(3);
  constexpr int kP = 16;
  constexpr int kD = 16;
  const QuantParams params{4, 16};
  std::vector<std::byte> q(static_cast<size_t>(QuantizedPageBytes(kP, kD, params)));
  for (float bad : {NAN, INFINITY, -INFINITY}) {
    for (size_t where : {size_t{3}, size_t{kP * kD + 200}}) {
      auto page = RandomPage(rng, DType::kF32, kP, kD);
      StoreFromFloat(page.data(), DType::kF32, where, bad);
      EXPECT_EQ(QuantizePage(page.data(), DType::kF32, kP, kD, params, q.data()).code(),
                absl::StatusCode::kInvalidArgument);
    }
  }
}

TEST(QuantizeTest, BadArgumentsAreInvalid) {
  std::mt19937 rng(9);
  const auto page = RandomPage(rng, DType::kF16, 64, 64);
  std::vector<std::byte> q(1 << 20);
  std::vector<std::byte> out(page.size());
  const auto quantize = [&](const std::byte* in, DType dtype, int p, int d, QuantParams params,
                            std::byte* dst) {
    return QuantizePage(in, dtype, p, d, params, dst).code();
  };
  const auto dequantize = [&](const std::byte* in, int p, int d, QuantParams params, DType dtype,
                              std::byte* dst) {
    return DequantizePage(in, p, d, params, dtype, dst).code();
  };
  constexpr auto kBad = absl::StatusCode::kInvalidArgument;
  const QuantParams ok{4, 32};
  EXPECT_EQ(quantize(page.data(), DType::kF16, 64, 64, ok, q.data()), absl::StatusCode::kOk);
  EXPECT_EQ(dequantize(q.data(), 64, 64, ok, DType::kF16, out.data()), absl::StatusCode::kOk);

  EXPECT_EQ(quantize(nullptr, DType::kF16, 64, 64, ok, q.data()), kBad);
  EXPECT_EQ(quantize(page.data(), DType::kF16, 64, 64, ok, nullptr), kBad);
  EXPECT_EQ(dequantize(nullptr, 64, 64, ok, DType::kF16, out.data()), kBad);
  EXPECT_EQ(dequantize(q.data(), 64, 64, ok, DType::kF16, nullptr), kBad);
  const DType bad_dtype = static_cast<DType>(7);
  EXPECT_EQ(quantize(page.data(), bad_dtype, 64, 64, ok, q.data()), kBad);
  EXPECT_EQ(dequantize(q.data(), 64, 64, ok, bad_dtype, out.data()), kBad);

  struct Shape {
    int p, d, bits, g;
  };
  for (const Shape& s :
       {Shape{64, 64, 3, 32}, Shape{64, 64, 0, 32}, Shape{64, 64, 16, 32}, Shape{64, 64, 1, 32},
        Shape{64, 64, 4, 0}, Shape{64, 64, 4, -32}, Shape{64, 64, 4, 24}, Shape{64, 64, 4, 128},
        Shape{8, 64, 4, 16}, Shape{64, 8, 4, 16}, Shape{64, 12, 4, 4}, Shape{64, 0, 4, 4},
        Shape{64, 512, 4, 32}, Shape{0, 64, 4, 32}, Shape{-64, 64, 4, 32}}) {
    SCOPED_TRACE(testing::Message()
                 << "p=" << s.p << " d=" << s.d << " bits=" << s.bits << " g=" << s.g);
    const QuantParams params{s.bits, s.g};
    EXPECT_EQ(QuantizedPageBytes(s.p, s.d, params), 0);
    EXPECT_EQ(quantize(page.data(), DType::kF16, s.p, s.d, params, q.data()), kBad);
    EXPECT_EQ(dequantize(q.data(), s.p, s.d, params, DType::kF16, out.data()), kBad);
  }
}

}  // namespace
}  // namespace headwise::kernels
