// ComputeKeyBounds: exact per-channel min/max of the stored keys of the first `tokens` rows.
#include <algorithm>
#include <cstddef>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "cachesvc/base/dtype.h"
#include "gtest/gtest.h"
#include "kernels/attention.h"

namespace headwise::kernels {
namespace {

constexpr DType kDTypes[] = {DType::kF32, DType::kF16, DType::kBF16};

// Rows [0, tokens) of K hold nonzero random keys; the rest of K and all of V hold values far
// outside their range, so reading a row it should not changes the result.
std::vector<std::byte> MakePage(std::mt19937& rng, DType dtype, int p, int tokens, int d) {
  std::vector<std::byte> page(static_cast<size_t>(PageBytes(p, d, dtype)));
  std::uniform_real_distribution<float> mag(0.05f, 4.0f);
  std::bernoulli_distribution sign(0.5);
  for (int t = 0; t < 2 * p; ++t) {
    for (int c = 0; c < d; ++c) {
      float x = mag(rng) * (sign(rng) ? 1.0f : -1.0f);
      if (t >= tokens) x = (t + c) % 2 == 0 ? 1000.0f : -1000.0f;
      StoreFromFloat(page.data(), dtype, static_cast<size_t>(t) * d + c, x);
    }
  }
  return page;
}

TEST(KeyBoundsTest, EqualsMinMaxOfStoredKeys) {
  std::mt19937 rng(424242);
  for (DType dtype : kDTypes) {
    for (int d : {8, 16, 32, 64, 96, 128, 256}) {
      for (int p : {16, 64}) {
        for (int tokens : {1, 2, p - 3, p}) {
          SCOPED_TRACE(testing::Message()
                       << DTypeName(dtype) << " d=" << d << " p=" << p << " tokens=" << tokens);
          const auto page = MakePage(rng, dtype, p, tokens, d);
          std::vector<float> kmin(d, 0.0f);
          std::vector<float> kmax(d, 0.0f);
          ASSERT_TRUE(
              ComputeKeyBounds(page.data(), dtype, p, tokens, d, kmin.data(), kmax.data()).ok());
          for (int c = 0; c < d; ++c) {
            float lo = LoadAsFloat(page.data(), dtype, c);
            float hi = lo;
            for (int t = 1; t < tokens; ++t) {
              const float x = LoadAsFloat(page.data(), dtype, static_cast<size_t>(t) * d + c);
              lo = std::min(lo, x);
              hi = std::max(hi, x);
            }
            ASSERT_EQ(kmin[c], lo) << "channel " << c;
            ASSERT_EQ(kmax[c], hi) << "channel " << c;
          }
        }
      }
    }
  }
}

TEST(KeyBoundsTest, BadArgumentsAreInvalid) {
  std::mt19937 rng(1);
  const auto page = MakePage(rng, DType::kBF16, 16, 16, 64);
  std::vector<float> kmin(256);
  std::vector<float> kmax(256);
  constexpr auto kBad = absl::StatusCode::kInvalidArgument;
  const auto bounds = [&](const std::byte* pg, DType dtype, int p, int tokens, int d, float* lo,
                          float* hi) {
    return ComputeKeyBounds(pg, dtype, p, tokens, d, lo, hi).code();
  };
  EXPECT_EQ(bounds(page.data(), DType::kBF16, 16, 16, 64, kmin.data(), kmax.data()),
            absl::StatusCode::kOk);
  EXPECT_EQ(bounds(nullptr, DType::kBF16, 16, 16, 64, kmin.data(), kmax.data()), kBad);
  EXPECT_EQ(bounds(page.data(), DType::kBF16, 16, 16, 64, nullptr, kmax.data()), kBad);
  EXPECT_EQ(bounds(page.data(), DType::kBF16, 16, 16, 64, kmin.data(), nullptr), kBad);
  EXPECT_EQ(bounds(page.data(), static_cast<DType>(9), 16, 16, 64, kmin.data(), kmax.data()), kBad);
  EXPECT_EQ(bounds(page.data(), DType::kBF16, 16, 0, 64, kmin.data(), kmax.data()), kBad);
  EXPECT_EQ(bounds(page.data(), DType::kBF16, 16, -1, 64, kmin.data(), kmax.data()), kBad);
  EXPECT_EQ(bounds(page.data(), DType::kBF16, 16, 17, 64, kmin.data(), kmax.data()), kBad);
  EXPECT_EQ(bounds(page.data(), DType::kBF16, 0, 0, 64, kmin.data(), kmax.data()), kBad);
  EXPECT_EQ(bounds(page.data(), DType::kBF16, 16, 16, 12, kmin.data(), kmax.data()), kBad);
  EXPECT_EQ(bounds(page.data(), DType::kBF16, 16, 16, 0, kmin.data(), kmax.data()), kBad);
  EXPECT_EQ(bounds(page.data(), DType::kBF16, 16, 16, 512, kmin.data(), kmax.data()), kBad);
}

}  // namespace
}  // namespace headwise::kernels
