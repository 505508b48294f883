#include <set>

#include "absl/container/flat_hash_set.h"
#include "cachesvc/base/clock.h"
#include "cachesvc/base/ids.h"
#include "cachesvc/base/status_macros.h"
#include "gtest/gtest.h"

namespace headwise {
namespace {

TEST(PageId, KeepsTierAndSlotApart) {
  const PageId id(Tier::kDisk, 123456789);
  EXPECT_EQ(id.tier(), Tier::kDisk);
  EXPECT_EQ(id.slot(), 123456789u);
  EXPECT_NE(PageId(Tier::kHost, 5), PageId(Tier::kDevice, 5));
}

TEST(SequenceId, RandomIdsAreDistinctAndHexIs32Digits) {
  absl::BitGen gen;
  absl::flat_hash_set<SequenceId> seen;
  for (int i = 0; i < 10000; ++i) ASSERT_TRUE(seen.insert(SequenceId::Random(gen)).second);
  EXPECT_EQ(SequenceId(0xab, 0xcd).ToHex(), "00000000000000ab00000000000000cd");
}

TEST(FakeClock, MovesOnlyWhenAdvanced) {
  FakeClock clock;
  const absl::Time t0 = clock.Now();
  EXPECT_EQ(clock.Now(), t0);
  clock.Advance(absl::Seconds(3));
  EXPECT_EQ(clock.Now() - t0, absl::Seconds(3));
  EXPECT_GT(Clock::Real()->Now(), absl::FromUnixSeconds(1700000000));
}

absl::StatusOr<int> Half(int x) {
  if (x % 2 != 0) return absl::InvalidArgumentError("odd");
  return x / 2;
}

absl::StatusOr<int> Quarter(int x) {
  ASSIGN_OR_RETURN(const int half, Half(x));
  ASSIGN_OR_RETURN(int quarter, Half(half));
  return quarter;
}

absl::Status CheckEven(int x) {
  RETURN_IF_ERROR(Half(x).status());
  return absl::OkStatus();
}

TEST(StatusMacros, PropagateErrorsAndValues) {
  EXPECT_EQ(*Quarter(8), 2);
  EXPECT_EQ(Quarter(6).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(CheckEven(4).ok());
  EXPECT_FALSE(CheckEven(3).ok());
}

}  // namespace
}  // namespace headwise
