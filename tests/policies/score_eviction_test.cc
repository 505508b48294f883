// Score-driven eviction (TOVA, key norm, Scissorhands, and H2O under a budget): the shared
// keep-within-budget rule, each scorer's update and each policy's choice, all against values
// computed by hand from the formulas of policies.md §5.2-§5.4 on small heads.
#include "policies/score_eviction.h"

#include <cmath>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "policies/accounting.h"
#include "policies/eviction.h"
#include "policies/policy_stack.h"
#include "tests/policies/token_head_helpers.h"

namespace headwise {
namespace {

using testing_helpers::SmallLayout;
using testing_helpers::TokenHead;
using V = std::vector<int64_t>;

TEST(KeepWithinBudget, KeepsNewestPlusTopScoresTiesToTheOlderToken) {
  // Pages of 4: [0..3] [4..7] [8..9].
  const TokenHead head({0.5f, 0.1f, 0.9f, 0.2f, 0.3f, 0.9f, 0.05f, 0.4f, 0.0f, 0.1f}, 4);
  // Budget 4: the newest (9) + top 3 of 0..8 = 2, 5 (0.9 each), 0 (0.5).
  auto a = KeepWithinBudget(head.Context(), 4, 1, "test");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(head.Kept(*a), (V{0, 2, 5, 9}));
  // Budget 2: 2 and 5 tie at 0.9; the older one (2) stays.
  a = KeepWithinBudget(head.Context(), 2, 1, "test");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(head.Kept(*a), (V{2, 9}));
  // Page 1 loses every token: dropped whole; the others lose single rows.
  EXPECT_EQ(a->drop_pages, (std::vector<int32_t>{1}));
  EXPECT_EQ(a->drop_tokens, (std::vector<TokenRef>{{0, 0}, {0, 1}, {0, 3}, {2, 0}}));
  // Recent window of 3 inside a budget of 4: 7, 8, 9 + the best older one (2).
  a = KeepWithinBudget(head.Context(), 4, 3, "test");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(head.Kept(*a), (V{2, 7, 8, 9}));
  // A recent window larger than the budget is cut to the budget.
  a = KeepWithinBudget(head.Context(), 2, 50, "test");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(head.Kept(*a), (V{8, 9}));
  // Within the budget, or unlimited: nothing.
  EXPECT_TRUE(KeepWithinBudget(head.Context(), 10, 1, "test")->empty());
  EXPECT_TRUE(KeepWithinBudget(head.Context(), kUnlimitedTokens, 1, "test")->empty());
  // Budget 0 still keeps the newest token.
  a = KeepWithinBudget(head.Context(), 0, 0, "test");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(head.Kept(*a), (V{9}));
}

TEST(KeepWithinBudget, UnscoredTokensAreNeverDropped) {
  const TokenHead head({0.1f, 0.4f, 0.3f, 0.2f, kUnscored, kUnscored}, 4);
  auto a = KeepWithinBudget(head.Context(), 3, 1, "test");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(head.Kept(*a), (V{1, 4, 5}));
  // Budget 1: the newest, and 4, which no query has seen yet: over budget until one does.
  a = KeepWithinBudget(head.Context(), 1, 1, "test");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(head.Kept(*a), (V{4, 5}));
}

TEST(KeepWithinBudget, NeedsScoresOnlyWhenItMustDrop) {
  const TokenHead head = TokenHead::Unscored(6, 4);
  EXPECT_TRUE(KeepWithinBudget(head.Context(), 6, 1, "tova")->empty());
  const auto a = KeepWithinBudget(head.Context(), 3, 1, "tova");
  EXPECT_EQ(a.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(a.status().message().find("tova"), std::string::npos);
}

TEST(LastAttentionScorer, ReplacesTheScoreWithTheLatestQuerysAttention) {
  LastAttentionScorer scorer;
  EXPECT_EQ(scorer.InitialScore(), kUnscored);
  EXPECT_TRUE(scorer.needs().token_probs);
  std::vector<float> scores = {kUnscored, 0.7f, 0.2f};
  scorer.Accumulate(std::vector<float>{0.5f, 0.25f, 0.25f}, absl::MakeSpan(scores));
  EXPECT_EQ(scores, (std::vector<float>{0.5f, 0.25f, 0.25f}));
  scorer.Accumulate(std::vector<float>{0.1f, 0.6f, 0.3f}, absl::MakeSpan(scores));
  EXPECT_EQ(scores, (std::vector<float>{0.1f, 0.6f, 0.3f}));  // No history.
}

TEST(TovaPolicy, KeepsTheBudgetsMostAttendedTokens) {
  TovaPolicy tova;
  EXPECT_TRUE(tova.uses_scores());
  const TokenHead head({0.30f, 0.02f, 0.25f, 0.03f, 0.10f, 0.05f, 0.15f, 0.10f}, 2);
  auto a = tova.Decide(head.Context(4));
  ASSERT_TRUE(a.ok());
  // Newest (7) + top 3 of 0..6: 0 (.30), 2 (.25), 6 (.15).
  EXPECT_EQ(head.Kept(*a), (V{0, 2, 6, 7}));
  // Pages 1 ([2,3]) and 3 ([6,7]) lose one token each; page 2 ([4,5]) goes whole.
  EXPECT_EQ(a->drop_pages, (std::vector<int32_t>{2}));
  EXPECT_TRUE(tova.Decide(head.Context())->empty());  // No budget: keeps everything.
}

TEST(KeyNormScorer, ScoresMinusTheL2NormOfEachKey) {
  KeyNormScorer scorer;
  EXPECT_TRUE(scorer.needs().appended_keys);
  EXPECT_FALSE(scorer.needs().token_probs);
  const std::vector<float> keys = {3, 4, 1, 0, 0, 0, -2, 2};  // Four keys of dim 2.
  std::vector<float> out(4);
  scorer.ScoreAppended(keys, 2, absl::MakeSpan(out));
  EXPECT_FLOAT_EQ(out[0], -5.0f);
  EXPECT_FLOAT_EQ(out[1], -1.0f);
  EXPECT_FLOAT_EQ(out[2], 0.0f);
  EXPECT_FLOAT_EQ(out[3], -std::sqrt(8.0f));
  std::vector<float> scores = out;
  scorer.Accumulate(std::vector<float>{0.9f, 0.0f, 0.1f, 0.0f}, absl::MakeSpan(scores));
  EXPECT_EQ(scores, out);  // Attention does not change a key norm.
}

TEST(KeyNormPolicy, KeepsTheRecentWindowAndTheLowestNormKeys) {
  auto policy = KeyNormPolicy::Create({.recent_tokens = 2});
  ASSERT_TRUE(policy.ok());
  // Norms 5, 1, 2, 0.5, 3, 4, 6, 7.
  const TokenHead head({-5, -1, -2, -0.5f, -3, -4, -6, -7}, 4);
  auto a = (*policy)->Decide(head.Context(4));
  ASSERT_TRUE(a.ok());
  // 6, 7 recent; the two lowest norms of 0..5 are 3 (0.5) and 1 (1).
  EXPECT_EQ(head.Kept(*a), (V{1, 3, 6, 7}));
  EXPECT_EQ(KeyNormPolicy::Create({.recent_tokens = -1}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(UnimportanceScorer, CountsBelowUniformStepsWithAnExponentialWindow) {
  auto scorer = UnimportanceScorer::Create({.history_window = 4, .threshold_tokens = 4});
  ASSERT_TRUE(scorer.ok());
  EXPECT_EQ((*scorer)->InitialScore(), kUnscored);
  // decay = 1 - 1/4 = 0.75, threshold = 1/4.
  std::vector<float> s(4, kUnscored);
  (*scorer)->Accumulate(std::vector<float>{0.5f, 0.1f, 0.25f, 0.0f}, absl::MakeSpan(s));
  // U = 0, 1, 0 (0.25 is not below 1/4), 1; stored negated.
  EXPECT_EQ(s, (std::vector<float>{0.0f, -1.0f, 0.0f, -1.0f}));
  (*scorer)->Accumulate(std::vector<float>{0.1f, 0.1f, 0.5f, 0.3f}, absl::MakeSpan(s));
  // U = 0*.75+1, 1*.75+1, 0, 1*.75+0.
  EXPECT_EQ(s, (std::vector<float>{-1.0f, -1.75f, 0.0f, -0.75f}));
}

TEST(UnimportanceScorer, RecentUnimportanceWeighsMoreThanOld) {
  // w = 10: A is unimportant in steps 1..10 and important in 11..20; B the other way round. The
  // paper's sliding count after step 20 is A = 0, B = 10; the exponential window gives
  // A = (1 - 0.9^10) / 0.1 * 0.9^10 = 2.2711 and B = (1 - 0.9^10) / 0.1 = 6.5132.
  auto scorer = UnimportanceScorer::Create({.history_window = 10, .threshold_tokens = 10});
  ASSERT_TRUE(scorer.ok());
  std::vector<float> s(2, kUnscored);
  for (int step = 0; step < 20; ++step) {
    const bool first_half = step < 10;
    (*scorer)->Accumulate(std::vector<float>{first_half ? 0.0f : 0.5f, first_half ? 0.5f : 0.0f},
                          absl::MakeSpan(s));
  }
  const double b = (1 - std::pow(0.9, 10)) / 0.1;
  EXPECT_NEAR(-s[0], b * std::pow(0.9, 10), 1e-4);
  EXPECT_NEAR(-s[1], b, 1e-4);
  EXPECT_GT(s[0], s[1]);  // A ranks as more important, as in the sliding window.
}

TEST(UnimportanceScorer, RejectsBadOptions) {
  EXPECT_EQ(UnimportanceScorer::Create({.history_window = 0}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(UnimportanceScorer::Create({.threshold_tokens = 0}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ScissorhandsPolicy, DropsToBudgetMinusMOnlyWhenTheBudgetIsExceeded) {
  auto policy = ScissorhandsPolicy::Create({.recent_tokens = 1, .drop_fraction = 0.5});
  ASSERT_TRUE(policy.ok());
  // -U for positions 0..6: U = 3, 0, 1, 2, 0.5, 4, 0.
  const TokenHead head({-3, 0, -1, -2, -0.5f, -4, 0}, 4);
  // 7 tokens within a budget of 7: nothing.
  EXPECT_TRUE((*policy)->Decide(head.Context(7))->empty());
  // Budget 6 exceeded: keep 6 - round(0.5 * 6) = 3: the newest (6) + the two lowest U of 0..5:
  // 1 (0) and 4 (0.5).
  auto a = (*policy)->Decide(head.Context(6));
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(head.Kept(*a), (V{1, 4, 6}));
  // m = 0: drop just enough.
  auto exact = ScissorhandsPolicy::Create({.recent_tokens = 1, .drop_fraction = 0.0});
  a = (*exact)->Decide(head.Context(6));
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(head.Kept(*a), (V{0, 1, 2, 3, 4, 6}));  // Drops 5, the largest U (4).
  for (double bad : {1.0, -0.1, std::nan("")}) {
    EXPECT_EQ(ScissorhandsPolicy::Create({.drop_fraction = bad}).status().code(),
              absl::StatusCode::kInvalidArgument)
        << bad;
  }
  EXPECT_EQ(ScissorhandsPolicy::Create({.recent_tokens = -2}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(H2oPolicy, HonoursAHeadBudgetBelowHeavyPlusRecent) {
  auto policy = H2oPolicy::Create({.heavy_tokens = 2, .recent_tokens = 2});
  ASSERT_TRUE(policy.ok());
  const TokenHead head({0.9f, 0.1f, 0.8f, 0.2f, 0.3f, 0.4f}, 4);
  // No budget: 4, 5 recent + 0, 2 heavy.
  EXPECT_EQ(head.Kept(*(*policy)->Decide(head.Context())), (V{0, 2, 4, 5}));
  // Budget 3: 2 recent + 1 heavy.
  EXPECT_EQ(head.Kept(*(*policy)->Decide(head.Context(3))), (V{0, 4, 5}));
}

// --- Resolution from a PolicySpec and the registry ------------------------------------------

TEST(ScoreEvictionSpec, NeedsABudgetAndResolvesDefaults) {
  headwise::v1::PolicySpec spec;
  spec.mutable_eviction()->mutable_tova();
  EXPECT_EQ(ResolveEvictionSpec(spec).status().code(), absl::StatusCode::kInvalidArgument);
  spec.mutable_budget()->mutable_uniform()->set_tokens(64);
  auto e = ResolveEvictionSpec(spec);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->method, EvictionSpec::Method::kTova);

  spec.mutable_eviction()->mutable_key_norm();
  e = ResolveEvictionSpec(spec);
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->key_norm_recent_tokens, 10);
  spec.mutable_eviction()->mutable_key_norm()->set_recent_tokens(-1);
  EXPECT_EQ(ResolveEvictionSpec(spec).status().code(), absl::StatusCode::kInvalidArgument);

  spec.mutable_eviction()->mutable_scissorhands();
  e = ResolveEvictionSpec(spec);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->scissorhands_history_window, 400);
  EXPECT_EQ(e->scissorhands_recent_tokens, 10);
  EXPECT_EQ(e->scissorhands_drop_fraction, 0.5);
  EXPECT_EQ(e->scissorhands_threshold_tokens, 64);  // From the uniform budget.
  spec.mutable_budget()->mutable_pyramid_kv()->set_tokens(64);
  EXPECT_EQ(ResolveEvictionSpec(spec).status().code(), absl::StatusCode::kInvalidArgument);
  spec.mutable_eviction()->mutable_scissorhands()->set_threshold_tokens(100);
  EXPECT_TRUE(ResolveEvictionSpec(spec).ok());
  for (auto bad : {std::make_pair(0, 0.5), std::make_pair(400, 1.0)}) {
    auto* sh = spec.mutable_eviction()->mutable_scissorhands();
    sh->set_history_window(bad.first);
    sh->set_drop_fraction(bad.second);
    EXPECT_EQ(ResolveEvictionSpec(spec).status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST(ScoreEvictionSpec, AccountingCountsTheUniformBudget) {
  headwise::v1::PolicySpec spec;
  spec.mutable_budget()->mutable_uniform()->set_tokens(10);
  spec.mutable_eviction()->mutable_tova();
  auto e = ResolveEvictionSpec(spec);
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->uniform_budget_tokens, 10);
  // P = 4: 10 tokens need 3 dense pages; fragmentation bound 2 * 3 + 1 = 7 of the 25 held.
  HeadRetention r = RetainedForHead(*e, HeadRole::kRetrieval, 100, 4);
  EXPECT_EQ(r.tokens, 10);
  EXPECT_EQ(r.pages, 7);
  r = RetainedForHead(*e, HeadRole::kRetrieval, 6, 4);  // Under the budget: everything.
  EXPECT_EQ(r.tokens, 6);
  EXPECT_EQ(r.pages, 2);
  // H2O under a budget: min(heavy + recent, B).
  spec.mutable_eviction()->mutable_h2o()->set_heavy_tokens(4);
  spec.mutable_eviction()->mutable_h2o()->set_recent_tokens(4);
  e = ResolveEvictionSpec(spec);
  EXPECT_EQ(RetainedForHead(*e, HeadRole::kRetrieval, 100, 4).tokens, 8);
  spec.mutable_budget()->mutable_uniform()->set_tokens(5);
  e = ResolveEvictionSpec(spec);
  EXPECT_EQ(RetainedForHead(*e, HeadRole::kRetrieval, 100, 4).tokens, 5);
  // Other budgets are not modelled: full (an upper bound).
  spec.mutable_budget()->mutable_pyramid_kv()->set_tokens(5);
  spec.mutable_eviction()->mutable_tova();
  e = ResolveEvictionSpec(spec);
  EXPECT_EQ(RetainedForHead(*e, HeadRole::kRetrieval, 100, 4).tokens, 100);
}

TEST(ScoreEvictionSpec, TheStackPicksTheMatchingScorer) {
  const ModelLayout layout = SmallLayout();
  const StackEnv env{.layout = &layout};
  headwise::v1::PolicySpec spec;
  spec.mutable_budget()->mutable_uniform()->set_tokens(16);
  const std::pair<std::function<void()>, std::string> cases[] = {
      {[&] { spec.mutable_eviction()->mutable_tova(); }, "scorer=last_attention action=tova"},
      {[&] { spec.mutable_eviction()->mutable_key_norm(); }, "scorer=key_norm action=key_norm"},
      {[&] { spec.mutable_eviction()->mutable_scissorhands(); },
       "scorer=unimportance_count action=scissorhands"},
  };
  for (const auto& [set, expected] : cases) {
    set();
    auto stack = PolicyStack::Create(spec, env);
    ASSERT_TRUE(stack.ok()) << stack.status();
    EXPECT_NE((*stack)->Describe().find(expected), std::string::npos) << (*stack)->Describe();
    EXPECT_NE((*stack)->Describe().find("budget=uniform"), std::string::npos);
    // Clone keeps the stage kinds.
    EXPECT_EQ((*stack)->Clone()->Describe(), (*stack)->Describe());
  }
}

}  // namespace
}  // namespace headwise
