// Decode attention against a float64 reference on random paged caches.

#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "tests/kernels/paged_kv_fixture.h"

namespace headwise::kernels {
namespace {

using testing::MaxRelError;
using testing::RandomFloats;
using testing::RandomPagedKv;
using testing::RandomPageLens;
using testing::ReferenceAttention;

constexpr double kRelTol = 1e-5;

struct DecodeCase {
  DType dtype;
  int head_dim;
  int group;
  int kv_heads;
  int page_tokens;
  std::vector<int64_t> tokens;  // Per KV head (dense heads); the size must equal kv_heads.
  int threads;
  bool bias;
  // When not empty: sparse heads instead, sparse_pages[h] pages of random counts 1..P each
  // (described with page_len); `tokens` is then ignored.
  std::vector<int> sparse_pages = {};
};

std::string CaseName(const DecodeCase& c) {
  return absl::StrFormat("%s_d%d_g%d_h%d_p%d_t%d%s%s", DTypeName(c.dtype), c.head_dim, c.group,
                         c.kv_heads, c.page_tokens, c.threads, c.bias ? "_bias" : "",
                         c.sparse_pages.empty() ? "" : "_sparse");
}

// Runs decode on `view`, whose page j' is page source_page[j'] of kv.view() (all of them, or a
// page selector's subset), and checks o, lse, token_probs and page_mass against float64
// attention over exactly the tokens of the pages the view names.
void CheckDecodeOn(const RandomPagedKv& kv, const PagedKvView& view,
                   const std::vector<int32_t>& source_page, int group, int threads, uint32_t seed) {
  const int d = view.head_dim;
  const int p_tokens = view.page_tokens;
  const int num_q = view.num_kv_heads * group;
  const int64_t pages = view.indptr[view.num_kv_heads];
  const std::vector<float> q = RandomFloats(int64_t{num_q} * d, seed);
  std::vector<float> o(q.size(), std::nanf("")), lse(num_q, std::nanf(""));
  std::vector<float> probs(pages * p_tokens, std::nanf("")), mass(pages, std::nanf(""));
  DecodeArgs args;
  args.q = q.data();
  args.num_q_heads = num_q;
  args.o = o.data();
  args.lse = lse.data();
  args.token_probs = probs.data();
  args.page_mass = mass.data();
  args.num_threads = threads;
  ASSERT_TRUE(DecodeAttention(view, args).ok());

  for (int h = 0; h < view.num_kv_heads; ++h) {
    // Head-token indices of the view's tokens of head h, in view order.
    std::vector<int64_t> ids;
    for (int32_t j = view.indptr[h]; j < view.indptr[h + 1]; ++j) {
      for (int t = 0; t < kv.page_len(source_page[j]); ++t) {
        ids.push_back(kv.page_first_token(source_page[j]) + t);
      }
    }
    ASSERT_EQ(static_cast<int64_t>(ids.size()), view.HeadTokens(h));
    std::vector<double> expected(ids.size(), 0.0);  // Mean probability over the group.
    for (int r = 0; r < group; ++r) {
      const int qh = h * group + r;
      const auto ref = ReferenceAttention(
          q.data() + int64_t{qh} * d, d, 1.0 / std::sqrt(double(d)), ids.size(),
          [&](int64_t i, int c) { return double{kv.K(h, ids[i], c)}; },
          [&](int64_t i, int c) { return double{kv.V(h, ids[i], c)}; },
          [&](int64_t i) { return double{kv.Bias(h, ids[i])}; });
      if (ids.empty()) {
        EXPECT_EQ(lse[qh], -std::numeric_limits<float>::infinity());
        for (int c = 0; c < d; ++c) EXPECT_EQ(o[int64_t{qh} * d + c], 0.0f);
        continue;
      }
      EXPECT_LT(MaxRelError(o.data() + int64_t{qh} * d, ref.o), kRelTol) << "q head " << qh;
      EXPECT_NEAR(lse[qh], ref.lse, kRelTol * std::max(1.0, std::abs(ref.lse))) << "q head " << qh;
      for (size_t i = 0; i < ids.size(); ++i) expected[i] += ref.probs[i] / group;
    }
    // token_probs: the group mean on valid rows, exactly 0 past them; page_mass: their sum.
    size_t i = 0;
    for (int32_t j = view.indptr[h]; j < view.indptr[h + 1]; ++j) {
      double want = 0.0;
      for (int t = 0; t < p_tokens; ++t) {
        const float got = probs[int64_t{j} * p_tokens + t];
        if (t < kv.page_len(source_page[j])) {
          ASSERT_NEAR(got, expected[i], 1e-6) << "head " << h << " page " << j << " row " << t;
          want += expected[i++];
        } else {
          ASSERT_EQ(got, 0.0f) << "past the valid rows: head " << h << " page " << j;
        }
      }
      EXPECT_NEAR(mass[j], want, 1e-5) << "head " << h << " page " << j;
    }
  }
}

RandomPagedKv MakeKv(const DecodeCase& c, uint32_t seed) {
  if (c.sparse_pages.empty()) {
    return RandomPagedKv(c.dtype, c.head_dim, c.page_tokens, c.tokens, seed, c.bias);
  }
  return RandomPagedKv::WithPageLens(c.dtype, c.head_dim, c.page_tokens,
                                     RandomPageLens(c.sparse_pages, c.page_tokens, seed + 7), seed,
                                     c.bias);
}

std::vector<int32_t> AllPages(const RandomPagedKv& kv) {
  std::vector<int32_t> pages(kv.total_pages());
  std::iota(pages.begin(), pages.end(), 0);
  return pages;
}

void CheckDecode(const DecodeCase& c, uint32_t seed) {
  SCOPED_TRACE(CaseName(c));
  const RandomPagedKv kv = MakeKv(c, seed);
  CheckDecodeOn(kv, kv.view(), AllPages(kv), c.group, c.threads, seed + 1);
}

class DecodeShapes
    : public ::testing::TestWithParam<std::tuple<DType, int /*head_dim*/, int /*group*/>> {};

TEST_P(DecodeShapes, MatchesFloat64Reference) {
  const auto [dtype, head_dim, group] = GetParam();
  // Two KV heads of different lengths: a partial last page, and a length that is not a
  // multiple of the page size; pages live out of order in the pool.
  const std::vector<int64_t> tokens = {301, 64 + 17};
  for (int threads : {1, 2}) {
    CheckDecode({dtype, head_dim, group, 2, 32, tokens, threads, false}, 1000 + head_dim + group);
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllShapes, DecodeShapes,
    ::testing::Combine(::testing::Values(DType::kF32, DType::kF16, DType::kBF16),
                       ::testing::Values(8, 64, 128, 256), ::testing::Values(1, 2, 3, 4, 8)),
    [](const auto& info) {
      return absl::StrFormat("%s_d%d_g%d", DTypeName(std::get<0>(info.param)),
                             std::get<1>(info.param), std::get<2>(info.param));
    });

TEST(DecodeAttention, SingleToken) { CheckDecode({DType::kF16, 128, 4, 1, 64, {1}, 1, false}, 7); }

TEST(DecodeAttention, ExactlyFullPages) {
  CheckDecode({DType::kBF16, 64, 2, 3, 16, {16, 48, 160}, 2, false}, 8);
}

TEST(DecodeAttention, HeadWithoutPagesGivesZerosAndNegInfLse) {
  CheckDecode({DType::kF32, 64, 4, 3, 16, {40, 0, 5}, 2, false}, 9);
}

TEST(DecodeAttention, TokenBiasActsAsLogCount) {
  CheckDecode({DType::kF16, 128, 4, 2, 64, {200, 129}, 2, true}, 10);
}

TEST(DecodeAttention, ManyThreadsSplitLongHeads) {
  // 8 threads on one long head forces many pieces per head and the LSE merge between them.
  CheckDecode({DType::kF16, 128, 4, 1, 16, {4099}, 8, false}, 11);
  CheckDecode({DType::kBF16, 64, 8, 2, 64, {3000, 2500}, 3, false}, 12);
}

TEST(DecodeAttention, LargePages) {
  CheckDecode({DType::kF16, 128, 4, 2, 1024, {2047, 1030}, 2, false}, 13);
}

// Sparse heads (token-level eviction, compaction): every page holds a random count 1..P,
// described with page_len; one head has no pages.
class SparseDecodeShapes
    : public ::testing::TestWithParam<std::tuple<DType, int /*head_dim*/, int /*group*/>> {};

TEST_P(SparseDecodeShapes, MatchesFloat64Reference) {
  const auto [dtype, head_dim, group] = GetParam();
  for (int threads : {1, 2}) {
    CheckDecode({dtype, head_dim, group, 3, 16, {}, threads, false, {23, 0, 9}},
                2000 + head_dim + group);
  }
}

INSTANTIATE_TEST_SUITE_P(SparseShapes, SparseDecodeShapes,
                         ::testing::Combine(::testing::Values(DType::kF32, DType::kF16,
                                                              DType::kBF16),
                                            ::testing::Values(64, 128), ::testing::Values(1, 4, 8)),
                         [](const auto& info) {
                           return absl::StrFormat("%s_d%d_g%d", DTypeName(std::get<0>(info.param)),
                                                  std::get<1>(info.param), std::get<2>(info.param));
                         });

TEST(SparseDecode, TokenBiasKeepsSlotIndexing) {
  CheckDecode({DType::kF16, 128, 4, 2, 16, {}, 2, true, {30, 11}}, 21);
  CheckDecode({DType::kBF16, 64, 8, 2, 32, {}, 1, true, {7, 19}}, 22);
}

TEST(SparseDecode, ManyThreadsSplitOneLongSparseHead) {
  CheckDecode({DType::kF16, 128, 4, 1, 16, {}, 8, false, {300}}, 23);
  CheckDecode({DType::kF32, 64, 1, 2, 64, {}, 3, true, {90, 41}}, 24);
}

TEST(SparseDecode, OneTokenPerPage) {
  const RandomPagedKv kv = RandomPagedKv::WithPageLens(
      DType::kF16, 128, 16, {std::vector<int32_t>(37, 1), {16, 1, 16}}, 25, /*with_bias=*/true);
  CheckDecodeOn(kv, kv.view(), AllPages(kv), 4, 2, 26);
}

// A page selector names some pages of each head, in any order: attention over exactly their
// tokens, with the statistics indexed by the subset's CSR positions.
TEST(SparseDecode, PageSubsetEqualsAttentionOverThoseTokens) {
  std::mt19937 rng(27);
  const RandomPagedKv sparse = RandomPagedKv::WithPageLens(
      DType::kBF16, 128, 16, RandomPageLens({40, 25, 12}, 16, 28), 29, /*with_bias=*/true);
  const RandomPagedKv dense(DType::kF16, 64, 16, {300, 77, 16}, 30);
  for (const RandomPagedKv* kv : {&sparse, &dense}) {
    for (int trial = 0; trial < 3; ++trial) {
      std::vector<std::vector<int32_t>> pages_of_head(kv->num_kv_heads());
      std::vector<int32_t> source_page;
      for (int h = 0; h < kv->num_kv_heads(); ++h) {
        for (int32_t j = kv->first_page(h); j < kv->first_page(h + 1); ++j) {
          if (std::bernoulli_distribution(0.5)(rng)) pages_of_head[h].push_back(j);
        }
        // The first head's pages out of token order, as a selector ranking by score gives them.
        if (h == 0) std::shuffle(pages_of_head[h].begin(), pages_of_head[h].end(), rng);
        source_page.insert(source_page.end(), pages_of_head[h].begin(), pages_of_head[h].end());
      }
      testing::ViewStorage storage;
      const PagedKvView view = kv->SubsetView(pages_of_head, storage);
      SCOPED_TRACE(::testing::Message() << "trial " << trial << " pages " << source_page.size());
      CheckDecodeOn(*kv, view, source_page, 4, 1 + trial % 2, 31 + trial);
    }
  }
}

// Outputs of one decode call, poisoned before it.
struct DecodeOutputs {
  explicit DecodeOutputs(const PagedKvView& kv, int num_q)
      : o(int64_t{num_q} * kv.head_dim, std::nanf("")),
        lse(num_q, std::nanf("")),
        probs(int64_t{kv.indptr[kv.num_kv_heads]} * kv.page_tokens, std::nanf("")),
        mass(kv.indptr[kv.num_kv_heads], std::nanf("")) {}
  absl::Status Run(const PagedKvView& kv, const std::vector<float>& q, int threads) {
    DecodeArgs args;
    args.q = q.data();
    args.num_q_heads = static_cast<int>(lse.size());
    args.o = o.data();
    args.lse = lse.data();
    args.token_probs = probs.data();
    args.page_mass = mass.data();
    args.num_threads = threads;
    return DecodeAttention(kv, args);
  }
  std::vector<float> o, lse, probs, mass;
};

// Bit-equal float vectors (NaN equals NaN: untouched poison).
void ExpectSameBits(const std::vector<float>& a, const std::vector<float>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << what;
}

TEST(SparseDecode, PageLenOfDenseHeadsMatchesLastPageLenRuleExactly) {
  const RandomPagedKv kv(DType::kF16, 128, 16, {301, 16, 0, 45}, 32, /*with_bias=*/true);
  const std::vector<float> q = RandomFloats(4 * 2 * 128, 33);
  testing::ViewStorage storage;
  std::vector<std::vector<int32_t>> every(kv.num_kv_heads());
  for (int h = 0; h < kv.num_kv_heads(); ++h) {
    for (int32_t j = kv.first_page(h); j < kv.first_page(h + 1); ++j) every[h].push_back(j);
  }
  PagedKvView with_page_len = kv.SubsetView(every, storage);
  for (int threads : {1, 2}) {
    DecodeOutputs dense(kv.view(), 8), sparse(with_page_len, 8), ignored(with_page_len, 8);
    ASSERT_TRUE(dense.Run(kv.view(), q, threads).ok());
    ASSERT_TRUE(sparse.Run(with_page_len, q, threads).ok());
    // With page_len set, last_page_len is not read, even when its values are out of range.
    const int32_t garbage[4] = {0, 99, -5, 17};
    PagedKvView both = with_page_len;
    both.last_page_len = garbage;
    ASSERT_TRUE(ignored.Run(both, q, threads).ok());
    for (const DecodeOutputs* got : {&sparse, &ignored}) {
      ExpectSameBits(got->o, dense.o, "o");
      ExpectSameBits(got->lse, dense.lse, "lse");
      ExpectSameBits(got->probs, dense.probs, "token_probs");
      ExpectSameBits(got->mass, dense.mass, "page_mass");
    }
  }
}

TEST(SparseDecode, RejectsBadPageLenAndWritesNothing) {
  const RandomPagedKv kv =
      RandomPagedKv::WithPageLens(DType::kF16, 64, 16, RandomPageLens({5, 3}, 16, 34), 35);
  const std::vector<float> q = RandomFloats(4 * 64, 36);
  std::vector<std::vector<int32_t>> every = {{0, 1, 2, 3, 4}, {5, 6, 7}};
  testing::ViewStorage storage;
  const PagedKvView view = kv.SubsetView(every, storage);
  DecodeOutputs fine(view, 4);
  ASSERT_TRUE(fine.Run(view, q, 1).ok());
  for (int32_t bad : {0, 17, -1, std::numeric_limits<int32_t>::max()}) {
    for (int32_t at : {0, 4, 7}) {  // First, a head's last, the very last page.
      SCOPED_TRACE(::testing::Message() << "page_len[" << at << "] = " << bad);
      const int32_t saved = storage.page_len[at];
      storage.page_len[at] = bad;
      EXPECT_EQ(ValidatePagedKvView(view).code(), absl::StatusCode::kInvalidArgument);
      DecodeOutputs out(view, 4);
      const DecodeOutputs untouched = out;
      EXPECT_EQ(out.Run(view, q, 2).code(), absl::StatusCode::kInvalidArgument);
      ExpectSameBits(out.o, untouched.o, "o written on error");
      ExpectSameBits(out.probs, untouched.probs, "token_probs written on error");
      storage.page_len[at] = saved;
    }
  }
  PagedKvView neither = view;
  neither.page_len = nullptr;
  ASSERT_EQ(neither.last_page_len, nullptr);
  EXPECT_EQ(DecodeOutputs(view, 4).Run(neither, q, 1).code(), absl::StatusCode::kInvalidArgument);
}

TEST(DecodeAttention, RejectsBadArguments) {
  RandomPagedKv kv(DType::kF16, 64, 16, {40, 20}, 1);
  const std::vector<float> q = RandomFloats(4 * 64, 2);
  std::vector<float> o(q.size());
  DecodeArgs args;
  args.q = q.data();
  args.num_q_heads = 4;
  args.o = o.data();
  ASSERT_TRUE(DecodeAttention(kv.view(), args).ok());

  auto expect_invalid = [&](PagedKvView view, DecodeArgs a, const char* what) {
    const absl::Status status = DecodeAttention(view, a);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << what << ": " << status;
  };
  DecodeArgs bad = args;
  bad.num_q_heads = 3;
  expect_invalid(kv.view(), bad, "q heads not a multiple of kv heads");
  bad = args;
  bad.q = nullptr;
  expect_invalid(kv.view(), bad, "null q");
  bad = args;
  bad.o = nullptr;
  expect_invalid(kv.view(), bad, "null o");
  bad = args;
  bad.scale = -1.0f;
  expect_invalid(kv.view(), bad, "negative scale");

  PagedKvView view = kv.view();
  view.head_dim = 48;
  expect_invalid(view, args, "unsupported head_dim");
  view = kv.view();
  view.indptr = nullptr;
  expect_invalid(view, args, "null indptr");
  view = kv.view();
  view.indices = nullptr;
  expect_invalid(view, args, "null indices");
  view = kv.view();
  view.num_slots = 2;
  expect_invalid(view, args, "index outside the pool");
  view = kv.view();
  view.page_tokens = 0;
  expect_invalid(view, args, "zero page_tokens");
  view = kv.view();
  const int32_t bad_last[2] = {17, 4};
  view.last_page_len = bad_last;
  expect_invalid(view, args, "last_page_len beyond page");
  const int32_t decreasing[3] = {0, 3, 1};
  view = kv.view();
  view.indptr = decreasing;
  expect_invalid(view, args, "decreasing indptr");
  view = kv.view();
  view.dtype = static_cast<DType>(42);
  expect_invalid(view, args, "unknown dtype");
}

}  // namespace
}  // namespace headwise::kernels
