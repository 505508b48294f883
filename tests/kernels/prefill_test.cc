// Chunked causal prefill: equals T decode steps over the growing cache, and a float64
// reference.

#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "tests/kernels/paged_kv_fixture.h"

namespace headwise::kernels {
namespace {

using testing::DensePageLens;
using testing::MaxRelError;
using testing::RandomFloats;
using testing::RandomPagedKv;
using testing::RandomPageLens;
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

// Prefill of a chunk: head h's first cached[h] tokens of `full` are the cached pages and the
// next `chunk` tokens the dense chunk. Checks every output against a float64 reference over
// exactly the tokens it may see (token_bias applies to cached tokens only: the chunk has none)
// and, without bias, against the decode step after that token was appended.
void CheckPrefillOn(const RandomPagedKv& full, const std::vector<int64_t>& cached, int group,
                    int chunk, int threads, uint32_t seed) {
  const PagedKvView full_view = full.view();
  const DType dtype = full_view.dtype;
  const int d = full_view.head_dim;
  const int kv_heads = full.num_kv_heads();
  const int num_q = kv_heads * group;
  const bool bias = full_view.token_bias != nullptr;
  const size_t elem = DTypeSize(dtype);
  std::vector<std::byte> k_new(int64_t{chunk} * kv_heads * d * elem);
  std::vector<std::byte> v_new(k_new.size());
  for (int t = 0; t < chunk; ++t) {
    for (int h = 0; h < kv_heads; ++h) {
      for (int i = 0; i < d; ++i) {
        const int64_t at = (int64_t{t} * kv_heads + h) * d + i;
        StoreFromFloat(k_new.data(), dtype, at, full.K(h, cached[h] + t, i));
        StoreFromFloat(v_new.data(), dtype, at, full.V(h, cached[h] + t, i));
      }
    }
  }
  RandomPagedKv::PrefixStorage cached_storage;
  const PagedKvView cached_view = full.PrefixView(cached, cached_storage);

  const std::vector<float> q = RandomFloats(int64_t{chunk} * num_q * d, seed);
  std::vector<float> o(q.size(), std::nanf("")), lse(int64_t{chunk} * num_q, std::nanf(""));
  PrefillArgs args;
  args.num_tokens = chunk;
  args.q = q.data();
  args.k_new = k_new.data();
  args.v_new = v_new.data();
  args.num_q_heads = num_q;
  args.o = o.data();
  args.lse = lse.data();
  args.num_threads = threads;
  ASSERT_TRUE(PrefillAttention(cached_view, args).ok());

  for (int t = 0; t < chunk; ++t) {
    // The decode step after token t was appended.
    std::vector<int64_t> step_tokens(kv_heads);
    for (int h = 0; h < kv_heads; ++h) step_tokens[h] = cached[h] + t + 1;
    RandomPagedKv::PrefixStorage storage;
    const PagedKvView step_view = full.PrefixView(step_tokens, storage);
    std::vector<float> step_o(int64_t{num_q} * d), step_lse(num_q);
    DecodeArgs step;
    step.q = q.data() + int64_t{t} * num_q * d;
    step.num_q_heads = num_q;
    step.o = step_o.data();
    step.lse = step_lse.data();
    ASSERT_TRUE(DecodeAttention(step_view, step).ok());
    for (int qh = 0; qh < num_q; ++qh) {
      const int h = qh / group;
      const float* got = o.data() + (int64_t{t} * num_q + qh) * d;
      const auto ref = ReferenceAttention(
          step.q + int64_t{qh} * d, d, 1.0 / std::sqrt(double(d)), step_tokens[h],
          [&](int64_t i, int ch) { return double{full.K(h, i, ch)}; },
          [&](int64_t i, int ch) { return double{full.V(h, i, ch)}; },
          [&](int64_t i) { return i < cached[h] ? double{full.Bias(h, i)} : 0.0; });
      EXPECT_LT(MaxRelError(got, ref.o), kRelTol) << "token " << t << " q head " << qh;
      const float got_lse = lse[int64_t{t} * num_q + qh];
      EXPECT_NEAR(got_lse, ref.lse, kRelTol * std::max(1.0, std::abs(ref.lse)));
      if (bias) continue;  // The decode step would bias the chunk's tokens too.
      std::vector<double> decode_o(step_o.begin() + qh * d, step_o.begin() + (qh + 1) * d);
      EXPECT_LT(MaxRelError(got, decode_o), kRelTol) << "prefill != decode, token " << t;
      EXPECT_NEAR(got_lse, step_lse[qh], kRelTol * std::max(1.0f, std::abs(step_lse[qh])));
    }
  }
}

void CheckPrefill(const PrefillCase& c, uint32_t seed) {
  SCOPED_TRACE(absl::StrFormat("%s d=%d g=%d H=%d P=%d S=%d T=%d threads=%d", DTypeName(c.dtype),
                               c.head_dim, c.group, c.kv_heads, c.page_tokens, c.cached, c.chunk,
                               c.threads));
  // One cache holding cached + chunk tokens; prefill sees its first `cached` tokens as pages
  // and the rest as the dense chunk.
  const RandomPagedKv full(c.dtype, c.head_dim, c.page_tokens,
                           std::vector<int64_t>(c.kv_heads, c.cached + c.chunk), seed);
  CheckPrefillOn(full, std::vector<int64_t>(c.kv_heads, c.cached), c.group, c.chunk, c.threads,
                 seed + 1);
}

// Sparse cached heads: `cached_pages[h]` pages of random counts 1..P (page_len), then the
// chunk's tokens in full pages after them.
void CheckSparsePrefill(DType dtype, int head_dim, int group, int page_tokens,
                        const std::vector<int>& cached_pages, int chunk, int threads, bool bias,
                        uint32_t seed) {
  SCOPED_TRACE(absl::StrFormat("sparse %s d=%d g=%d P=%d T=%d threads=%d%s", DTypeName(dtype),
                               head_dim, group, page_tokens, chunk, threads, bias ? " bias" : ""));
  std::vector<std::vector<int32_t>> lens = RandomPageLens(cached_pages, page_tokens, seed);
  const std::vector<int32_t> chunk_lens = DensePageLens({chunk}, page_tokens)[0];
  std::vector<int64_t> cached(lens.size(), 0);
  for (size_t h = 0; h < lens.size(); ++h) {
    for (int32_t n : lens[h]) cached[h] += n;
    lens[h].insert(lens[h].end(), chunk_lens.begin(), chunk_lens.end());
  }
  const RandomPagedKv full =
      RandomPagedKv::WithPageLens(dtype, head_dim, page_tokens, std::move(lens), seed + 1, bias);
  CheckPrefillOn(full, cached, group, chunk, threads, seed + 2);
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

TEST(PrefillAttention, SparseCachedPagesAcrossShapes) {
  uint32_t seed = 500;
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (int head_dim : {64, 128}) {
      for (int group : {1, 4, 8}) {
        for (int threads : {1, 2}) {
          CheckSparsePrefill(dtype, head_dim, group, 16, {7, 0, 3}, 9, threads, false, seed++);
        }
      }
    }
  }
}

TEST(PrefillAttention, SparseCachedPagesWithTokenBias) {
  CheckSparsePrefill(DType::kF16, 128, 4, 16, {12, 5}, 20, 2, true, 600);
  CheckSparsePrefill(DType::kBF16, 64, 8, 32, {40}, 3, 3, true, 601);
}

// The blocked kernel's edges: several query tiles (128 / g tokens) and key tiles (64 tokens),
// diagonal tiles that only some rows see, rows padded to the vector width (g = 3), head_dim 8
// (narrow vectors) and 96 (PV in pairs of vectors), cached tiles packed across pages and cut
// from inside large pages.
TEST(PrefillAttention, BlockedKernelTileEdges) {
  CheckPrefill({DType::kF16, 128, 4, 2, 16, 37, 200, 2}, 700);
  CheckPrefill({DType::kBF16, 64, 1, 2, 64, 0, 129, 3}, 701);
  CheckPrefill({DType::kF32, 8, 3, 2, 16, 5, 65, 1}, 702);
  CheckPrefill({DType::kF16, 256, 8, 1, 128, 300, 64, 2}, 703);
  CheckPrefill({DType::kF16, 96, 2, 2, 1024, 1500, 33, 2}, 704);
  CheckSparsePrefill(DType::kF16, 128, 4, 16, {30, 9}, 150, 2, true, 705);
  // The last key tile ends one token past the first row of the last query tile.
  CheckPrefill({DType::kF16, 64, 4, 1, 16, 3, 34, 1}, 706);
  CheckPrefill({DType::kBF16, 64, 2, 1, 16, 0, 2, 1}, 707);
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
