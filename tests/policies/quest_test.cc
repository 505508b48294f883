// Quest (policies.md §7.1): the key-bound score U(q, p) and the page choice (top pages plus the
// last, dense layers, the page budget), against values computed by hand on small heads.
#include "policies/quest.h"

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "policies/policy_stack.h"
#include "tests/policies/page_list_helpers.h"
#include "tests/policies/token_head_helpers.h"

namespace headwise {
namespace {

using testing_helpers::ContiguousPages;
using testing_helpers::SmallLayout;
using Pages = std::vector<int32_t>;

constexpr int kD = 2;  // Channels of the hand-built heads.

TEST(QuestUpperBound, HandComputed) {
  const float q[4] = {1.0f, -2.0f, 0.0f, 0.5f};
  const float kmin[4] = {-1.0f, 1.0f, 7.0f, -4.0f};
  const float kmax[4] = {2.0f, 3.0f, 9.0f, 4.0f};
  // 1*2 + (-2)*1 + 0 + 0.5*4 = 2.
  EXPECT_DOUBLE_EQ(QuestUpperBound(q, kmin, kmax, 4), 2.0);
  // Unreadable bounds: +inf where q != 0; a zero channel adds nothing (no 0 * inf).
  const float inf = std::numeric_limits<float>::infinity();
  const float lo[2] = {-inf, -inf}, hi[2] = {inf, inf};
  const float q0[2] = {0.0f, 0.0f}, q1[2] = {0.0f, -1.0f};
  EXPECT_EQ(QuestUpperBound(q0, lo, hi, 2), 0.0);
  EXPECT_EQ(QuestUpperBound(q1, lo, hi, 2), std::numeric_limits<double>::infinity());
}

TEST(QuestUpperBound, BoundsEveryKeyOfThePageOnRandomData) {
  std::mt19937 rng(7);
  std::normal_distribution<float> n(0.0f, 1.0f);
  constexpr int D = 32, T = 16;
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<float> k(T * D), q(D), kmin(D, 1e30f), kmax(D, -1e30f);
    for (float& x : k) x = n(rng);
    for (float& x : q) x = n(rng);
    double best = -1e300;
    for (int t = 0; t < T; ++t) {
      double dot = 0;
      for (int c = 0; c < D; ++c) {
        dot += double{q[c]} * k[t * D + c];
        kmin[c] = std::min(kmin[c], k[t * D + c]);
        kmax[c] = std::max(kmax[c], k[t * D + c]);
      }
      best = std::max(best, dot);
    }
    EXPECT_GE(QuestUpperBound(q.data(), kmin.data(), kmax.data(), D), best - 1e-9);
  }
}

// A head of `bounds.size()` full pages of 4 tokens, with hand-set 2-channel bounds
// {kmin0, kmin1, kmax0, kmax1} per page.
struct BoundHead {
  std::vector<PageMeta> pages;
  std::vector<float> bounds;
  HeadContext Context(int layer = 2) const {
    HeadContext h;
    h.layer = LayerId(layer);
    h.page_tokens = 4;
    h.seq_len = static_cast<int64_t>(pages.size()) * 4;
    h.pages = pages;
    h.key_bounds = bounds;
    h.head_dim = kD;
    return h;
  }
};

BoundHead MakeHead(const std::vector<std::vector<float>>& per_page) {
  BoundHead b;
  b.pages = ContiguousPages(static_cast<int64_t>(per_page.size()) * 4, 4);
  for (const auto& p : per_page) b.bounds.insert(b.bounds.end(), p.begin(), p.end());
  return b;
}

Pages Select(const QuestSelector& s, const HeadContext& h, const std::vector<float>& q, int g) {
  Pages out;
  EXPECT_TRUE(ValidateHeadContext(h).ok()) << ValidateHeadContext(h);
  s.Select(h, q, g, &out);
  return out;
}

std::unique_ptr<QuestSelector> Make(int64_t budget, int dense = 2,
                                    QuestSelector::Reduction r = QuestSelector::Reduction::kMax) {
  auto s = QuestSelector::Create({.token_budget = budget, .dense_layers = dense, .reduction = r});
  EXPECT_TRUE(s.ok()) << s.status();
  return *std::move(s);
}

TEST(QuestSelector, TopPagesPlusTheLastPage) {
  // q = (1, -1): U = kmax0 - kmin1.
  //   page 0: {0,0, 1,0} -> 1 - 0 = 1
  //   page 1: {0,-2, 1,0} -> 1 + 2 = 3
  //   page 2: {0,0, 5,0} -> 5
  //   page 3: {0,1, 2,0} -> 2 - 1 = 1
  //   page 4: {0,-3, 0,0} -> 0 + 3 = 3
  //   page 5 (last): {0,9, 0,0} -> -9, but always read.
  const BoundHead b = MakeHead(
      {{0, 0, 1, 0}, {0, -2, 1, 0}, {0, 0, 5, 0}, {0, 1, 2, 0}, {0, -3, 0, 0}, {0, 9, 0, 0}});
  const std::vector<float> q = {1.0f, -1.0f};
  // token_budget 12 / P 4 = 3 pages: the last + the best two (2: U 5; 1 and 4 tie at 3, the
  // older page 1 wins).
  EXPECT_EQ(Select(*Make(12), b.Context(), q, 1), (Pages{1, 2, 5}));
  // 16 tokens = 4 pages: + page 4.
  EXPECT_EQ(Select(*Make(16), b.Context(), q, 1), (Pages{1, 2, 4, 5}));
  // A budget under 3 pages is raised to 3 (the reference's max(3, ...)).
  EXPECT_EQ(Make(1)->PageBudget(4), 3);
  EXPECT_EQ(Select(*Make(1), b.Context(), q, 1), (Pages{1, 2, 5}));
  // Enough budget for every page: all of them.
  EXPECT_EQ(Select(*Make(24), b.Context(), q, 1), (Pages{0, 1, 2, 3, 4, 5}));
}

TEST(QuestSelector, DenseLayersReadEveryPage) {
  const BoundHead b =
      MakeHead({{0, 0, 1, 0}, {0, 0, 5, 0}, {0, 0, 2, 0}, {0, 0, 3, 0}, {0, 0, 0, 0}});
  const std::vector<float> q = {1.0f, 0.0f};
  // Layers 0 and 1 are dense by default; layer 2 selects: the last (4) + 1 (5) + 3 (3).
  EXPECT_EQ(Select(*Make(12), b.Context(0), q, 1), (Pages{0, 1, 2, 3, 4}));
  EXPECT_EQ(Select(*Make(12), b.Context(1), q, 1), (Pages{0, 1, 2, 3, 4}));
  EXPECT_EQ(Select(*Make(12), b.Context(2), q, 1), (Pages{1, 3, 4}));
  // dense_layers = 0: layer 0 selects too.
  EXPECT_EQ(Select(*Make(12, 0), b.Context(0), q, 1), (Pages{1, 3, 4}));
}

TEST(QuestSelector, GroupReductionMaxOrSum) {
  // Two query heads: q_a = (1, 0), q_b = (0, 1). U_a = kmax0, U_b = kmax1.
  //   page 0: kmax (4, 0)   max 4  sum 4
  //   page 1: kmax (3, 3)   max 3  sum 6
  //   page 2: kmax (0, 3.5) max 3.5 sum 3.5
  //   pages 3, 4: kmax (0, 0); page 4 is the last.
  const BoundHead b =
      MakeHead({{0, 0, 4, 0}, {0, 0, 3, 3}, {0, 0, 0, 3.5f}, {0, 0, 0, 0}, {0, 0, 0, 0}});
  const std::vector<float> q = {1.0f, 0.0f, 0.0f, 1.0f};
  // k_pages 3: the last + two. Max: pages 0 (4) and 2 (3.5). Sum: pages 1 (6) and 0 (4).
  EXPECT_EQ(Select(*Make(12), b.Context(), q, 2), (Pages{0, 2, 4}));
  EXPECT_EQ(Select(*Make(12, 2, QuestSelector::Reduction::kSum), b.Context(), q, 2),
            (Pages{0, 1, 4}));
}

TEST(QuestSelector, UnreadablePagesAreAlwaysSelected) {
  const float inf = std::numeric_limits<float>::infinity();
  BoundHead b =
      MakeHead({{0, 0, 9, 0}, {0, 0, 8, 0}, {-inf, -inf, inf, inf}, {0, 0, 7, 0}, {0, 0, 0, 0}});
  // The page on disk (2) outranks every readable one.
  EXPECT_EQ(Select(*Make(12), b.Context(), {1.0f, 0.0f}, 1), (Pages{0, 2, 4}));
}

TEST(QuestSelector, WithoutBoundsEveryPageIsRead) {
  BoundHead b = MakeHead({{0, 0, 9, 0}, {0, 0, 8, 0}, {0, 0, 1, 0}, {0, 0, 7, 0}});
  HeadContext h = b.Context();
  h.key_bounds = {};
  Pages out;
  Make(12)->Select(h, std::vector<float>{1.0f, 0.0f}, 1, &out);
  EXPECT_EQ(out, (Pages{0, 1, 2, 3}));
}

TEST(QuestSelector, RegisteredFromTheSpec) {
  const ModelLayout layout = SmallLayout();
  StackEnv env{.layout = &layout};
  headwise::v1::PolicySpec spec;
  spec.mutable_selection()->mutable_quest()->set_token_budget(64);
  auto stack = PolicyStack::Create(spec, env);
  ASSERT_TRUE(stack.ok()) << stack.status();
  EXPECT_EQ((*stack)->selector().name(), "quest");
  EXPECT_TRUE((*stack)->selector().needs_key_bounds());
  EXPECT_FALSE((*stack)->selector().selects_all());
  const auto* quest = dynamic_cast<const QuestSelector*>(&(*stack)->selector());
  ASSERT_NE(quest, nullptr);
  EXPECT_EQ(quest->options().token_budget, 64);
  EXPECT_EQ(quest->options().dense_layers, 2);
  // By name with defaults.
  headwise::v1::PolicySpec named;
  named.mutable_selection()->set_selector("quest");
  stack = PolicyStack::Create(named, env);
  ASSERT_TRUE(stack.ok()) << stack.status();
  quest = dynamic_cast<const QuestSelector*>(&(*stack)->selector());
  ASSERT_NE(quest, nullptr);
  EXPECT_EQ(quest->options().token_budget, 1024);
  // Out of range.
  spec.mutable_selection()->mutable_quest()->set_token_budget(0);
  EXPECT_EQ(PolicyStack::Create(spec, env).status().code(), absl::StatusCode::kInvalidArgument);
  spec.mutable_selection()->mutable_quest()->set_token_budget(16);
  spec.mutable_selection()->mutable_quest()->set_dense_layers(-1);
  EXPECT_EQ(PolicyStack::Create(spec, env).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ValidateHeadContext, KeyBoundsAndVotesSizes) {
  BoundHead b = MakeHead({{0, 0, 1, 0}, {0, 0, 2, 0}});
  HeadContext h = b.Context();
  EXPECT_TRUE(ValidateHeadContext(h).ok());
  const std::vector<float> short_bounds(3, 0.0f);
  h.key_bounds = short_bounds;
  EXPECT_EQ(ValidateHeadContext(h).code(), absl::StatusCode::kInvalidArgument);
  h = b.Context();
  const std::vector<float> votes(5, 0.0f);
  h.window_votes = votes;
  EXPECT_EQ(ValidateHeadContext(h).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace headwise
