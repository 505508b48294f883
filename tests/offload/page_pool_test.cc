#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "offload/device_pool.h"
#include "offload/host_pool.h"
#include "offload/tier_budget.h"
#include "tests/offload/offload_fixtures.h"

namespace headwise {
namespace {

using ::headwise::testing::FillRandom;
using ::headwise::testing::SameBytes;

constexpr int64_t kSlot = 4096;

PagePoolOptions SmallPool(uint64_t slots, uint64_t extent_pages = 4) {
  PagePoolOptions options;
  options.slot_bytes = kSlot;
  options.budget_bytes = slots * kSlot;
  options.extent_pages = extent_pages;
  return options;
}

std::set<std::string> DevShmEntries() {
  std::set<std::string> names;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/dev/shm", ec)) {
    names.insert(entry.path().filename().string());
  }
  return names;
}

void ExpectWithinBudget(const PagePool& pool) {
  const PagePoolStats stats = pool.Stats();
  ASSERT_LE(stats.used_bytes, stats.capacity_bytes);
  ASSERT_LE(stats.peak_used_bytes, stats.capacity_bytes);
  ASSERT_LE(stats.used_bytes, stats.peak_used_bytes);
}

TEST(PagePoolTest, RejectsBadOptions) {
  HostPoolOptions options;
  options.pool.slot_bytes = 100;  // not a multiple of 16
  EXPECT_EQ(HostPool::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.pool.slot_bytes = kSlot;
  options.pool.budget_bytes = kSlot - 1;  // less than one slot
  EXPECT_EQ(HostPool::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  DevicePoolOptions device;
  device.pool.extent_pages = 0;
  EXPECT_EQ(DevicePool::Create(device).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PagePoolTest, BudgetRoundsDownToWholeSlots) {
  HostPoolOptions options;
  options.pool = SmallPool(10);
  options.pool.budget_bytes += kSlot - 1;
  auto pool = HostPool::Create(options);
  ASSERT_TRUE(pool.ok()) << pool.status();
  EXPECT_EQ((*pool)->num_slots(), 10u);
  EXPECT_EQ((*pool)->capacity_bytes(), 10u * kSlot);
}

// Fill to the budget, one extent at a time, checking the budget after every operation; one more
// allocation is refused and changes nothing; freeing makes room again.
template <typename PoolT, typename OptionsT>
void FillToBudgetThenOneMore() {
  OptionsT options;
  options.pool = SmallPool(32, 4);
  auto created = PoolT::Create(options);
  ASSERT_TRUE(created.ok()) << created.status();
  PoolT& pool = **created;
  std::vector<Extent> extents;
  for (int i = 0; i < 8; ++i) {
    auto e = pool.AllocateExtent();
    ASSERT_TRUE(e.ok()) << e.status();
    EXPECT_EQ(e->num_slots, 4u);
    extents.push_back(*e);
    ExpectWithinBudget(pool);
  }
  EXPECT_EQ(pool.Stats().used_bytes, pool.capacity_bytes());
  auto more = pool.AllocateExtent(1);
  EXPECT_EQ(more.status().code(), absl::StatusCode::kResourceExhausted);
  ExpectWithinBudget(pool);
  PagePoolStats stats = pool.Stats();
  EXPECT_EQ(stats.used_bytes, pool.capacity_bytes());
  EXPECT_EQ(stats.failed_allocations, 1u);
  EXPECT_EQ(stats.live_extents, 8u);
  EXPECT_EQ(pool.AllocateExtent(33).status().code(), absl::StatusCode::kInvalidArgument);

  ASSERT_TRUE(pool.Free(extents[3]).ok());
  ExpectWithinBudget(pool);
  auto again = pool.AllocateExtent(4);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, extents[3]);
  for (const Extent& e : extents) ASSERT_TRUE(pool.Free(e).ok());
  EXPECT_EQ(pool.Free(extents[0]).code(), absl::StatusCode::kInvalidArgument);
  stats = pool.Stats();
  EXPECT_EQ(stats.used_bytes, 0u);
  EXPECT_EQ(stats.peak_used_bytes, pool.capacity_bytes());
  EXPECT_EQ(stats.free_runs, 1u);
}

TEST(PagePoolTest, HostPoolNeverExceedsBudget) {
  FillToBudgetThenOneMore<HostPool, HostPoolOptions>();
}

TEST(PagePoolTest, DevicePoolNeverExceedsBudget) {
  FillToBudgetThenOneMore<DevicePool, DevicePoolOptions>();
}

// Two pools of different slot sizes charging one TierBudget never hold more than it together,
// checked after every operation; a refused charge allocates nothing, and frees return the bytes.
TEST(PagePoolTest, PoolsSharingATierBudgetNeverExceedItTogether) {
  constexpr uint64_t kBudget = 40 * kSlot;
  TierBudget budget(kBudget);
  DevicePoolOptions small;
  small.pool = SmallPool(40, 2);  // 40 slots of 4 KiB: its own budget is the whole tier.
  small.pool.shared_budget = &budget;
  DevicePoolOptions large;
  large.pool.slot_bytes = 4 * kSlot;  // 10 slots of 16 KiB.
  large.pool.budget_bytes = kBudget;
  large.pool.extent_pages = 1;
  large.pool.shared_budget = &budget;
  auto a = *DevicePool::Create(small);
  auto b = *DevicePool::Create(large);
  const auto check = [&] {
    const uint64_t used = a->Stats().used_bytes + b->Stats().used_bytes;
    EXPECT_EQ(budget.used(), used);
    EXPECT_LE(used, kBudget);
    EXPECT_LE(budget.peak(), kBudget);
  };

  std::mt19937 rng(7);
  std::vector<std::pair<PagePool*, Extent>> live;
  int refused = 0;
  for (int op = 0; op < 2000; ++op) {
    if (!live.empty() && rng() % 3 == 0) {
      const size_t i = rng() % live.size();
      const uint64_t before = budget.used();
      const auto [pool, extent] = live[i];
      ASSERT_TRUE(pool->Free(extent).ok());
      EXPECT_EQ(budget.used(), before - extent.num_slots * pool->slot_bytes());
      live.erase(live.begin() + static_cast<ptrdiff_t>(i));
    } else {
      PagePool* pool = rng() % 2 == 0 ? static_cast<PagePool*>(a.get()) : b.get();
      const uint64_t before_budget = budget.used();
      const uint64_t before_pool = pool->Stats().used_bytes;
      absl::StatusOr<Extent> e = pool->AllocateExtent(1 + rng() % 3);
      if (e.ok()) {
        live.emplace_back(pool, *e);
      } else {
        ASSERT_EQ(e.status().code(), absl::StatusCode::kResourceExhausted) << e.status();
        EXPECT_EQ(budget.used(), before_budget);
        EXPECT_EQ(pool->Stats().used_bytes, before_pool);
        ++refused;
      }
    }
    check();
  }
  EXPECT_GT(refused, 0);
  EXPECT_GE(budget.peak(), budget.used());

  // Fill the tier with large pages: the small pool, far from its own budget, is refused.
  for (const auto& [pool, extent] : live) ASSERT_TRUE(pool->Free(extent).ok());
  live.clear();
  EXPECT_EQ(budget.used(), 0u);
  std::vector<Extent> large_extents;
  for (int i = 0; i < 10; ++i) large_extents.push_back(*b->AllocateExtent(1));
  check();
  EXPECT_EQ(budget.used(), kBudget);
  const uint64_t failed = a->Stats().failed_allocations;
  EXPECT_EQ(a->AllocateExtent(1).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(a->Stats().used_bytes, 0u);
  EXPECT_EQ(a->Stats().failed_allocations, failed + 1);
  // Freeing one large page makes room for exactly four small ones.
  ASSERT_TRUE(b->Free(large_extents.back()).ok());
  large_extents.pop_back();
  Extent four = *a->AllocateExtent(4);
  EXPECT_EQ(a->AllocateExtent(1).status().code(), absl::StatusCode::kResourceExhausted);
  check();
  // A partial free returns its part of the budget.
  ASSERT_TRUE(a->Free(Extent{four.first_slot, 1}).ok());
  EXPECT_EQ(budget.used(), kBudget - kSlot);
  ASSERT_TRUE(a->Free(Extent{four.first_slot + 1, 3}).ok());
  for (const Extent& e : large_extents) ASSERT_TRUE(b->Free(e).ok());
  EXPECT_EQ(budget.used(), 0u);
  EXPECT_EQ(budget.peak(), kBudget);
}

TEST(PagePoolTest, ConcurrentPoolsSharingATierBudgetStayWithinIt) {
  constexpr uint64_t kBudget = 24 * kSlot;
  TierBudget budget(kBudget);
  HostPoolOptions small;
  small.pool = SmallPool(24, 1);
  small.pool.shared_budget = &budget;
  HostPoolOptions large = small;
  large.pool.slot_bytes = 2 * kSlot;
  auto a = *HostPool::Create(small);
  auto b = *HostPool::Create(large);
  std::vector<std::thread> threads;
  std::atomic<bool> over{false};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      PagePool* pool = t % 2 == 0 ? static_cast<PagePool*>(a.get()) : b.get();
      std::vector<Extent> mine;
      for (int i = 0; i < 2000; ++i) {
        if (mine.size() < 6) {
          absl::StatusOr<Extent> e = pool->AllocateExtent(1 + i % 2);
          if (e.ok()) mine.push_back(*e);
        } else {
          (void)pool->Free(mine.front());
          mine.erase(mine.begin());
        }
        if (budget.used() > kBudget) over = true;
      }
      for (const Extent& e : mine) (void)pool->Free(e);
    });
  }
  for (std::thread& th : threads) th.join();
  EXPECT_FALSE(over);
  EXPECT_LE(budget.peak(), kBudget);
  EXPECT_EQ(budget.used(), 0u);
  EXPECT_EQ(a->Stats().used_bytes + b->Stats().used_bytes, 0u);
}

TEST(PagePoolTest, GrowExtentKeepsASequenceContiguous) {
  DevicePoolOptions options;
  options.pool = SmallPool(64, 4);
  auto pool = *DevicePool::Create(options);
  Extent first = *pool->AllocateExtent();
  Extent second = *pool->GrowExtent(first);
  EXPECT_EQ(second.first_slot, first.end_slot());
  Extent blocker = *pool->AllocateExtent();
  Extent third = *pool->GrowExtent(second);  // right after `second` is taken: elsewhere
  EXPECT_EQ(third.first_slot, blocker.end_slot());
  // Freed neighbours coalesce back into one free run.
  for (const Extent& e : {first, second, blocker, third}) ASSERT_TRUE(pool->Free(e).ok());
  EXPECT_EQ(pool->Stats().free_runs, 1u);
  EXPECT_EQ(pool->Stats().largest_free_run_slots, 64u);
}

TEST(PagePoolTest, SlotAddressesAreBasePlusSlotTimesSize) {
  HostPoolOptions options;
  options.pool = SmallPool(8);
  auto pool = *HostPool::Create(options);
  for (uint64_t s = 0; s < 8; ++s) {
    EXPECT_EQ(pool->SlotAddress(s), pool->base() + s * kSlot);
  }
}

TEST(PagePoolTest, HostPoolIsSharedMemoryAnotherMappingSees) {
  const std::set<std::string> shm_before = DevShmEntries();
  int fd = -1;
  {
    HostPoolOptions options;
    options.pool = SmallPool(16);
    auto pool = *HostPool::Create(options);
    EXPECT_FALSE(pool->emulated());
    EXPECT_TRUE(pool->host_accessible());
    fd = pool->fd();
    ASSERT_GE(fd, 0);
    EXPECT_EQ(pool->mapped_bytes(), 16u * kSlot);

    // A client maps the same fd (here in-process; across processes it arrives by SCM_RIGHTS).
    void* client = mmap(nullptr, pool->mapped_bytes(), PROT_READ, MAP_SHARED, fd, 0);
    ASSERT_NE(client, MAP_FAILED);
    std::mt19937_64 rng(1);
    Extent e = *pool->AllocateExtent(2);
    FillRandom(pool->SlotAddress(e.first_slot), 2 * kSlot, rng);
    EXPECT_TRUE(SameBytes(static_cast<const std::byte*>(client) + e.first_slot * kSlot,
                          pool->SlotAddress(e.first_slot), 2 * kSlot));
    munmap(client, pool->mapped_bytes());
    // Sealed: a client cannot shrink the file under the daemon's mapping.
    EXPECT_NE(ftruncate(fd, 0), 0);
  }
  EXPECT_EQ(fcntl(fd, F_GETFD), -1) << "the memfd must be closed with the pool";
  EXPECT_EQ(DevShmEntries(), shm_before) << "nothing may be left in /dev/shm";
}

TEST(PagePoolTest, DevicePoolWithoutGpuIsEmulatedAndSaysSo) {
  DevicePoolOptions options;
  options.pool = SmallPool(8);
  auto pool = DevicePool::Create(options);
  ASSERT_TRUE(pool.ok()) << pool.status();
  // This build has no CUDA path, so the pool must be emulated and report it.
  EXPECT_TRUE((*pool)->emulated());
  EXPECT_TRUE((*pool)->Stats().emulated);
  EXPECT_EQ((*pool)->Stats().tier, Tier::kDevice);
  EXPECT_EQ((*pool)->device_ordinal(), -1);
  options.allow_emulation = false;
  EXPECT_EQ(DevicePool::Create(options).status().code(), absl::StatusCode::kFailedPrecondition);
}

// 8 threads allocate, write a private random payload, re-check it after other threads have
// run, and free, concurrently: no two threads ever share a slot and the budget holds.
TEST(PagePoolTest, ConcurrentAllocateWriteFreeKeepsBytesAndBudget) {
  HostPoolOptions options;
  options.pool = SmallPool(96, 3);
  auto pool = *HostPool::Create(options);
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      struct Held {
        Extent extent;
        std::vector<std::byte> expected;
      };
      std::vector<Held> held;
      for (int step = 0; step < 400; ++step) {
        if (held.size() < 4 && rng() % 2 == 0) {
          auto e = pool->AllocateExtent(1 + rng() % 3);
          if (!e.ok()) {
            if (e.status().code() != absl::StatusCode::kResourceExhausted) ++failures;
            continue;
          }
          Held h{*e, std::vector<std::byte>(e->num_slots * kSlot)};
          FillRandom(h.expected.data(), h.expected.size(), rng);
          std::memcpy(pool->SlotAddress(e->first_slot), h.expected.data(), h.expected.size());
          held.push_back(std::move(h));
        } else if (!held.empty()) {
          Held& h = held.back();
          if (!SameBytes(pool->SlotAddress(h.extent.first_slot), h.expected.data(),
                         h.expected.size())) {
            ++failures;
          }
          if (!pool->Free(h.extent).ok()) ++failures;
          held.pop_back();
        }
        const PagePoolStats stats = pool->Stats();
        if (stats.used_bytes > stats.capacity_bytes) ++failures;
      }
      for (Held& h : held) {
        if (!SameBytes(pool->SlotAddress(h.extent.first_slot), h.expected.data(),
                       h.expected.size()) ||
            !pool->Free(h.extent).ok()) {
          ++failures;
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(pool->Stats().used_bytes, 0u);
  EXPECT_EQ(pool->Stats().free_runs, 1u);
}

}  // namespace
}  // namespace headwise
