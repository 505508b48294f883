// Chunked causal prefill: equals T decode steps over the growing cache, and a float64
// reference.

#include <cmath>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "tests/kernels/paged_kv_fixture.h"

namespace headwise::kernels {
namespace {

using testing::MaxRelError;
using testing::RandomFloats;
using testing::RandomPagedKv;
using testing::ReferenceAttention;

constexpr double kRelTol = 1e-5;

struct PrefillCase {
  DType dtype;
  int head_dim;
  int group;
  int kv_heads;
  int page_tokens;
  int64_t cached;  // Tokens already in the cache (every head).
  int chunk;       // T new tokens.
  int threads;
};

void CheckPrefill(const PrefillCase& c, uint32_t seed) {
  SCOPED_TRACE(absl::StrFormat("%s d=%d g=%d H=%d P=%d S=%d T=%d threads=%d", DTypeName(c.dtype),
                               c.head_dim, c.group, c.kv_heads, c.page_tokens, c.cached, c.chunk,
                               c.threads));
  const int d = c.head_dim;
  const int num_q = c.kv_heads * c.group;
  // One cache holding cached + chunk tokens; prefill sees its first `cached` tokens as pages
  // and the rest as the dense chunk.
  RandomPagedKv full(c.dtype, d, c.page_tokens,
                     std::vector<int64_t>(c.kv_heads, c.cached + c.chunk), seed);
  const size_t elem = DTypeSize(c.dtype);
  std::vector<std::byte> k_new(int64_t{c.chunk} * c.kv_heads * d * elem);
  std::vector<std::byte> v_new(k_new.size());
  for (int t = 0; t < c.chunk; ++t) {
    for (int h = 0; h < c.kv_heads; ++h) {
      for (int i = 0; i < d; ++i) {
        const int64_t at = (int64_t{t} * c.kv_heads + h) * d + i;
        StoreFromFloat(k_new.data(), c.dtype, at, full.K(h, c.cached + t, i));
        StoreFromFloat(v_new.data(), c.dtype, at, full.V(h, c.cached + t, i));
      }
    }
  }
  RandomPagedKv::PrefixStorage cached_storage;
  const PagedKvView cached_view =
      full.PrefixView(std::vector<int64_t>(c.kv_heads, c.cached), cached_storage);

  const std::vector<float> q = RandomFloats(int64_t{c.chunk} * num_q * d, seed + 1);
  std::vector<float> o(q.size(), std::nanf("")), lse(int64_t{c.chunk} * num_q, std::nanf(""));
  PrefillArgs args;
  args.num_tokens = c.chunk;
  args.q = q.data();
  args.k_new = k_new.data();
  args.v_new = v_new.data();
  args.num_q_heads = num_q;
  args.o = o.data();
  args.lse = lse.data();
  args.num_threads = c.threads;
  ASSERT_TRUE(PrefillAttention(cached_view, args).ok());

  for (int t = 0; t < c.chunk; ++t) {
    // The decode step after token t was appended.
    RandomPagedKv::PrefixStorage storage;
    const PagedKvView step_view =
        full.PrefixView(std::vector<int64_t>(c.kv_heads, c.cached + t + 1), storage);
    std::vector<float> step_o(int64_t{num_q} * d), step_lse(num_q);
    DecodeArgs step;
    step.q = q.data() + int64_t{t} * num_q * d;
    step.num_q_heads = num_q;
    step.o = step_o.data();
    step.lse = step_lse.data();
    ASSERT_TRUE(DecodeAttention(step_view, step).ok());
    for (int qh = 0; qh < num_q; ++qh) {
      const int h = qh / c.group;
      const float* got = o.data() + (int64_t{t} * num_q + qh) * d;
      const auto ref = ReferenceAttention(
          step.q + int64_t{qh} * d, d, 1.0 / std::sqrt(double(d)), c.cached + t + 1,
          [&](int64_t i, int ch) { return double{full.K(h, i, ch)}; },
          [&](int64_t i, int ch) { return double{full.V(h, i, ch)}; }, [](int64_t) { return 0.0; });
      EXPECT_LT(MaxRelError(got, ref.o), kRelTol) << "token " << t << " q head " << qh;
      std::vector<double> decode_o(step_o.begin() + qh * d, step_o.begin() + (qh + 1) * d);
      EXPECT_LT(MaxRelError(got, decode_o), kRelTol) << "prefill != decode, token " << t;
      EXPECT_NEAR(lse[int64_t{t} * num_q + qh], step_lse[qh],
                  kRelTol * std::max(1.0f, std::abs(step_lse[qh])));
    }
  }
}

TEST(PrefillAttention, EqualsDecodeStepsAcrossShapes) {
  uint32_t seed = 100;
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (int head_dim : {8, 64, 128, 256}) {
      for (int group : {1, 2, 4, 8}) {
        CheckPrefill({dtype, head_dim, group, 2, 16, 37, 9, 2}, seed++);
      }
    }
  }
}

TEST(PrefillAttention, EmptyCacheSingleToken) {
  CheckPrefill({DType::kF16, 128, 4, 2, 16, 0, 1, 1}, 1);
}

TEST(PrefillAttention, EmptyCacheWholeChunk) {
  CheckPrefill({DType::kBF16, 64, 4, 2, 32, 0, 70, 2}, 2);
}

TEST(PrefillAttention, ChunkLongerThanAPageOverFullPages) {
  CheckPrefill({DType::kF16, 128, 4, 2, 16, 64, 40, 3}, 3);
}

TEST(PrefillAttention, RejectsBadArguments) {
  RandomPagedKv kv(DType::kF16, 64, 16, {20, 20}, 1);
  const std::vector<float> q = RandomFloats(2 * 4 * 64, 2);
  std::vector<std::byte> kn(2 * 2 * 64 * 2), vn(kn.size());
  std::vector<float> o(q.size());
  PrefillArgs args;
  args.num_tokens = 2;
  args.q = q.data();
  args.k_new = kn.data();
  args.v_new = vn.data();
  args.num_q_heads = 4;
  args.o = o.data();
  ASSERT_TRUE(PrefillAttention(kv.view(), args).ok());
  PrefillArgs bad = args;
  bad.num_tokens = 0;
  EXPECT_EQ(PrefillAttention(kv.view(), bad).code(), absl::StatusCode::kInvalidArgument);
  bad = args;
  bad.k_new = nullptr;
  EXPECT_EQ(PrefillAttention(kv.view(), bad).code(), absl::StatusCode::kInvalidArgument);
  bad = args;
  bad.num_q_heads = 5;
  EXPECT_EQ(PrefillAttention(kv.view(), bad).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace headwise::kernels
