// Merge policies (policies/merge.h; policies.md §6) on small heads with expectations computed by
// hand from the formulas: CaM's probability, draw and value spread; D2O's cosine match, EMA
// threshold and weights; the count-biased mean's weights and bias.
#include "policies/merge.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "policies/policy_stack.h"
#include "tests/policies/token_head_helpers.h"

namespace headwise {
namespace {

using testing_helpers::TokenHead;

// A head of n tokens, pages of 2 tokens, head_dim 2, with the given keys ([n][2]).
struct KeyedHead {
  TokenHead tokens;
  std::vector<float> keys;
  std::vector<float> state;
  HeadContext Context() const {
    HeadContext head = tokens.Context();
    head.head_dim = 2;
    head.keys = keys;
    head.merge_state = state;
    return head;
  }
};

TEST(MergeSpecTest, DefaultsAndRangeChecks) {
  headwise::v1::PolicySpec spec;
  auto none = ResolveMergeSpec(spec);
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->method, MergeSpec::Method::kNone);
  spec.mutable_merge()->mutable_cam();
  auto cam = ResolveMergeSpec(spec);
  ASSERT_TRUE(cam.ok());
  EXPECT_EQ(cam->cam_span, 16);
  spec.mutable_merge()->mutable_cam()->set_span(0);
  EXPECT_EQ(ResolveMergeSpec(spec).status().code(), absl::StatusCode::kInvalidArgument);
  spec.mutable_merge()->mutable_d2o()->set_alpha(1.5);
  EXPECT_EQ(ResolveMergeSpec(spec).status().code(), absl::StatusCode::kInvalidArgument);
  spec.mutable_merge()->mutable_d2o()->set_alpha(0.25);
  auto d2o = ResolveMergeSpec(spec);
  ASSERT_TRUE(d2o.ok());
  EXPECT_DOUBLE_EQ(d2o->d2o_alpha, 0.25);
  EXPECT_DOUBLE_EQ(d2o->d2o_beta, 0.5);
}

TEST(MergeSpecTest, StackNeedsAnEvictionAndAddsScoresForCam) {
  const ModelLayout layout = testing_helpers::SmallLayout();
  headwise::v1::PolicySpec spec;
  spec.mutable_merge()->mutable_mean();
  EXPECT_EQ(PolicyStack::Create(spec, {.layout = &layout}).status().code(),
            absl::StatusCode::kInvalidArgument);
  spec.mutable_eviction()->mutable_streaming_llm();
  spec.mutable_merge()->mutable_cam();
  auto stack = PolicyStack::Create(spec, {.layout = &layout});
  ASSERT_TRUE(stack.ok()) << stack.status();
  ASSERT_NE((*stack)->merger(), nullptr);
  EXPECT_EQ((*stack)->merger()->name(), "cam");
  ASSERT_NE((*stack)->scorer(), nullptr);
  EXPECT_EQ((*stack)->scorer()->name(), "accumulated_attention");
  EXPECT_NE((*stack)->Describe().find("merge=cam"), std::string::npos);
}

TEST(MergeTest, SplitByDropsFollowsPositions) {
  const TokenHead head = TokenHead::Unscored(6, 2);  // Pages {0,1} {2,3} {4,5}.
  HeadActions drops;
  drops.drop_pages = {0};
  drops.drop_tokens = {TokenRef{1, 1}};
  const HeadSplit split = SplitByDrops(head.Context(), drops);
  EXPECT_EQ(split.dropped, (std::vector<TokenRef>{{0, 0}, {0, 1}, {1, 1}}));
  EXPECT_EQ(split.kept, (std::vector<TokenRef>{{1, 0}, {2, 0}, {2, 1}}));
}

TEST(MergeTest, KeyCosineByHand) {
  KeyedHead h{TokenHead::Unscored(4, 2), {3, 4, 4, 3, 0, 0, NAN, 1}, {}};
  const HeadContext head = h.Context();
  EXPECT_NEAR(KeyCosine(head, {0, 0}, {0, 1}), 24.0 / 25.0, 1e-6);
  EXPECT_EQ(KeyCosine(head, {0, 0}, {1, 0}), 0.0f);  // A zero key.
  EXPECT_TRUE(std::isnan(KeyCosine(head, {0, 0}, {1, 1})));
}

TEST(CamTest, ProbabilityAndDraw) {
  EXPECT_FLOAT_EQ(CamMergeProbability(0.2f, 0.8f), 0.25f);
  EXPECT_FLOAT_EQ(CamMergeProbability(2.0f, 0.8f), 1.0f);
  EXPECT_FLOAT_EQ(CamMergeProbability(0.5f, 0.0f), 0.0f);
  EXPECT_FLOAT_EQ(CamMergeProbability(INFINITY, 0.1f), 1.0f);
  const double u = CamDraw(7, 1, 2, 100);
  EXPECT_EQ(u, CamDraw(7, 1, 2, 100));
  EXPECT_NE(u, CamDraw(7, 1, 2, 101));
  EXPECT_NE(u, CamDraw(8, 1, 2, 100));
  double sum = 0.0;
  for (int p = 0; p < 4000; ++p) {
    const double x = CamDraw(3, 0, 0, p);
    ASSERT_GE(x, 0.0);
    ASSERT_LT(x, 1.0);
    sum += x;
  }
  EXPECT_NEAR(sum / 4000, 0.5, 0.02);
}

TEST(CamTest, SpreadsACertainTokensValueOverTheNextKeptTokens) {
  // Scores: token 1 equals the kept maximum (p = 1), token 2 has none (p = 0).
  const TokenHead head({0.5f, 0.9f, 0.0f, 0.9f, 0.1f, 0.3f}, 2);
  HeadActions drops;
  drops.drop_tokens = {TokenRef{0, 1}, TokenRef{1, 0}};
  MergeSpec spec;
  spec.method = MergeSpec::Method::kCam;
  spec.cam_span = 2;
  const CamMergePolicy cam(spec);
  auto plan = cam.Plan(head.Context(), drops);
  ASSERT_TRUE(plan.ok()) << plan.status();
  // Kept: positions 0, 3, 4, 5. Token 1's value goes to the 2 kept tokens after it (3 and 4),
  // half each; keys untouched; no bias.
  ASSERT_EQ(plan->groups.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const MergeGroup& g = plan->groups[i];
    EXPECT_EQ(g.into, (i == 0 ? TokenRef{1, 1} : TokenRef{2, 0}));
    EXPECT_FLOAT_EQ(g.k_self, 1.0f);
    EXPECT_FLOAT_EQ(g.v_self, 1.0f);
    EXPECT_FALSE(g.count_bias);
    ASSERT_EQ(g.sources.size(), 1u);
    EXPECT_EQ(g.sources[0].from, (TokenRef{0, 1}));
    EXPECT_FLOAT_EQ(g.sources[0].k_weight, 0.0f);
    EXPECT_FLOAT_EQ(g.sources[0].v_weight, 0.5f);
  }
}

TEST(CamTest, FewerKeptTokensThanTheSpanShareTheValue) {
  const TokenHead head({1.0f, 1.0f, 1.0f, 1.0f}, 2);
  HeadActions drops;
  drops.drop_tokens = {TokenRef{1, 0}};  // Only position 3 is kept after it.
  MergeSpec spec;
  spec.method = MergeSpec::Method::kCam;
  const CamMergePolicy cam(spec);  // Span 16.
  auto plan = cam.Plan(head.Context(), drops);
  ASSERT_TRUE(plan.ok());
  ASSERT_EQ(plan->groups.size(), 1u);
  EXPECT_EQ(plan->groups[0].into, (TokenRef{1, 1}));
  EXPECT_FLOAT_EQ(plan->groups[0].sources[0].v_weight, 1.0f);
}

TEST(D2oTest, MatchesThresholdsAndWeightsByHand) {
  // Keys: kept 0 = (1, 0), kept 1 = (0, 1); dropped 2 = (1, 1) (cos 0.7071 to both: the earlier
  // wins), dropped 3 = (1, 0.1) (cos 0.99504 to kept 0). tau_0 = mean = 0.85107: only token 3
  // is merged, into token 0, with n_c = 1: k_0 <- (k_0 + 0.99504 k_3) / 2.
  KeyedHead h{TokenHead::Unscored(4, 2), {1, 0, 0, 1, 1, 1, 1, 0.1f}, {}};
  HeadActions drops;
  drops.drop_pages = {1};
  MergeSpec spec;
  spec.method = MergeSpec::Method::kD2o;
  const D2oMergePolicy d2o(spec);
  auto plan = d2o.Plan(h.Context(), drops);
  ASSERT_TRUE(plan.ok()) << plan.status();
  const double s2 = 1.0 / std::sqrt(2.0);
  const double s3 = 1.0 / std::sqrt(1.01);
  ASSERT_TRUE(plan->set_state);
  ASSERT_EQ(plan->state.size(), 1u);
  EXPECT_NEAR(plan->state[0], (s2 + s3) / 2, 1e-6);
  ASSERT_EQ(plan->groups.size(), 1u);
  const MergeGroup& g = plan->groups[0];
  EXPECT_EQ(g.into, (TokenRef{0, 0}));
  EXPECT_FLOAT_EQ(g.k_self, 0.5f);
  EXPECT_FLOAT_EQ(g.v_self, 0.5f);
  ASSERT_EQ(g.sources.size(), 1u);
  EXPECT_EQ(g.sources[0].from, (TokenRef{1, 1}));
  EXPECT_NEAR(g.sources[0].k_weight, s3 / 2, 1e-6);
  EXPECT_NEAR(g.sources[0].v_weight, s3 / 2, 1e-6);

  // With a previous threshold of 0.2 (alpha = beta = 0.5): tau = 0.1 + 0.5 * 0.85107 = 0.52554,
  // so both are merged into token 0 (n_c = 2, weights s / 3).
  h.state = {0.2f};
  plan = d2o.Plan(h.Context(), drops);
  ASSERT_TRUE(plan.ok());
  EXPECT_NEAR(plan->state[0], 0.1 + 0.5 * (s2 + s3) / 2, 1e-6);
  ASSERT_EQ(plan->groups.size(), 1u);
  EXPECT_FLOAT_EQ(plan->groups[0].k_self, 1.0f / 3);
  ASSERT_EQ(plan->groups[0].sources.size(), 2u);
  EXPECT_NEAR(plan->groups[0].sources[0].k_weight, s2 / 3, 1e-6);
  EXPECT_NEAR(plan->groups[0].sources[1].k_weight, s3 / 3, 1e-6);
}

TEST(D2oTest, UnreadableKeysAreNeverMatchedAndMissingKeysAreAnError) {
  KeyedHead h{TokenHead::Unscored(4, 2), {1, 0, 0, 1, NAN, NAN, NAN, NAN}, {}};
  HeadActions drops;
  drops.drop_pages = {1};
  MergeSpec spec;
  spec.method = MergeSpec::Method::kD2o;
  const D2oMergePolicy d2o(spec);
  auto plan = d2o.Plan(h.Context(), drops);
  ASSERT_TRUE(plan.ok());
  EXPECT_TRUE(plan->groups.empty());
  EXPECT_FALSE(plan->set_state);
  h.keys.clear();
  EXPECT_EQ(d2o.Plan(h.Context(), drops).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(MeanMergeTest, CountWeightedMeanWithLogCountBias) {
  // Kept token 0 already stands for 2 tokens (bias ln 2); dropped token 2 (count 1) is most
  // similar to it: weights 2/3 and 1/3, count bias. Dropped token 3 joins kept token 1.
  KeyedHead h{TokenHead::Unscored(4, 2), {1, 0, 0, 1, 1, 0.2f, 0.1f, 1}, {}};
  std::vector<PageMeta> pages(h.tokens.Context().pages.begin(), h.tokens.Context().pages.end());
  pages[0].bias = {std::log(2.0f), 0.0f};
  HeadContext head = h.Context();
  head.pages = pages;
  HeadActions drops;
  drops.drop_pages = {1};
  auto plan = MeanMergePolicy().Plan(head, drops);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->groups.size(), 2u);
  EXPECT_EQ(plan->groups[0].into, (TokenRef{0, 0}));
  EXPECT_TRUE(plan->groups[0].count_bias);
  EXPECT_NEAR(plan->groups[0].k_self, 2.0 / 3, 1e-6);
  EXPECT_NEAR(plan->groups[0].sources[0].k_weight, 1.0 / 3, 1e-6);
  EXPECT_EQ(plan->groups[0].sources[0].from, (TokenRef{1, 0}));
  EXPECT_EQ(plan->groups[1].into, (TokenRef{0, 1}));
  EXPECT_FLOAT_EQ(plan->groups[1].k_self, 0.5f);
  EXPECT_FLOAT_EQ(plan->groups[1].sources[0].v_weight, 0.5f);
}

}  // namespace
}  // namespace headwise
