#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <filesystem>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "offload/device_pool.h"
#include "offload/host_pool.h"
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
