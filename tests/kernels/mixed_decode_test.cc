// Decode and prefill over heads whose pages mix precisions (f32/f16/bf16 and KIVI int8/int4/int2
// read directly by the kernel), against float64 references on fresh random data:
//   * over the values the pages hold (dtype-rounded or dequantized): f32-rounding agreement;
//   * over the values before quantization: the error each bit width allows, a bound computed
//     from the data (half a step per element, propagated through softmax);
//   * merged representatives (count-weighted means with an ln n bias, policies.md §6.0).

#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "hwy/targets.h"
#include "kernels/attention.h"
#include "tests/kernels/mixed_kv_fixture.h"
#include "tests/kernels/paged_kv_fixture.h"

namespace headwise::kernels {
namespace {

using testing::MaxRelError;
using testing::MixedPagedKv;
using testing::RandomFloats;
using testing::RandomSpecs;
using testing::ReferenceAttention;
using testing::ReferenceResult;
using Spec = MixedPagedKv::PageSpec;

constexpr PageFormat kAllFormats[] = {PageFormat::kF32,  PageFormat::kF16,  PageFormat::kBF16,
                                      PageFormat::kInt8, PageFormat::kInt4, PageFormat::kInt2};
// The kernel's f32 arithmetic against float64 over the same stored values (the worst case seen
// is 2.5e-6, on KIVI pages, whose per-group offset q . min partly cancels the scaled-code dot
// product).
constexpr double kRelTol = 1e-5;

// Float64 attention of query head qh over the valid tokens of its KV head; `original` reads the
// values before storage (quantization), otherwise the stored ones.
ReferenceResult Reference(const MixedPagedKv& kv, const float* q, int group, int qh,
                          bool original) {
  const int h = qh / group;
  const PagedKvView view = kv.view();
  const int d = view.head_dim;
  std::vector<std::pair<int32_t, int>> tokens;  // (page, row)
  for (int32_t j = kv.first_page(h); j < kv.end_page(h); ++j) {
    for (int t = 0; t < kv.page(j).len; ++t) tokens.push_back({j, t});
  }
  auto element = [&](bool value, int64_t i, int c) {
    const auto& page = kv.page(tokens[i].first);
    const std::vector<float>& src =
        original ? (value ? page.v_orig : page.k_orig) : (value ? page.v : page.k);
    return double{src[int64_t{tokens[i].second} * d + c]};
  };
  return ReferenceAttention(
      q + int64_t{qh} * d, d, 1.0 / std::sqrt(double(d)), static_cast<int64_t>(tokens.size()),
      [&](int64_t i, int c) { return element(false, i, c); },
      [&](int64_t i, int c) { return element(true, i, c); },
      [&](int64_t i) { return double{kv.bias(tokens[i].first, tokens[i].second)}; });
}

struct Outputs {
  std::vector<float> q, o, lse;
};

Outputs RunDecode(const MixedPagedKv& kv, int group, int threads, uint32_t seed) {
  const PagedKvView view = kv.view();
  const int num_q = view.num_kv_heads * group;
  Outputs out;
  out.q = RandomFloats(int64_t{num_q} * view.head_dim, seed);
  out.o.assign(out.q.size(), std::nanf(""));
  out.lse.assign(num_q, std::nanf(""));
  DecodeArgs args;
  args.q = out.q.data();
  args.num_q_heads = num_q;
  args.o = out.o.data();
  args.lse = out.lse.data();
  args.num_threads = threads;
  EXPECT_TRUE(DecodeAttention(view, args).ok());
  return out;
}

// Decode over `kv` equals float64 attention over the stored values, for every query head.
void CheckAgainstStored(const MixedPagedKv& kv, int group, int threads, uint32_t seed) {
  const Outputs out = RunDecode(kv, group, threads, seed);
  const int d = kv.view().head_dim;
  for (int qh = 0; qh < kv.num_kv_heads() * group; ++qh) {
    const ReferenceResult ref = Reference(kv, out.q.data(), group, qh, /*original=*/false);
    if (std::isinf(ref.lse)) continue;  // A head without tokens: checked by its own test.
    EXPECT_LT(MaxRelError(out.o.data() + int64_t{qh} * d, ref.o), kRelTol) << "q head " << qh;
    EXPECT_NEAR(out.lse[qh], ref.lse, kRelTol * std::max(1.0, std::abs(ref.lse)))
        << "q head " << qh;
  }
}

TEST(MixedDecode, EveryFormatHeadDimAndGroupMatchesFloat64) {
  constexpr int kP = 64;
  for (PageFormat format : kAllFormats) {
    for (int d : {8, 16, 32, 64, 96, 128, 256}) {
      for (int g : {8, 16, 32, 64}) {
        if (d % g != 0) continue;
        SCOPED_TRACE(absl::StrFormat("%s d=%d G=%d", PageFormatName(format), d, g));
        // Two heads: 3 full pages and a partial one, and a single partial page.
        const MixedPagedKv kv(
            d, kP, g, {{{format, kP}, {format, kP}, {format, kP}, {format, 37}}, {{format, 5}}},
            static_cast<uint32_t>(d * 131 + g));
        CheckAgainstStored(kv, /*group=*/4, /*threads=*/1, d + g);
      }
    }
  }
}

TEST(MixedDecode, MixedPrecisionSparseHeadsAcrossGroupsAndThreads) {
  const std::vector<PageFormat> formats(std::begin(kAllFormats), std::end(kAllFormats));
  // group 1 (MHA), 4, 6 (a 4-row and a 2-row block), 8 (one full block), 11 (8 + 2 + 1).
  for (int group : {1, 4, 6, 8, 11}) {
    for (int threads : {1, 2}) {
      for (int d : {64, 128}) {
        SCOPED_TRACE(absl::StrFormat("group=%d threads=%d d=%d", group, threads, d));
        const MixedPagedKv kv(d, 32, 16,
                              RandomSpecs(3, 13, 32, formats, /*full=*/false, group * 7 + d),
                              static_cast<uint32_t>(group * 11 + threads + d));
        CheckAgainstStored(kv, group, threads, group + threads);
      }
    }
  }
}

// Every SIMD target compiled in (AVX-512, AVX2, SSE4, scalar... as this CPU supports them),
// forced in turn: the AVX2-only machines run a different loop than the AVX-512 ones.
TEST(MixedDecode, EverySupportedSimdTargetMatchesFloat64) {
  const std::vector<PageFormat> formats(std::begin(kAllFormats), std::end(kAllFormats));
  for (int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    for (int d : {8, 96, 128}) {
      for (int g : {8, 32}) {
        if (d % g != 0) continue;
        SCOPED_TRACE(absl::StrFormat("%s d=%d G=%d", hwy::TargetName(target), d, g));
        const MixedPagedKv kv(d, 32, g, RandomSpecs(2, 9, 32, formats, /*full=*/false, d + g),
                              static_cast<uint32_t>(target % 1000 + d));
        CheckAgainstStored(kv, /*group=*/4, /*threads=*/1, d * g);
      }
    }
  }
  hwy::SetSupportedTargetsForTest(0);  // Back to the CPU's own targets.
}

TEST(MixedDecode, HeadWithoutPagesAndOneTokenPages) {
  const MixedPagedKv kv(
      128, 32, 32, {{}, {{PageFormat::kInt2, 1}, {PageFormat::kF16, 1}, {PageFormat::kInt4, 1}}},
      5);
  const Outputs out = RunDecode(kv, 4, 1, 6);
  for (int qh = 0; qh < 4; ++qh) {
    EXPECT_EQ(out.lse[qh], -std::numeric_limits<float>::infinity());
    for (int c = 0; c < 128; ++c) ASSERT_EQ(out.o[qh * 128 + c], 0.0f);
  }
  CheckAgainstStored(kv, 4, 2, 6);
}

// Half a quantization step of each element (KIVI groups: keys per channel over G tokens,
// values per token over G channels), from the original values of one page.
struct HalfSteps {
  std::vector<double> k, v;  // [P][D]
};
HalfSteps HalfStepsOf(const std::vector<float>& k, const std::vector<float>& v, int p, int d, int g,
                      int bits) {
  const double levels = (1 << bits) - 1;
  HalfSteps out{std::vector<double>(int64_t{p} * d), std::vector<double>(int64_t{p} * d)};
  for (int t0 = 0; t0 < p; t0 += g) {
    for (int c = 0; c < d; ++c) {
      double lo = k[int64_t{t0} * d + c], hi = lo;
      for (int t = t0; t < t0 + g; ++t) {
        lo = std::min<double>(lo, k[int64_t{t} * d + c]);
        hi = std::max<double>(hi, k[int64_t{t} * d + c]);
      }
      for (int t = t0; t < t0 + g; ++t) out.k[int64_t{t} * d + c] = (hi - lo) / levels / 2;
    }
  }
  for (int t = 0; t < p; ++t) {
    for (int c0 = 0; c0 < d; c0 += g) {
      double lo = v[int64_t{t} * d + c0], hi = lo;
      for (int c = c0; c < c0 + g; ++c) {
        lo = std::min<double>(lo, v[int64_t{t} * d + c]);
        hi = std::max<double>(hi, v[int64_t{t} * d + c]);
      }
      for (int c = c0; c < c0 + g; ++c) out.v[int64_t{t} * d + c] = (hi - lo) / levels / 2;
    }
  }
  return out;
}

// Quantize -> attend against float64 attention over the original values. With every logit off
// by at most eps (|q . Δk| / sqrt(d) <= sum_c |q_c| halfstep_tc / sqrt(d)) every probability is
// off by a factor in [e^-2eps, e^2eps], so |Δo_c| <= (e^{2 eps} - 1) max_t |v_tc| + max_t
// halfstep(v)_tc (plus f32 rounding). The test checks that bound per query head and channel.
TEST(MixedDecode, QuantizeThenAttendErrorWithinEachBitWidthsBound) {
  constexpr int kP = 32, kD = 128, kG = 32, kGroup = 4;
  double worst_ratio[9] = {};
  for (PageFormat format : {PageFormat::kInt8, PageFormat::kInt4, PageFormat::kInt2}) {
    const int bits = PageFormatBits(format);
    const MixedPagedKv kv(kD, kP, kG, RandomSpecs(2, 6, kP, {format}, /*full=*/false, bits),
                          100 + bits);
    const Outputs out = RunDecode(kv, kGroup, 1, 200 + bits);
    for (int qh = 0; qh < 2 * kGroup; ++qh) {
      const int h = qh / kGroup;
      const float* q = out.q.data() + qh * kD;
      double eps = 0.0;
      std::vector<double> vmax(kD, 0.0), vstep(kD, 0.0);
      for (int32_t j = kv.first_page(h); j < kv.end_page(h); ++j) {
        const auto& page = kv.page(j);
        const HalfSteps steps = HalfStepsOf(page.k_orig, page.v_orig, kP, kD, kG, bits);
        for (int t = 0; t < page.len; ++t) {
          double e = 0.0;
          for (int c = 0; c < kD; ++c) {
            e += std::abs(q[c]) * steps.k[t * kD + c];
            vmax[c] = std::max(vmax[c], std::abs(double{page.v_orig[t * kD + c]}));
            vstep[c] = std::max(vstep[c], steps.v[t * kD + c]);
          }
          eps = std::max(eps, e / std::sqrt(double{kD}));
        }
      }
      const ReferenceResult ref = Reference(kv, out.q.data(), kGroup, qh, /*original=*/true);
      for (int c = 0; c < kD; ++c) {
        const double bound = std::expm1(2 * eps) * vmax[c] + vstep[c] + 1e-5;
        const double err = std::abs(out.o[qh * kD + c] - ref.o[c]);
        ASSERT_LE(err, bound) << PageFormatName(format) << " q head " << qh << " channel " << c;
        worst_ratio[bits] = std::max(worst_ratio[bits], err / bound);
      }
    }
  }
  // The bound is loose (worst case over signs); the actual error should be well inside it.
  for (int bits : {8, 4, 2}) EXPECT_LT(worst_ratio[bits], 1.0) << bits << " bits";
}

// §6.0: n tokens with equal keys replaced by their representative (k̄ = k, v̄ = mean v, bias ln n)
// attend exactly like the n tokens; with distinct keys the representative's output is the
// closed form (Σ_rest e^z v + n e^{z̄} v̄) / (Σ_rest e^z + n e^{z̄}), and its mass never exceeds the
// group's (Jensen: n e^{q.k̄} <= Σ e^{q.k_i}), so lse(merged) <= lse(original).
TEST(MixedDecode, MergedRepresentativesCarryLogCountBias) {
  constexpr int kP = 32, kD = 64, kG = 16, kN = 7;
  for (PageFormat rep_format : {PageFormat::kF32, PageFormat::kF16, PageFormat::kInt8}) {
    for (bool equal_keys : {true, false}) {
      SCOPED_TRACE(absl::StrFormat("%s equal_keys=%d", PageFormatName(rep_format), equal_keys));
      // Head 0: an f16 page with the n merged tokens (rows 0..n-1) and the rest; an int4 page.
      MixedPagedKv original(kD, kP, kG, {{{PageFormat::kF32, kP}, {PageFormat::kInt4, 20}}}, 9);
      if (equal_keys) {
        const std::vector<float> k(original.page(0).k_orig.begin(),
                                   original.page(0).k_orig.begin() + kD);
        for (int t = 1; t < kN; ++t) {
          original.SetToken(0, t, k.data(), original.page(0).v_orig.data() + t * kD, 0.0f);
        }
      }
      // The representative: count-weighted means of the stored rows, bias ln n.
      std::vector<float> k_bar(kD), v_bar(kD);
      float bias = 0.0f;
      ASSERT_TRUE(MergeTokens(reinterpret_cast<const std::byte*>(original.page(0).k.data()),
                              reinterpret_cast<const std::byte*>(original.page(0).v.data()),
                              nullptr, kN, kD, DType::kF32,
                              reinterpret_cast<std::byte*>(k_bar.data()),
                              reinterpret_cast<std::byte*>(v_bar.data()), &bias)
                      .ok());
      EXPECT_FLOAT_EQ(bias, std::log(float{kN}));
      // Merged cache: the representative alone on its own page (rep_format), then the page's
      // other rows moved to an f32 page, then the int4 page unchanged.
      MixedPagedKv merged(
          kD, kP, kG, {{{rep_format, 1}, {PageFormat::kF32, kP - kN}, {PageFormat::kInt4, 20}}}, 9);
      merged.SetToken(0, 0, k_bar.data(), v_bar.data(), bias);
      for (int t = kN; t < kP; ++t) {
        merged.SetToken(1, t - kN, original.page(0).k.data() + t * kD,
                        original.page(0).v.data() + t * kD, 0.0f);
      }
      for (int t = 0; t < kP; ++t) {
        merged.SetToken(2, t, original.page(1).k_orig.data() + t * kD,
                        original.page(1).v_orig.data() + t * kD, 0.0f);
      }
      const Outputs got = RunDecode(merged, 4, 1, 31);
      const Outputs full = RunDecode(original, 4, 1, 31);
      for (int qh = 0; qh < 4; ++qh) {
        // The kernel equals the closed form over what the merged pages hold.
        const ReferenceResult closed = Reference(merged, got.q.data(), 4, qh, false);
        EXPECT_LT(MaxRelError(got.o.data() + qh * kD, closed.o), kRelTol);
        const ReferenceResult exact = Reference(original, full.q.data(), 4, qh, false);
        if (equal_keys && rep_format == PageFormat::kF32) {
          EXPECT_LT(MaxRelError(got.o.data() + qh * kD, exact.o), 1e-5);
          EXPECT_NEAR(got.lse[qh], exact.lse, 1e-5 * std::abs(exact.lse));
        } else if (rep_format == PageFormat::kF32) {
          EXPECT_LE(got.lse[qh], exact.lse + 1e-5);  // Jensen: the bias never over-counts.
        }
      }
    }
  }
}

// A representative merged again: counts add (policies.md §6.0 incremental update), so merging
// (rep of n1, n2 more tokens) equals merging all n1 + n2 at once, bias ln(n1 + n2).
TEST(MixedDecode, RemergedRepresentativeCountsAdd) {
  constexpr int kD = 32, kN1 = 5, kN2 = 3;
  const std::vector<float> k = RandomFloats((kN1 + kN2) * kD, 41);
  const std::vector<float> v = RandomFloats((kN1 + kN2) * kD, 42);
  auto bytes = [](const float* p) { return reinterpret_cast<const std::byte*>(p); };
  auto out = [](float* p) { return reinterpret_cast<std::byte*>(p); };
  std::vector<float> k_all(kD), v_all(kD), k_two(kD * (1 + kN2)), v_two(kD * (1 + kN2));
  float bias_all = 0.0f, bias_first = 0.0f, bias_two = 0.0f;
  ASSERT_TRUE(MergeTokens(bytes(k.data()), bytes(v.data()), nullptr, kN1 + kN2, kD, DType::kF32,
                          out(k_all.data()), out(v_all.data()), &bias_all)
                  .ok());
  ASSERT_TRUE(MergeTokens(bytes(k.data()), bytes(v.data()), nullptr, kN1, kD, DType::kF32,
                          out(k_two.data()), out(v_two.data()), &bias_first)
                  .ok());
  std::copy(k.begin() + kN1 * kD, k.end(), k_two.begin() + kD);
  std::copy(v.begin() + kN1 * kD, v.end(), v_two.begin() + kD);
  std::vector<float> counts = {static_cast<float>(std::exp(bias_first)), 1, 1, 1};
  ASSERT_TRUE(MergeTokens(bytes(k_two.data()), bytes(v_two.data()), counts.data(), 1 + kN2, kD,
                          DType::kF32, out(k_two.data()), out(v_two.data()), &bias_two)
                  .ok());
  EXPECT_NEAR(bias_two, bias_all, 1e-6);
  for (int c = 0; c < kD; ++c) {
    EXPECT_NEAR(k_two[c], k_all[c], 1e-5);
    EXPECT_NEAR(v_two[c], v_all[c], 1e-5);
  }
}

// Chunked prefill over mixed cached pages: every chunk row against float64 attention over the
// cached tokens (stored values, page_bias) plus the chunk's tokens up to its own position.
TEST(MixedPrefill, ChunkOverMixedPagesMatchesFloat64) {
  constexpr int kD = 64, kP = 16, kG = 16, kGroup = 4, kT = 5, kHeads = 2;
  const std::vector<PageFormat> formats(std::begin(kAllFormats), std::end(kAllFormats));
  MixedPagedKv kv(kD, kP, kG, RandomSpecs(kHeads, 6, kP, formats, /*full=*/false, 3), 4);
  const std::vector<float> kb = RandomFloats(kD, 8), vb = RandomFloats(kD, 9);
  kv.SetToken(kv.first_page(1), 0, kb.data(), vb.data(), std::log(3.0f));
  const std::vector<float> q = RandomFloats(kT * kHeads * kGroup * kD, 5);
  const std::vector<float> k_new = RandomFloats(kT * kHeads * kD, 6);
  const std::vector<float> v_new = RandomFloats(kT * kHeads * kD, 7);
  std::vector<float> o(q.size(), std::nanf(""));
  PrefillArgs args;
  args.num_tokens = kT;
  args.q = q.data();
  args.k_new = k_new.data();
  args.v_new = v_new.data();
  args.num_q_heads = kHeads * kGroup;
  args.o = o.data();
  args.num_threads = 2;
  ASSERT_TRUE(PrefillAttention(kv.view(), args).ok());
  for (int t = 0; t < kT; ++t) {
    for (int qh = 0; qh < kHeads * kGroup; ++qh) {
      const int h = qh / kGroup;
      std::vector<std::pair<const float*, const float*>> rows;  // (k, v) of each visible token.
      std::vector<double> biases;
      for (int32_t j = kv.first_page(h); j < kv.end_page(h); ++j) {
        for (int r = 0; r < kv.page(j).len; ++r) {
          rows.push_back({kv.page(j).k.data() + r * kD, kv.page(j).v.data() + r * kD});
          biases.push_back(kv.bias(j, r));
        }
      }
      for (int u = 0; u <= t; ++u) {
        rows.push_back(
            {k_new.data() + (u * kHeads + h) * kD, v_new.data() + (u * kHeads + h) * kD});
        biases.push_back(0.0);
      }
      const float* qrow = q.data() + (int64_t{t} * kHeads * kGroup + qh) * kD;
      const ReferenceResult ref = ReferenceAttention(
          qrow, kD, 1.0 / std::sqrt(double{kD}), static_cast<int64_t>(rows.size()),
          [&](int64_t i, int c) { return double{rows[i].first[c]}; },
          [&](int64_t i, int c) { return double{rows[i].second[c]}; },
          [&](int64_t i) { return biases[i]; });
      EXPECT_LT(MaxRelError(o.data() + (int64_t{t} * kHeads * kGroup + qh) * kD, ref.o), kRelTol)
          << "token " << t << " q head " << qh;
    }
  }
}

TEST(MixedDecode, RejectsBadViewsAndWritesNothing) {
  MixedPagedKv kv(64, 32, 16, {{{PageFormat::kInt4, 32}, {PageFormat::kF16, 3}}}, 2);
  auto status_of = [&](const PagedKvView& view) -> absl::StatusCode {
    std::vector<float> q = RandomFloats(4 * 64, 1), o(4 * 64, std::nanf(""));
    DecodeArgs args;
    args.q = q.data();
    args.num_q_heads = 4;
    args.o = o.data();
    const absl::Status s = DecodeAttention(view, args);
    if (!s.ok()) {
      for (float x : o) EXPECT_TRUE(std::isnan(x)) << "output written on error";
    }
    return s.code();
  };
  ASSERT_EQ(status_of(kv.view()), absl::StatusCode::kOk);
  std::vector<uint8_t> bad_format = {static_cast<uint8_t>(kNumPageFormats), 1};
  PagedKvView v = kv.view();
  v.page_format = bad_format.data();
  EXPECT_EQ(status_of(v), absl::StatusCode::kInvalidArgument);
  v = kv.view();
  v.format_slots[static_cast<int>(PageFormat::kInt4)] = 0;  // Slot outside its pool.
  EXPECT_EQ(status_of(v), absl::StatusCode::kInvalidArgument);
  v = kv.view();
  v.format_pool[static_cast<int>(PageFormat::kF16)] = nullptr;
  EXPECT_EQ(status_of(v), absl::StatusCode::kInvalidArgument);
  v = kv.view();
  std::vector<float> bias(1024, 0.0f);
  v.token_bias = bias.data();  // Slot-indexed bias is ambiguous across pools.
  EXPECT_EQ(status_of(v), absl::StatusCode::kInvalidArgument);
  for (int g : {4, 12, 64}) {  // Not a multiple of 8, or not dividing head_dim/page_tokens.
    v = kv.view();
    v.quant_group_size = g;
    EXPECT_EQ(status_of(v), absl::StatusCode::kInvalidArgument) << g;
  }
}

}  // namespace
}  // namespace headwise::kernels
