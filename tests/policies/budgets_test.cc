// Token budgets: PyramidKV per layer, Ada-KV per head from a layer-global top-k with its floor,
// HeadKV from offline head scores, and the rounding that keeps every sum within L * H * B; all
// against values worked out by hand from the formulas of policies.md §5.6-§5.8.
#include "policies/budgets.h"

#include <numeric>
#include <vector>

#include "gtest/gtest.h"
#include "policies/policy_stack.h"
#include "tests/policies/token_head_helpers.h"

namespace headwise {
namespace {

using testing_helpers::TokenHead;
using V = std::vector<int64_t>;

ModelLayout Layout(int layers, int q_heads, int kv_heads) {
  return testing_helpers::SmallLayout(layers, q_heads, kv_heads);
}

int64_t Sum(const V& v) { return std::accumulate(v.begin(), v.end(), int64_t{0}); }

TEST(RoundWithinTotal, RoundsHalfUpThenTakesBackTheLargestRoundUps) {
  EXPECT_EQ(RoundWithinTotal(std::vector<double>{1.4, 2.6, 3.0}, 7), (V{1, 3, 3}));
  // 1.5, 1.5, 1 -> 2, 2, 1 = 5 > 3: both +0.5 round-ups go back, the lower index first.
  EXPECT_EQ(RoundWithinTotal(std::vector<double>{1.5, 1.5, 1.0}, 3), (V{1, 1, 1}));
  EXPECT_EQ(RoundWithinTotal(std::vector<double>{2.5, 1.5}, 4), (V{2, 2}));
}

TEST(PyramidKvBudget, FollowsTheAuthorsPyramidAndKeepsTheMean) {
  auto p = PyramidKvBudget::Create({.tokens = 100, .beta = 20});
  ASSERT_TRUE(p.ok());
  // S = 1000, L = 4: min = 5, max = 195, step = floor(190 / 3) = 63: 195, 132, 69, 6 (402);
  // the 2 extra tokens come off layers 0 and 1.
  EXPECT_EQ((*p)->LayerBudgets(4, 1000), (V{194, 131, 69, 6}));
  EXPECT_EQ(Sum((*p)->LayerBudgets(4, 1000)), 400);
  // Below 2B: uniform.
  EXPECT_EQ((*p)->LayerBudgets(4, 199), (V{100, 100, 100, 100}));
  // One layer: B.
  EXPECT_EQ((*p)->LayerBudgets(1, 5000), (V{100}));
  // max >= S: max = S = 200, min = 0 (β huge), step 66: 200, 134, 68, 2 (404) -> 199, 133, 67, 1.
  auto wide = PyramidKvBudget::Create({.tokens = 100, .beta = 1e9});
  EXPECT_EQ((*wide)->LayerBudgets(4, 200), (V{199, 133, 67, 1}));
  // Allocate gives each head of a layer its layer's budget.
  const ModelLayout layout = Layout(4, 4, 2);
  V out(2);
  (*p)->Allocate(layout, HeadRoles(4, 2, HeadRole::kRetrieval), LayerId(1), 1000, {},
                 absl::MakeSpan(out));
  EXPECT_EQ(out, (V{131, 131}));
  EXPECT_EQ(PyramidKvBudget::Create({.tokens = 0}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PyramidKvBudget::Create({.tokens = 10, .beta = 0.5}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

V AdaAllocate(const AdaKvBudget& ada, const std::vector<TokenHead>& heads) {
  std::vector<HeadContext> contexts;
  for (const TokenHead& h : heads) contexts.push_back(h.Context());
  const int n = static_cast<int>(heads.size());
  const ModelLayout layout = Layout(1, 2 * n, n);
  V out(heads.size());
  ada.Allocate(layout, HeadRoles(1, n, HeadRole::kRetrieval), LayerId(0), 6, contexts,
               absl::MakeSpan(out));
  return out;
}

TEST(AdaKvBudget, SplitsTheLayersSlotsByOneGlobalTopKWithAFloor) {
  const std::vector<TokenHead> heads = {
      TokenHead({0.6f, 0.5f, 0.4f, 0.3f, 0.2f, 0.1f}, 4, 0),
      TokenHead({0.05f, 0.04f, 0.03f, 0.35f, 0.25f, 0.15f}, 4, 1)};
  // B = 5: the top 10 of 12 leave out 0.04 and 0.03, so n = (6, 4).
  // α = 0.2: floor(α B) = 1; caps 6 * 0.8 + 1 = 5.8 -> 6 and 4 * 0.8 + 1 = 4.2 -> 4.
  auto ada = AdaKvBudget::Create({.tokens = 5, .floor_alpha = 0.2});
  ASSERT_TRUE(ada.ok());
  EXPECT_EQ(AdaAllocate(**ada, heads), (V{6, 4}));
  // α = 0.5: floor(2.5) = 2; 6 * 0.5 + 2 = 5, 4 * 0.5 + 2 = 4.
  ada = AdaKvBudget::Create({.tokens = 5, .floor_alpha = 0.5});
  EXPECT_EQ(AdaAllocate(**ada, heads), (V{5, 4}));
  // α = 1: uniform.
  ada = AdaKvBudget::Create({.tokens = 5, .floor_alpha = 1.0});
  EXPECT_EQ(AdaAllocate(**ada, heads), (V{5, 5}));
}

TEST(AdaKvBudget, TiesGoToTheLowerHeadAndTheSumStaysWithinHB) {
  const std::vector<TokenHead> heads = {TokenHead({0.5f, 0.5f, 0.5f}, 4, 0),
                                        TokenHead({0.5f, 0.5f, 0.5f}, 4, 1)};
  auto ada = AdaKvBudget::Create({.tokens = 2, .floor_alpha = 0.0});
  EXPECT_EQ(AdaAllocate(**ada, heads), (V{3, 1}));
  // α = 0.5, B = 3 (total 6 = all 6 tokens): under budget, each keeps what it holds.
  ada = AdaKvBudget::Create({.tokens = 3, .floor_alpha = 0.5});
  EXPECT_EQ(AdaAllocate(**ada, heads), (V{3, 3}));
  // Rounding: B = 2, α = 0.5: n = (3, 1), caps 3 * .5 + 1 = 2.5 -> 3, 1.5 -> 2 = 5 > 4: the
  // lower head's round-up goes back first.
  ada = AdaKvBudget::Create({.tokens = 2, .floor_alpha = 0.5});
  const V caps = AdaAllocate(**ada, heads);
  EXPECT_EQ(caps, (V{2, 2}));
  EXPECT_LE(Sum(caps), 4);
}

TEST(AdaKvBudget, UnscoredTokensWinTheirOwnHeadsSlots) {
  // Head 0: 3 tokens no query has seen and 3 scored low; head 1: 6 scored high. B = 3, α = 0:
  // head 0 wins its 3 unscored, the 3 open slots go to head 1's best: n = (3, 3).
  const std::vector<TokenHead> heads = {
      TokenHead({0.01f, 0.02f, 0.03f, kUnscored, kUnscored, kUnscored}, 4, 0),
      TokenHead({0.5f, 0.4f, 0.3f, 0.2f, 0.2f, 0.2f}, 4, 1)};
  auto ada = AdaKvBudget::Create({.tokens = 3, .floor_alpha = 0.0});
  EXPECT_EQ(AdaAllocate(**ada, heads), (V{3, 3}));
  // More unscored tokens than slots: head 0 keeps its 3 unscored; nothing open for head 1; the
  // caps still sum to at most H * B.
  ada = AdaKvBudget::Create({.tokens = 1, .floor_alpha = 0.0});
  const V caps = AdaAllocate(**ada, heads);
  EXPECT_LE(Sum(caps), 2);
  EXPECT_EQ(caps[1], 0);
}

TEST(AdaKvBudget, WithoutScoresEveryHeadGetsB) {
  auto ada = AdaKvBudget::Create({.tokens = 7});
  ASSERT_TRUE(ada.ok());
  EXPECT_EQ(AdaAllocate(**ada, {TokenHead::Unscored(20, 4), TokenHead::Unscored(20, 4)}),
            (V{7, 7}));
  V out(2);
  (*ada)->Allocate(Layout(1, 4, 2), HeadRoles(1, 2, HeadRole::kRetrieval), LayerId(0), 20, {},
                   absl::MakeSpan(out));
  EXPECT_EQ(out, (V{7, 7}));
  EXPECT_EQ(AdaKvBudget::Create({.tokens = 4, .floor_alpha = 1.5}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AdaKvBudget::Create({.tokens = -1}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

headwise::v1::InlineHeadScores Scores(int layers, int heads, std::vector<double> values) {
  headwise::v1::InlineHeadScores s;
  s.set_num_layers(layers);
  s.set_num_heads(heads);
  for (double v : values) s.add_scores(v);
  return s;
}

TEST(HeadKvBudget, DistributesThePoolByImportance) {
  const ModelLayout layout = Layout(1, 2, 2);
  // s = (0.75, 0.25); floor(10 / 2) = 5; Pool = 5 * 2 = 10; caps 7.5 + 5 = 12.5 and 2.5 + 5 =
  // 7.5 -> 13 + 8 = 21 > 20: the lower head's round-up goes back: 12, 8.
  auto h = HeadKvBudget::Create({.tokens = 10, .beta = 2, .temperature = 1}, Scores(1, 2, {3, 1}),
                                layout);
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ((*h)->caps(), (V{12, 8}));
  // temperature 2: (0.5625, 0.0625) / 0.625 = (0.9, 0.1): 9 + 5, 1 + 5.
  h = HeadKvBudget::Create({.tokens = 10, .beta = 2, .temperature = 2}, Scores(1, 2, {3, 1}),
                           layout);
  EXPECT_EQ((*h)->caps(), (V{14, 6}));
  V out(2);
  (*h)->Allocate(layout, HeadRoles(1, 2, HeadRole::kRetrieval), LayerId(0), 100, {},
                 absl::MakeSpan(out));
  EXPECT_EQ(out, (V{14, 6}));
}

TEST(HeadKvBudget, AveragesQueryHeadCapacitiesOverEachGroup) {
  const ModelLayout layout = Layout(1, 4, 2);  // g = 2.
  // s = (1, 0, 0, 0); Pool = 5 * 4 = 20; per query head 25, 5, 5, 5; kv heads 15 and 5.
  auto h = HeadKvBudget::Create({.tokens = 10, .beta = 2}, Scores(1, 4, {4, 0, 0, 0}), layout);
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ((*h)->caps(), (V{15, 5}));
}

TEST(HeadKvBudget, RejectsBadScoresAndOptions) {
  const ModelLayout layout = Layout(2, 4, 2);
  const auto code = [&](HeadKvBudget::Options o, headwise::v1::InlineHeadScores s) {
    return HeadKvBudget::Create(o, s, layout).status().code();
  };
  const auto ok = Scores(2, 2, {1, 2, 3, 4});
  EXPECT_EQ(code({.tokens = 8}, ok), absl::StatusCode::kOk);
  EXPECT_EQ(code({.tokens = 8}, Scores(2, 2, {0, 0, 0, 0})), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code({.tokens = 8}, Scores(2, 2, {1, -1, 0, 0})), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code({.tokens = 8}, Scores(2, 3, {1, 1, 1, 1, 1, 1})),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code({.tokens = 8}, Scores(2, 2, {1, 1, 1})), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code({.tokens = 8}, Scores(2, 2, {1, std::nan(""), 1, 1})),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code({.tokens = 8, .beta = 0.9}, ok), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code({.tokens = 8, .temperature = 0}, ok), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code({.tokens = 0}, ok), absl::StatusCode::kInvalidArgument);
  // The caps of a valid matrix sum to exactly L * H * B here.
  auto h = HeadKvBudget::Create({.tokens = 8}, ok, layout);
  EXPECT_LE(Sum((*h)->caps()), 2 * 2 * 8);
}

TEST(BudgetSpec, NamesAndDefaultsFromThePolicySpec) {
  headwise::v1::PolicySpec spec;
  EXPECT_EQ(BudgetAllocatorName(spec), "uniform");
  auto none = CreateBudgetAllocator(spec, Layout(1, 4, 2));
  ASSERT_TRUE(none.ok());
  V out(2);
  (*none)->Allocate(Layout(1, 4, 2), HeadRoles(1, 2, HeadRole::kRetrieval), LayerId(0), 10, {},
                    absl::MakeSpan(out));
  EXPECT_EQ(out, (V{kUnlimitedTokens, kUnlimitedTokens}));
  spec.mutable_budget()->mutable_uniform()->set_tokens(0);
  EXPECT_EQ(CreateBudgetAllocator(spec, Layout(1, 4, 2)).status().code(),
            absl::StatusCode::kInvalidArgument);
  // AdaKV's floor defaults to 0.2 on a GQA layout and 0.5 on MHA (the n = (6, 4) case above).
  spec.mutable_budget()->mutable_ada_kv()->set_tokens(5);
  EXPECT_EQ(BudgetAllocatorName(spec), "ada_kv");
  const std::vector<TokenHead> heads = {
      TokenHead({0.6f, 0.5f, 0.4f, 0.3f, 0.2f, 0.1f}, 4, 0),
      TokenHead({0.05f, 0.04f, 0.03f, 0.35f, 0.25f, 0.15f}, 4, 1)};
  std::vector<HeadContext> contexts = {heads[0].Context(), heads[1].Context()};
  for (auto [q_heads, expected] : {std::make_pair(4, V{6, 4}), std::make_pair(2, V{5, 4})}) {
    const ModelLayout layout = Layout(1, q_heads, 2);
    auto ada = CreateBudgetAllocator(spec, layout);
    ASSERT_TRUE(ada.ok());
    (*ada)->Allocate(layout, HeadRoles(1, 2, HeadRole::kRetrieval), LayerId(0), 6, contexts,
                     absl::MakeSpan(out));
    EXPECT_EQ(out, expected) << q_heads;
  }
  // Through the stack.
  const ModelLayout layout = Layout(1, 4, 2);
  spec.mutable_budget()->mutable_pyramid_kv()->set_tokens(32);
  auto stack = PolicyStack::Create(spec, StackEnv{.layout = &layout});
  ASSERT_TRUE(stack.ok()) << stack.status();
  EXPECT_NE((*stack)->Describe().find("budget=pyramid_kv"), std::string::npos);
  spec.mutable_budget()->mutable_head_kv()->set_tokens(32);
  EXPECT_EQ(PolicyStack::Create(spec, StackEnv{.layout = &layout}).status().code(),
            absl::StatusCode::kInvalidArgument);  // No scores.
}

}  // namespace
}  // namespace headwise
