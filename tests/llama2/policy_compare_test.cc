// ComparePolicies on the real stories260K model: the full cache agrees with itself everywhere,
// every policy holds less KV than the full cache at the end, and agrees everywhere before its
// budget is reached (nothing is dropped yet).
#include "clients/llama2/policy_compare.h"

#include "clients/llama2/checkpoint.h"
#include "clients/llama2/embedded_backend.h"
#include "gtest/gtest.h"
#include "tests/llama2/stories260k.h"

namespace headwise::llama2 {
namespace {

TEST(PolicyCompare, FullCacheAgreesAndPoliciesHoldLess) {
  if (!testing::HaveModel()) GTEST_SKIP() << "stories260K is not beside the checkout";
  absl::StatusOr<Checkpoint> checkpoint = LoadCheckpoint(testing::CheckpointPath());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  auto backend = EmbeddedBackend::Create({});
  ASSERT_TRUE(backend.ok()) << backend.status();
  // Within the budget nothing is evicted: every policy must agree on all 48 positions.
  absl::StatusOr<std::vector<ComparisonRow>> short_run =
      ComparePolicies(*checkpoint, **backend, 48, 16, DefaultComparison(64));
  ASSERT_TRUE(short_run.ok()) << short_run.status();
  ASSERT_EQ(short_run->size(), 5u);
  for (const ComparisonRow& row : *short_run) EXPECT_EQ(row.agree, 48) << row.name;
  absl::StatusOr<std::vector<ComparisonRow>> rows =
      ComparePolicies(*checkpoint, **backend, 200, 16, DefaultComparison(64));
  ASSERT_TRUE(rows.ok()) << rows.status();
  EXPECT_EQ((*rows)[0].name, "full cache");
  EXPECT_EQ((*rows)[0].agree, 200);
  for (size_t i = 1; i < rows->size(); ++i) {
    EXPECT_GT((*rows)[i].agree, 150) << (*rows)[i].name;  // Far better than chance.
    EXPECT_LE((*rows)[i].agree, 200);
    EXPECT_NE((*rows)[i].stats, (*rows)[0].stats);
  }
}

}  // namespace
}  // namespace headwise::llama2
