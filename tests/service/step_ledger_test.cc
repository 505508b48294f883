// StepLedger: the per-layer record of the last client step, with hand-computed expectations.
#include "cachesvc/service/step_ledger.h"

#include <gtest/gtest.h>

#include <vector>

namespace headwise {
namespace {

TEST(StepLedgerTest, OnlyTheLastStepOfALayerIsARetry) {
  StepLedger ledger(2);
  const std::vector<float> o = {1, 2, 3, 4}, lse = {5};
  ledger.Record(0, 7, StepKind::kDecode, 1, 10, o, lse);
  auto retry = ledger.FindRetry(0, 7, StepKind::kDecode, 1);
  ASSERT_TRUE(retry.ok());
  ASSERT_NE(*retry, nullptr);
  EXPECT_EQ((*retry)->layer_length, 10);
  EXPECT_TRUE((*retry)->has_outputs);
  EXPECT_EQ((*retry)->o, o);
  EXPECT_EQ((*retry)->lse, lse);
  // Another layer, another id, id 0: not retries.
  EXPECT_EQ(*ledger.FindRetry(1, 7, StepKind::kDecode, 1), nullptr);
  EXPECT_EQ(*ledger.FindRetry(0, 8, StepKind::kDecode, 1), nullptr);
  EXPECT_EQ(*ledger.FindRetry(0, 0, StepKind::kDecode, 1), nullptr);
  // The id reused by another kind or token count is an error.
  EXPECT_EQ(ledger.FindRetry(0, 7, StepKind::kAppend, 1).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ledger.FindRetry(0, 7, StepKind::kDecode, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A later step without an id forgets the record; so does Clear.
  ledger.Record(0, 0, StepKind::kAppend, 3, 13);
  EXPECT_EQ(*ledger.FindRetry(0, 7, StepKind::kDecode, 1), nullptr);
  ledger.Record(1, 9, StepKind::kAppend, 3, 13);
  ledger.Clear();
  EXPECT_EQ(*ledger.FindRetry(1, 9, StepKind::kAppend, 3), nullptr);
}

TEST(StepLedgerTest, OutputsAreKeptUpToTheCapAndRestoredRecordsMatchAnyKind) {
  StepLedger ledger(1);
  // 16383 + 1 floats = 64 KiB exactly: kept; one float more: not kept.
  const size_t cap_floats = StepLedger::kMaxRetainedOutputBytes / sizeof(float);
  std::vector<float> o(cap_floats - 1, 1.0f), lse(1, 2.0f);
  ledger.Record(0, 1, StepKind::kPrefill, 4, 4, o, lse);
  EXPECT_TRUE((*ledger.FindRetry(0, 1, StepKind::kPrefill, 4))->has_outputs);
  o.push_back(1.0f);
  ledger.Record(0, 2, StepKind::kPrefill, 4, 8, o, lse);
  const StepRecord* record = *ledger.FindRetry(0, 2, StepKind::kPrefill, 4);
  ASSERT_NE(record, nullptr);
  EXPECT_FALSE(record->has_outputs);
  EXPECT_TRUE(record->o.empty());
  EXPECT_EQ(record->layer_length, 8);
  // Appends keep no outputs.
  ledger.Record(0, 3, StepKind::kAppend, 2, 10, o, lse);
  EXPECT_FALSE((*ledger.FindRetry(0, 3, StepKind::kAppend, 2))->has_outputs);
  // A restored record (kind unknown) matches any kind with its token count.
  ledger.Record(0, 4, StepKind::kRestored, 1, 11);
  EXPECT_NE(*ledger.FindRetry(0, 4, StepKind::kDecode, 1), nullptr);
  EXPECT_NE(*ledger.FindRetry(0, 4, StepKind::kAppend, 1), nullptr);
  EXPECT_FALSE(ledger.FindRetry(0, 4, StepKind::kAppend, 2).ok());
}

}  // namespace
}  // namespace headwise
