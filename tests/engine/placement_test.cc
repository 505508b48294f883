#include "cachesvc/placement.h"

#include "gtest/gtest.h"

namespace headwise {
namespace {

TEST(Placement, ResolvesDefaultsAndModes) {
  headwise::v1::PolicySpec spec;
  auto p = ResolvePlacement(spec);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->mode, PlacementMode::kDeviceOnly);
  EXPECT_EQ(p->home_tier(), Tier::kDevice);
  EXPECT_EQ(p->heads_ahead(), 0);
  spec.mutable_placement()->set_mode(headwise::v1::Placement::HEAD_OFFLOAD);
  spec.mutable_placement()->set_device_head_groups(4);
  spec.mutable_placement()->set_prefetch_depth(2);
  p = ResolvePlacement(spec);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->home_tier(), Tier::kHost);
  EXPECT_EQ(p->heads_ahead(), 2);
  spec.mutable_placement()->set_device_head_groups(0);
  EXPECT_EQ(ResolvePlacement(spec).status().code(), absl::StatusCode::kInvalidArgument);
  spec.mutable_placement()->set_device_head_groups(2);
  spec.mutable_placement()->set_prefetch_depth(-1);
  EXPECT_EQ(ResolvePlacement(spec).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Placement, SpillVictimsAreColdestFirst) {
  std::vector<SpillCandidate> c = {{0, 5, 0}, {1, 2, 8}, {2, 2, 4}, {3, 9, 0}};
  EXPECT_EQ(ChooseSpillVictims(c, 2), (std::vector<int64_t>{2, 1}));
  EXPECT_EQ(ChooseSpillVictims(c, 10).size(), 4u);
  EXPECT_TRUE(ChooseSpillVictims(c, 0).empty());
}

}  // namespace
}  // namespace headwise
