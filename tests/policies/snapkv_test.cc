// SnapKV (policies.md §5.5): the vote pooling and the keep rule (top pooled votes over the older
// tokens plus the window, within the capacity or the head's budget), against values computed by
// hand on small heads.
#include "policies/snapkv.h"

#include <vector>

#include "gtest/gtest.h"
#include "policies/policy_stack.h"
#include "tests/policies/token_head_helpers.h"

namespace headwise {
namespace {

using testing_helpers::SmallLayout;
using testing_helpers::TokenHead;
using V = std::vector<int64_t>;

TEST(PoolVotes, AverageCountsThePaddingMaxIgnoresIt) {
  const std::vector<float> x = {3, 0, 6, 0, 0, 9};
  // Kernel 3, padding 1: avg = (left + self + right) / 3 with zeros outside.
  //   j0: (0+3+0)/3 = 1   j1: (3+0+6)/3 = 3   j2: (0+6+0)/3 = 2
  //   j3: (6+0+0)/3 = 2   j4: (0+0+9)/3 = 3   j5: (0+9+0)/3 = 3
  EXPECT_EQ(PoolVotes(x, 3, WindowPooling::kAvg), (std::vector<float>{1, 3, 2, 2, 3, 3}));
  //   max: j0 3, j1 6, j2 6, j3 6, j4 9, j5 9.
  EXPECT_EQ(PoolVotes(x, 3, WindowPooling::kMax), (std::vector<float>{3, 6, 6, 6, 9, 9}));
  // Kernel 1 is the identity; negative votes never lose to max-pool padding.
  EXPECT_EQ(PoolVotes(x, 1, WindowPooling::kAvg), x);
  const std::vector<float> neg = {-1, -2};
  EXPECT_EQ(PoolVotes(neg, 3, WindowPooling::kMax), (std::vector<float>{-1, -1}));
}

std::unique_ptr<SnapKvPolicy> Make(int64_t w, int64_t c, int k,
                                   WindowPooling p = WindowPooling::kAvg) {
  auto s = SnapKvPolicy::Create(
      {.window_tokens = w, .capacity_tokens = c, .kernel_size = k, .pooling = p});
  EXPECT_TRUE(s.ok()) << s.status();
  return *std::move(s);
}

// 12 tokens in pages of 4; the votes are the window_votes.
HeadContext Voted(const TokenHead& head, int64_t budget = kUnlimitedTokens) {
  HeadContext h = head.Context(budget);
  h.window_votes = h.token_scores;
  h.token_scores = {};
  EXPECT_TRUE(ValidateHeadContext(h).ok());
  return h;
}

// Exact binary values, so sums of three tie exactly where the comments say.
const std::vector<float> kVotes = {5, 1, 9, 2, 3, 0.5f, 8, 0, 4, 6, 0, 0};

TEST(SnapKvPolicy, KeepsTopVotesPlusTheWindow) {
  const TokenHead head(kVotes, 4);
  // w 2, C 5, no pooling: window {10, 11} + top 3 of 0..9 by vote: 2 (9), 6 (8), 9 (6).
  auto a = Make(2, 5, 1)->Decide(Voted(head));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(head.Kept(*a), (V{2, 6, 9, 10, 11}));
  // Kernel 3 avg over 0..9 (zero padding, / 3):
  //   0: 6/3=2  1: 15/3=5  2: 12/3=4  3: 14/3=4.67  4: 5.5/3  5: 11.5/3=3.83  6: 8.5/3
  //   7: 12/3=4  8: 10/3  9: 10/3 (its right neighbour, 10, is in the window: padding)
  // top 3: 1 (5), 3 (4.67), then 2 and 7 tie at 4: the older (2).
  a = Make(2, 5, 3)->Decide(Voted(head));
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(head.Kept(*a), (V{1, 2, 3, 10, 11}));
  // Max pool kernel 3 over 0..9: 0 5, 1 9, 2 9, 3 9, 4 3, 5 8, 6 8, 7 8, 8 6, 9 6:
  // top 3 = 1, 2, 3 (9 each; ties to the older).
  a = Make(2, 5, 3, WindowPooling::kMax)->Decide(Voted(head));
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(head.Kept(*a), (V{1, 2, 3, 10, 11}));
  // Page 1 (4..7) loses every token: dropped whole; pages 0 and 2 lose single rows.
  EXPECT_EQ(a->drop_pages, (std::vector<int32_t>{1}));
  EXPECT_EQ(a->drop_tokens, (std::vector<TokenRef>{{0, 0}, {2, 0}, {2, 1}}));
}

TEST(SnapKvPolicy, BudgetReplacesTheCapacityAndNoVotesNoDrops) {
  const TokenHead head(kVotes, 4);
  // Budget 3 with w 2: the window + the best one (2, vote 9).
  auto a = Make(2, 100, 1)->Decide(Voted(head, 3));
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(head.Kept(*a), (V{2, 10, 11}));
  // A window larger than the capacity keeps the window's newest tokens only... up to all held:
  // w 4, C 3 keeps 8..11 (the window is never cut).
  a = Make(4, 3, 1)->Decide(Voted(head));
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(head.Kept(*a), (V{8, 9, 10, 11}));
  // Within the capacity: nothing. Without votes (appends, decode steps): nothing.
  EXPECT_TRUE(Make(2, 12, 1)->Decide(Voted(head))->empty());
  EXPECT_TRUE(Make(2, 5, 1)->Decide(head.Context())->empty());
}

TEST(SnapKvPolicy, OptionsAndRegistry) {
  EXPECT_FALSE(SnapKvPolicy::Create({.window_tokens = 0}).ok());
  EXPECT_FALSE(SnapKvPolicy::Create({.capacity_tokens = 0}).ok());
  EXPECT_FALSE(SnapKvPolicy::Create({.kernel_size = 4}).ok());
  EXPECT_FALSE(SnapKvPolicy::Create({.kernel_size = 65}).ok());
  const ModelLayout layout = SmallLayout();
  StackEnv env{.layout = &layout};
  headwise::v1::PolicySpec spec;
  spec.mutable_eviction()->mutable_snapkv();
  auto stack = PolicyStack::Create(spec, env);
  ASSERT_TRUE(stack.ok()) << stack.status();
  EXPECT_EQ((*stack)->actions().name(), "snapkv");
  EXPECT_EQ((*stack)->actions().window_tokens(), 32);
  EXPECT_EQ((*stack)->scorer(), nullptr);
  const auto* snap = dynamic_cast<const SnapKvPolicy*>(&(*stack)->actions());
  ASSERT_NE(snap, nullptr);
  EXPECT_EQ(snap->options().capacity_tokens, 2048);
  EXPECT_EQ(snap->options().kernel_size, 5);
  EXPECT_EQ(snap->options().pooling, WindowPooling::kAvg);
  auto* s = spec.mutable_eviction()->mutable_snapkv();
  s->set_window_tokens(16);
  s->set_capacity_tokens(64);
  s->set_kernel_size(7);
  s->set_pooling(headwise::v1::SnapKvEviction::POOLING_MAX);
  stack = PolicyStack::Create(spec, env);
  ASSERT_TRUE(stack.ok()) << stack.status();
  snap = dynamic_cast<const SnapKvPolicy*>(&(*stack)->actions());
  EXPECT_EQ(snap->options().window_tokens, 16);
  EXPECT_EQ(snap->options().capacity_tokens, 64);
  EXPECT_EQ(snap->options().kernel_size, 7);
  EXPECT_EQ(snap->options().pooling, WindowPooling::kMax);
  s->set_kernel_size(2);
  EXPECT_EQ(PolicyStack::Create(spec, env).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace headwise
