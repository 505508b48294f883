// kernels::PrefillWindowVotes (SnapKV's observation-window vote, policies.md §5.5) against a
// float64 reference on fresh random data: every dtype, sparse pages with merge biases, GQA, a
// window shorter and longer than the chunk; and its argument checks.
#include <cmath>
#include <vector>

#include "cachesvc/base/dtype.h"
#include "gtest/gtest.h"
#include "kernels/attention.h"
#include "tests/kernels/paged_kv_fixture.h"

namespace headwise::kernels {
namespace {

using testing::RandomFloats;
using testing::RandomPagedKv;

struct Case {
  DType dtype;
  int group;
  int window;
};

class WindowVotesTest : public ::testing::TestWithParam<Case> {};

TEST_P(WindowVotesTest, MatchesFloat64Reference) {
  const Case c = GetParam();
  constexpr int D = 32, P = 8, H = 2, T = 10;
  const int Hq = H * c.group;
  const RandomPagedKv kv = RandomPagedKv::WithPageLens(
      c.dtype, D, P, testing::RandomPageLens({4, 3}, P, 11), /*seed=*/12, /*with_bias=*/true);
  const std::vector<float> q = RandomFloats(int64_t{T} * Hq * D, 13);
  const std::vector<float> kf = RandomFloats(int64_t{T} * H * D, 14);
  std::vector<std::byte> k(kf.size() * DTypeSize(c.dtype));
  for (size_t i = 0; i < kf.size(); ++i) StoreFromFloat(k.data(), c.dtype, i, kf[i]);
  std::vector<float> cached(kv.total_pages() * P, -1.0f), chunk(H * T, -1.0f);
  WindowVoteArgs args;
  args.num_tokens = T;
  args.window = c.window;
  args.q = q.data();
  args.k_new = k.data();
  args.num_q_heads = Hq;
  args.cached_votes = cached.data();
  args.chunk_votes = chunk.data();
  args.num_threads = 2;
  ASSERT_TRUE(PrefillWindowVotes(kv.view(), args).ok());
  const double scale = 1.0 / std::sqrt(double{D});
  for (int h = 0; h < H; ++h) {
    const int64_t n = kv.tokens(h);
    std::vector<double> want(n + T, 0.0);
    for (int t = std::max(0, T - c.window); t < T; ++t) {
      for (int r = 0; r < c.group; ++r) {
        const float* qr = q.data() + (int64_t{t} * Hq + h * c.group + r) * D;
        std::vector<double> s(n + t + 1);
        double mx = -INFINITY;
        for (int64_t i = 0; i < n + t + 1; ++i) {
          double dot = 0;
          for (int d = 0; d < D; ++d) {
            const double key = i < n ? double{kv.K(h, i, d)}
                                     : LoadAsFloat(k.data(), c.dtype, ((i - n) * H + h) * D + d);
            dot += qr[d] * key;
          }
          s[i] = dot * scale + (i < n ? kv.Bias(h, i) : 0.0);
          mx = std::max(mx, s[i]);
        }
        double sum = 0;
        for (double& x : s) sum += (x = std::exp(x - mx));
        for (size_t i = 0; i < s.size(); ++i) want[i] += s[i] / sum / c.group;
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      const int32_t j = kv.PageOf(h, i);
      EXPECT_NEAR(cached[j * P + (i - kv.page_first_token(j))], want[i], 2e-5) << h << " " << i;
    }
    for (int t = 0; t < T; ++t) EXPECT_NEAR(chunk[h * T + t], want[n + t], 2e-5) << h << " " << t;
    // Rows past a page's valid count are 0.
    for (int32_t j = kv.first_page(h); j < kv.first_page(h + 1); ++j) {
      for (int r = kv.page_len(j); r < P; ++r) EXPECT_EQ(cached[j * P + r], 0.0f);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(DtypesGroupsWindows, WindowVotesTest,
                         ::testing::Values(Case{DType::kF32, 1, 4}, Case{DType::kF16, 3, 4},
                                           Case{DType::kBF16, 4, 1}, Case{DType::kF16, 2, 32}));

TEST(WindowVotes, RejectsBadArguments) {
  const RandomPagedKv kv(DType::kF16, 32, 8, {9, 5}, 3);
  std::vector<float> q(2 * 2 * 32, 0.5f), cached(kv.total_pages() * 8), chunk(2 * 2);
  std::vector<std::byte> k(2 * 2 * 32 * 2);
  WindowVoteArgs args;
  args.num_tokens = 2;
  args.window = 1;
  args.q = q.data();
  args.k_new = k.data();
  args.num_q_heads = 2;
  args.cached_votes = cached.data();
  args.chunk_votes = chunk.data();
  EXPECT_TRUE(PrefillWindowVotes(kv.view(), args).ok());
  WindowVoteArgs bad = args;
  bad.window = 0;
  EXPECT_EQ(PrefillWindowVotes(kv.view(), bad).code(), absl::StatusCode::kInvalidArgument);
  bad = args;
  bad.num_q_heads = 3;
  EXPECT_EQ(PrefillWindowVotes(kv.view(), bad).code(), absl::StatusCode::kInvalidArgument);
  bad = args;
  bad.chunk_votes = nullptr;
  EXPECT_EQ(PrefillWindowVotes(kv.view(), bad).code(), absl::StatusCode::kInvalidArgument);
  bad = args;
  bad.num_tokens = 0;
  EXPECT_EQ(PrefillWindowVotes(kv.view(), bad).code(), absl::StatusCode::kInvalidArgument);
}

// Merged rows carry their bias by CSR page position (page_bias, what the engine stages): the
// same biases given that way give the same votes as through token_bias.
TEST(WindowVotes, PageBiasEqualsTheSameTokenBias) {
  constexpr int D = 32, P = 8, H = 2, T = 6;
  const RandomPagedKv kv = RandomPagedKv::WithPageLens(
      DType::kF32, D, P, testing::RandomPageLens({3, 4}, P, 21), /*seed=*/22, /*with_bias=*/true);
  const PagedKvView by_slot = kv.view();
  ASSERT_NE(by_slot.token_bias, nullptr);
  std::vector<float> page_bias(kv.total_pages() * P);
  for (int32_t j = 0; j < kv.total_pages(); ++j) {
    for (int r = 0; r < P; ++r) {
      page_bias[j * P + r] = by_slot.token_bias[int64_t{by_slot.indices[j]} * P + r];
    }
  }
  PagedKvView by_page = by_slot;
  by_page.token_bias = nullptr;
  by_page.page_bias = page_bias.data();
  const std::vector<float> q = RandomFloats(int64_t{T} * H * D, 23);
  const std::vector<float> k = RandomFloats(int64_t{T} * H * D, 24);
  std::vector<float> votes[2][2];
  for (int i = 0; i < 2; ++i) {
    votes[i][0].assign(kv.total_pages() * P, -1.0f);
    votes[i][1].assign(H * T, -1.0f);
    WindowVoteArgs args;
    args.num_tokens = T;
    args.window = 3;
    args.q = q.data();
    args.k_new = k.data();
    args.num_q_heads = H;
    args.cached_votes = votes[i][0].data();
    args.chunk_votes = votes[i][1].data();
    ASSERT_TRUE(PrefillWindowVotes(i == 0 ? by_slot : by_page, args).ok());
  }
  EXPECT_EQ(votes[0][0], votes[1][0]);
  EXPECT_EQ(votes[0][1], votes[1][1]);
}

}  // namespace
}  // namespace headwise::kernels
