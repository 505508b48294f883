#include "offload/internal/extent_allocator.h"

#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace headwise::offload_internal {
namespace {

TEST(ExtentAllocatorTest, FirstFitIsContiguousAndInOrder) {
  ExtentAllocator alloc(64);
  auto a = alloc.Allocate(16);
  auto b = alloc.Allocate(16);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(*a, (Extent{0, 16}));
  EXPECT_EQ(*b, (Extent{16, 16}));
  EXPECT_EQ(alloc.used_slots(), 32u);
  EXPECT_EQ(alloc.live_extents(), 2u);
  EXPECT_EQ(alloc.free_runs(), 1u);
}

TEST(ExtentAllocatorTest, FreedNeighboursCoalesce) {
  ExtentAllocator alloc(48);
  Extent a = *alloc.Allocate(16);
  Extent b = *alloc.Allocate(16);
  Extent c = *alloc.Allocate(16);
  EXPECT_EQ(alloc.free_runs(), 0u);
  ASSERT_TRUE(alloc.Free(a).ok());
  ASSERT_TRUE(alloc.Free(c).ok());
  EXPECT_EQ(alloc.free_runs(), 2u);
  EXPECT_EQ(alloc.largest_free_run(), 16u);
  // A 32-slot run does not fit until b is freed and all three merge.
  EXPECT_EQ(alloc.Allocate(32).status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(alloc.Free(b).ok());
  EXPECT_EQ(alloc.free_runs(), 1u);
  EXPECT_EQ(alloc.largest_free_run(), 48u);
  auto whole = alloc.Allocate(48);
  ASSERT_TRUE(whole.ok());
  EXPECT_EQ(*whole, (Extent{0, 48}));
}

TEST(ExtentAllocatorTest, PreferredStartGrowsInPlaceOrFallsBack) {
  ExtentAllocator alloc(64);
  Extent a = *alloc.Allocate(8);
  Extent grown = *alloc.Allocate(8, a.end_slot());
  EXPECT_EQ(grown.first_slot, a.end_slot());
  Extent other = *alloc.Allocate(8);  // [16, 24)
  EXPECT_EQ(other.first_slot, 16u);
  // Slots after `grown` are now taken: first-fit elsewhere.
  Extent moved = *alloc.Allocate(8, grown.end_slot());
  EXPECT_EQ(moved.first_slot, 24u);
}

TEST(ExtentAllocatorTest, PartialFreeSplitsAnAllocation) {
  ExtentAllocator alloc(16);
  Extent a = *alloc.Allocate(16);
  ASSERT_TRUE(alloc.Free(Extent{a.first_slot + 4, 2}).ok());
  EXPECT_EQ(alloc.used_slots(), 14u);
  EXPECT_EQ(alloc.live_extents(), 2u);
  EXPECT_EQ(*alloc.Allocate(2), (Extent{4, 2}));
}

TEST(ExtentAllocatorTest, RejectsDoubleFreeAndForeignRanges) {
  ExtentAllocator alloc(32);
  Extent a = *alloc.Allocate(8);
  Extent b = *alloc.Allocate(8);
  EXPECT_EQ(alloc.Free(Extent{0, 0}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(alloc.Free(Extent{30, 4}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(alloc.Free(Extent{20, 2}).code(), absl::StatusCode::kInvalidArgument);  // free
  // Spans two allocations.
  EXPECT_EQ(alloc.Free(Extent{4, 8}).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(alloc.Free(a).ok());
  EXPECT_EQ(alloc.Free(a).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(alloc.used_slots(), 8u);
  ASSERT_TRUE(alloc.Free(b).ok());
  EXPECT_EQ(alloc.used_slots(), 0u);
  EXPECT_EQ(alloc.free_runs(), 1u);
}

// Random allocate/free against a per-slot model: no slot handed out twice, accounting exact,
// and once everything is freed the space is one run again.
TEST(ExtentAllocatorTest, RandomOpsMatchASlotModel) {
  constexpr uint64_t kSlots = 257;
  ExtentAllocator alloc(kSlots);
  std::vector<bool> taken(kSlots, false);
  std::vector<Extent> live;
  std::mt19937_64 rng(7);
  uint64_t used = 0;
  for (int step = 0; step < 5000; ++step) {
    if (live.empty() || rng() % 3 != 0) {
      const uint64_t n = 1 + rng() % 20;
      auto e = alloc.Allocate(n);
      if (!e.ok()) {
        ASSERT_EQ(e.status().code(), absl::StatusCode::kResourceExhausted);
        ASSERT_LT(alloc.largest_free_run(), n);
        continue;
      }
      ASSERT_LE(e->end_slot(), kSlots);
      for (uint64_t s = e->first_slot; s < e->end_slot(); ++s) {
        ASSERT_FALSE(taken[s]) << "slot " << s << " handed out twice";
        taken[s] = true;
      }
      used += n;
      live.push_back(*e);
    } else {
      const size_t i = rng() % live.size();
      ASSERT_TRUE(alloc.Free(live[i]).ok());
      for (uint64_t s = live[i].first_slot; s < live[i].end_slot(); ++s) taken[s] = false;
      used -= live[i].num_slots;
      live.erase(live.begin() + i);
    }
    ASSERT_EQ(alloc.used_slots(), used);
    ASSERT_LE(alloc.used_slots(), kSlots);
  }
  for (const Extent& e : live) ASSERT_TRUE(alloc.Free(e).ok());
  EXPECT_EQ(alloc.used_slots(), 0u);
  EXPECT_EQ(alloc.free_runs(), 1u);
  EXPECT_EQ(alloc.largest_free_run(), kSlots);
}

}  // namespace
}  // namespace headwise::offload_internal
