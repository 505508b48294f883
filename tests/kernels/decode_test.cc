// Decode attention against a float64 reference on random paged caches.

#include <cmath>
#include <limits>
#include <tuple>
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
using testing::ReferenceDecode;

constexpr double kRelTol = 1e-5;

struct DecodeCase {
  DType dtype;
  int head_dim;
  int group;
  int kv_heads;
  int page_tokens;
  std::vector<int64_t> tokens;  // Per KV head; the vector's size must equal kv_heads.
  int threads;
  bool bias;
};

std::string CaseName(const DecodeCase& c) {
  return absl::StrFormat("%s_d%d_g%d_h%d_p%d_t%d%s", DTypeName(c.dtype), c.head_dim, c.group,
                         c.kv_heads, c.page_tokens, c.threads, c.bias ? "_bias" : "");
}

void CheckDecode(const DecodeCase& c, uint32_t seed) {
  SCOPED_TRACE(CaseName(c));
  RandomPagedKv kv(c.dtype, c.head_dim, c.page_tokens, c.tokens, seed, c.bias);
  const int num_q = c.kv_heads * c.group;
  const std::vector<float> q = RandomFloats(int64_t{num_q} * c.head_dim, seed + 1);
  std::vector<float> o(q.size(), std::nanf("")), lse(num_q, std::nanf(""));
  std::vector<float> probs(kv.total_pages() * c.page_tokens, std::nanf(""));
  std::vector<float> mass(kv.total_pages(), std::nanf(""));
  DecodeArgs args;
  args.q = q.data();
  args.num_q_heads = num_q;
  args.o = o.data();
  args.lse = lse.data();
  args.token_probs = probs.data();
  args.page_mass = mass.data();
  args.num_threads = c.threads;
  ASSERT_TRUE(DecodeAttention(kv.view(), args).ok());

  const PagedKvView view = kv.view();
  for (int qh = 0; qh < num_q; ++qh) {
    const auto ref = ReferenceDecode(kv, q.data(), num_q, qh, c.head_dim);
    const int h = qh / c.group;
    if (kv.tokens(h) == 0) {
      EXPECT_EQ(lse[qh], -std::numeric_limits<float>::infinity());
      for (int i = 0; i < c.head_dim; ++i) EXPECT_EQ(o[qh * c.head_dim + i], 0.0f);
      continue;
    }
    EXPECT_LT(MaxRelError(o.data() + qh * c.head_dim, ref.o), kRelTol) << "q head " << qh;
    EXPECT_NEAR(lse[qh], ref.lse, kRelTol * std::max(1.0, std::abs(ref.lse))) << "q head " << qh;
  }
  // Token probabilities averaged over each group, and page masses.
  for (int h = 0; h < c.kv_heads; ++h) {
    std::vector<double> expected(kv.tokens(h), 0.0);
    for (int j = 0; j < c.group; ++j) {
      const auto ref = ReferenceDecode(kv, q.data(), num_q, h * c.group + j, c.head_dim);
      for (int64_t i = 0; i < kv.tokens(h); ++i) expected[i] += ref.probs[i] / c.group;
    }
    for (int64_t i = 0; i < kv.tokens(h); ++i) {
      const int64_t j = view.indptr[h] + i / c.page_tokens;
      ASSERT_NEAR(probs[j * c.page_tokens + i % c.page_tokens], expected[i], 1e-6)
          << "head " << h << " token " << i;
    }
    for (int64_t j = view.indptr[h]; j < view.indptr[h + 1]; ++j) {
      double want = 0.0;
      for (int t = 0; t < c.page_tokens; ++t) {
        const int64_t i = (j - view.indptr[h]) * c.page_tokens + t;
        if (i < kv.tokens(h)) {
          want += expected[i];
        } else {
          EXPECT_EQ(probs[j * c.page_tokens + t], 0.0f) << "past the last token";
        }
      }
      EXPECT_NEAR(mass[j], want, 1e-5) << "head " << h << " page " << j;
    }
  }
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
