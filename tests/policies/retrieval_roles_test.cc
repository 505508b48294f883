// Head roles from Retrieval Head scores (policies.md §4): the authors' JSON format parsed
// without echoing a byte of it, query heads reduced to kv heads, threshold (0.1) and top
// fraction selection with deterministic ties, and files named only inside the pattern
// directory.
#include "policies/retrieval_roles.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "policies/budgets.h"
#include "policies/eviction.h"
#include "policies/pattern_directory.h"
#include "policies/policy_stack.h"
#include "tests/policies/token_head_helpers.h"

namespace headwise {
namespace {

namespace fs = std::filesystem;
using headwise::v1::RetrievalScoreRoles;

constexpr char kSecret[] = "SECRET-51c0";

// 2 layers, 4 query heads, 2 kv heads (g = 2).
ModelLayout Layout() { return testing_helpers::SmallLayout(); }

std::string Roles(const HeadRoles& roles) { return roles.DebugString(); }

TEST(ParseRetrievalScores, TakesTheMeanOfEachHeadsTrials) {
  auto s = ParseRetrievalScores(R"({"0-1": [0.2, 0.4], "1-3": 0.05, "1-0": [], "0-0": [0, 1]})",
                                Layout(), "test");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->num_layers(), 2);
  EXPECT_EQ(s->num_heads(), 4);
  const std::vector<double> got(s->scores().begin(), s->scores().end());
  EXPECT_EQ(got.size(), 8u);
  EXPECT_NEAR(got[0], 0.5, 1e-12);
  EXPECT_NEAR(got[1], 0.3, 1e-12);
  EXPECT_EQ(got[2], 0.0);  // Absent.
  EXPECT_EQ(got[4], 0.0);  // Empty list.
  EXPECT_NEAR(got[7], 0.05, 1e-12);
}

TEST(ParseRetrievalScores, RejectsMalformedFilesWithoutQuotingThem) {
  const std::string s = kSecret;
  const std::string bad[] = {
      "[" + s + "]",                      // Not JSON / not an object.
      "[1, 2]",                           // Not an object.
      R"({")" + s + R"(": 1})",           // Key not <layer>-<head>.
      R"({"0-)" + s + R"(": 1})",         // Key not <layer>-<head>.
      R"({"2-0": 1})",                    // Layer out of range.
      R"({"0-4": 1})",                    // Query head out of range.
      R"({"0-0": ")" + s + R"("})",       // Not a number.
      R"({"0-0": [1, ")" + s + R"("]})",  // Not a list of numbers.
      R"({"0-0": [-1]})",                 // Negative.
      R"({"-1": 1})",
  };
  for (const std::string& text : bad) {
    auto r = ParseRetrievalScores(text, Layout(), "pattern 'x'");
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << text;
    EXPECT_EQ(r.status().message().find(kSecret), std::string::npos) << r.status();
    EXPECT_NE(r.status().message().find("pattern 'x'"), std::string::npos) << r.status();
  }
}

headwise::v1::InlineHeadScores Scores(std::vector<double> v, int heads = 4) {
  headwise::v1::InlineHeadScores s;
  s.set_num_layers(2);
  s.set_num_heads(heads);
  for (double x : v) s.add_scores(x);
  return s;
}

TEST(KvHeadScores, ReducesEachGroupByMaxOrMean) {
  // Layer 0: q heads 0.5 0.3 | 0 0; layer 1: 0 0 | 0 0.05.
  const auto s = Scores({0.5, 0.3, 0, 0, 0, 0, 0, 0.05});
  const auto max = KvHeadScores(s, Layout(), headwise::v1::GROUP_REDUCTION_UNSPECIFIED,
                                headwise::v1::GROUP_REDUCTION_MAX);
  EXPECT_EQ(max, (std::vector<double>{0.5, 0, 0, 0.05}));
  const auto mean = KvHeadScores(s, Layout(), headwise::v1::GROUP_REDUCTION_MEAN,
                                 headwise::v1::GROUP_REDUCTION_MAX);
  EXPECT_NEAR(mean[0], 0.4, 1e-12);
  EXPECT_NEAR(mean[3], 0.025, 1e-12);
  // Per-kv-head scores pass through.
  const auto kv =
      KvHeadScores(Scores({1, 2, 3, 4}, 2), Layout(), headwise::v1::GROUP_REDUCTION_MEAN,
                   headwise::v1::GROUP_REDUCTION_MAX);
  EXPECT_EQ(kv, (std::vector<double>{1, 2, 3, 4}));
}

TEST(SelectRetrievalHeads, ThresholdDefaultsToThePapersPointOne) {
  const ModelLayout layout = Layout();
  RetrievalScoreRoles config;
  // Default threshold 0.1: strictly above.
  auto roles = SelectRetrievalHeads({0.5, 0.1, 0.0, 0.11}, layout, config);
  ASSERT_TRUE(roles.ok());
  EXPECT_EQ(Roles(*roles), Roles([&] {
              HeadRoles r(2, 2, HeadRole::kStreaming);
              r.set_role(LayerId(0), HeadId(0), HeadRole::kRetrieval);
              r.set_role(LayerId(1), HeadId(1), HeadRole::kRetrieval);
              return r;
            }()));
  config.set_threshold(0.6);
  EXPECT_EQ(
      SelectRetrievalHeads({0.5, 0.1, 0.0, 0.11}, layout, config)->Count(HeadRole::kRetrieval), 0);
  config.set_threshold(NAN);
  EXPECT_EQ(SelectRetrievalHeads({0.5, 0.1, 0.0, 0.11}, layout, config).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SelectRetrievalHeads, TopFractionBreaksTiesByLayerThenHead) {
  const ModelLayout layout = Layout();
  RetrievalScoreRoles config;
  config.set_top_fraction(0.5);  // ceil(0.5 * 4) = 2 heads.
  auto roles = SelectRetrievalHeads({0.2, 0.3, 0.3, 0.1}, layout, config);
  ASSERT_TRUE(roles.ok());
  EXPECT_EQ(roles->role(LayerId(0), HeadId(1)), HeadRole::kRetrieval);
  EXPECT_EQ(roles->role(LayerId(1), HeadId(0)), HeadRole::kRetrieval);
  EXPECT_EQ(roles->Count(HeadRole::kRetrieval), 2);
  config.set_top_fraction(0.25);  // All tied: the first head.
  roles = SelectRetrievalHeads({0, 0, 0, 0}, layout, config);
  EXPECT_EQ(roles->role(LayerId(0), HeadId(0)), HeadRole::kRetrieval);
  EXPECT_EQ(roles->Count(HeadRole::kRetrieval), 1);
  config.set_top_fraction(0.3);  // ceil(1.2) = 2.
  EXPECT_EQ(SelectRetrievalHeads({0, 0, 0, 0}, layout, config)->Count(HeadRole::kRetrieval), 2);
  for (double bad : {-0.1, 1.5, static_cast<double>(NAN)}) {
    config.set_top_fraction(bad);
    EXPECT_EQ(SelectRetrievalHeads({0, 0, 0, 0}, layout, config).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
}

class RetrievalPatternTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = fs::temp_directory_path() / "hwretrieval.XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    base_ = pattern;
    fs::create_directories(base_ / "patterns");
    auto dir = PatternDirectory::Open(base_ / "patterns");
    ASSERT_TRUE(dir.ok());
    dir_ = *std::move(dir);
  }
  void TearDown() override { fs::remove_all(base_); }
  void Write(const std::string& name, const std::string& bytes) {
    const fs::path path = base_ / "patterns" / name / kRetrievalScoresFileName;
    fs::create_directories(path.parent_path());
    std::ofstream(path, std::ios::binary) << bytes;
  }
  absl::StatusOr<HeadRoles> Resolve(const std::string& name, const PatternDirectory* dir) {
    RetrievalScoreRoles config;
    config.set_pattern_name(name);
    auto roles = RetrievalScoreRoleSource(config, dir).Resolve(Layout());
    const std::string message(roles.status().message());
    EXPECT_EQ(message.find(kSecret), std::string::npos) << message;
    if (name.find(base_.string()) == std::string::npos) {  // Else the name itself holds it.
      EXPECT_EQ(message.find(base_.string()), std::string::npos) << message;
    }
    return roles;
  }

  fs::path base_;
  std::unique_ptr<PatternDirectory> dir_;
};

TEST_F(RetrievalPatternTest, ResolvesANamedScoreFileInsideTheDirectory) {
  Write("llama/scores", R"({"0-0": [0.9, 0.7], "0-3": [0.01], "1-2": [0.05, 0.25]})");
  auto roles = Resolve("llama/scores", dir_.get());
  ASSERT_TRUE(roles.ok()) << roles.status();
  // kv (0,0): max(0.8, 0) -> R; (0,1): max(0, 0.01) -> s; (1,0): 0 -> s; (1,1): 0.15 -> R.
  EXPECT_EQ(roles->role(LayerId(0), HeadId(0)), HeadRole::kRetrieval);
  EXPECT_EQ(roles->role(LayerId(0), HeadId(1)), HeadRole::kStreaming);
  EXPECT_EQ(roles->role(LayerId(1), HeadId(0)), HeadRole::kStreaming);
  EXPECT_EQ(roles->role(LayerId(1), HeadId(1)), HeadRole::kRetrieval);
}

TEST_F(RetrievalPatternTest, RefusesWhatTheDirectoryRulesRefuse) {
  Write("bad", std::string(R"({")") + kSecret + R"(": 1})");
  EXPECT_EQ(Resolve("bad", dir_.get()).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Resolve("missing", dir_.get()).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Resolve("../patterns/bad", dir_.get()).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Resolve(base_.string(), dir_.get()).status().code(),
            absl::StatusCode::kInvalidArgument);  // An absolute path is not a name.
  EXPECT_EQ(Resolve("bad", nullptr).status().code(), absl::StatusCode::kFailedPrecondition);
  // A link inside the directory is not followed, even to a valid file.
  Write("real", R"({"0-0": 1})");
  fs::create_directory_symlink(base_ / "patterns" / "real", base_ / "patterns" / "link");
  EXPECT_EQ(Resolve("link", dir_.get()).status().code(), absl::StatusCode::kFailedPrecondition);
  // Larger than the bound: refused before parsing.
  Write("huge", std::string(kMaxRetrievalScoresBytes + 1, ' '));
  EXPECT_EQ(Resolve("huge", dir_.get()).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(RetrievalPatternTest, HeadKvReadsItsScoresFromANamedPattern) {
  Write("headkv", R"({"0-0": [3, 5]})");  // Query head (0, 0) scores 4, every other 0.
  headwise::v1::PolicySpec spec;
  auto* h = spec.mutable_budget()->mutable_head_kv();
  h->set_tokens(10);
  h->set_beta(2);
  h->set_pattern_name("headkv");
  // N = 8 query heads, floor(10 / 2) = 5, Pool = 40: query caps 45 and 5 (x7); kv heads of
  // layer 0: (45 + 5) / 2 = 25 and 5; layer 1: 5 and 5 (sum 40 = L * H_kv * B).
  auto budget = CreateBudgetAllocator(spec, Layout(), dir_.get());
  ASSERT_TRUE(budget.ok()) << budget.status();
  std::vector<int64_t> out(2);
  (*budget)->Allocate(Layout(), HeadRoles(2, 2, HeadRole::kRetrieval), LayerId(0), 100, {},
                      absl::MakeSpan(out));
  EXPECT_EQ(out, (std::vector<int64_t>{25, 5}));
  (*budget)->Allocate(Layout(), HeadRoles(2, 2, HeadRole::kRetrieval), LayerId(1), 100, {},
                      absl::MakeSpan(out));
  EXPECT_EQ(out, (std::vector<int64_t>{5, 5}));
  EXPECT_EQ(CreateBudgetAllocator(spec, Layout(), nullptr).status().code(),
            absl::StatusCode::kFailedPrecondition);
  h->mutable_scores()->set_num_layers(2);
  EXPECT_EQ(CreateBudgetAllocator(spec, Layout(), dir_.get()).status().code(),
            absl::StatusCode::kInvalidArgument);  // Both sources.
  h->clear_scores();
  h->set_pattern_name("nothing-here");
  EXPECT_EQ(CreateBudgetAllocator(spec, Layout(), dir_.get()).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(RetrievalScoreRoles, InlineScoresThroughTheStackGiveStreamingHeadsTheWindow) {
  const ModelLayout layout = Layout();
  headwise::v1::PolicySpec spec;
  *spec.mutable_head_roles()->mutable_retrieval_scores()->mutable_inline_scores() =
      Scores({0.5, 0, 0, 0, 0, 0, 0, 0});
  auto stack = PolicyStack::Create(spec, StackEnv{.layout = &layout});
  ASSERT_TRUE(stack.ok()) << stack.status();
  EXPECT_NE((*stack)->Describe().find("roles=retrieval_scores"), std::string::npos);
  EXPECT_EQ((*stack)->actions().name(), "duo_attention");  // Streaming heads: sinks + recent.
  EXPECT_EQ((*stack)->roles().Count(HeadRole::kRetrieval), 1);
  // The same through ResolveHeadRoles (the planner's path).
  auto roles = ResolveHeadRoles(spec.head_roles(), layout, nullptr);
  ASSERT_TRUE(roles.ok());
  EXPECT_EQ(roles->Count(HeadRole::kRetrieval), 1);
  // Wrong shape, no scores at all.
  *spec.mutable_head_roles()->mutable_retrieval_scores()->mutable_inline_scores() =
      Scores({0.5, 0, 0});
  EXPECT_EQ(PolicyStack::Create(spec, StackEnv{.layout = &layout}).status().code(),
            absl::StatusCode::kInvalidArgument);
  spec.mutable_head_roles()->mutable_retrieval_scores()->clear_inline_scores();
  EXPECT_EQ(PolicyStack::Create(spec, StackEnv{.layout = &layout}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace headwise
