#include "offload/copy_engine.h"

#include <atomic>
#include <random>
#include <thread>
#include <vector>

#include "cachesvc/base/mutex.h"
#include "gtest/gtest.h"
#include "tests/offload/offload_fixtures.h"

namespace headwise {
namespace {

using ::headwise::testing::FillRandom;
using ::headwise::testing::SameBytes;
using ::headwise::testing::TempDir;

constexpr int64_t kSlot = 8 * 1024;

// Real pools (emulated device, memfd host) and a real RocksDB store in a temp dir.
class CopyEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    DevicePoolOptions device;
    device.pool.slot_bytes = kSlot;
    device.pool.budget_bytes = 128 * kSlot;
    device.pool.extent_pages = 4;
    device_ = *DevicePool::Create(device);
    HostPoolOptions host;
    host.pool = device.pool;
    host_ = *HostPool::Create(host);
    DiskStoreOptions disk;
    disk.path = dir_.Sub("db");
    auto store = DiskStore::Open(disk);
    ASSERT_TRUE(store.ok()) << store.status();
    disk_ = *std::move(store);
  }

  std::unique_ptr<CopyEngine> MakeEngine(int workers = 2, bool paused = false,
                                         uint32_t max_coalesce = 64) {
    CopyEngineOptions options;
    options.device = device_.get();
    options.host = host_.get();
    options.disk = disk_.get();
    options.num_workers = workers;
    options.start_paused = paused;
    options.max_coalesce_pages = max_coalesce;
    auto engine = CopyEngine::Create(options);
    EXPECT_TRUE(engine.ok()) << engine.status();
    return engine.ok() ? *std::move(engine) : nullptr;
  }

  // Submits and waits; returns the status the callback saw.
  absl::Status MoveAndWait(CopyEngine& engine, MoveRequest request) {
    auto seen = std::make_shared<absl::Status>(absl::UnknownError("callback never ran"));
    request.done = [seen](absl::Status s) { *seen = std::move(s); };
    auto ticket = engine.Submit(std::move(request));
    if (!ticket.ok()) return ticket.status();
    absl::Status waited = engine.Wait(*ticket);
    if (!waited.ok()) return waited;
    return *seen;
  }

  static MoveRequest Move(CopyDirection direction, uint64_t src, uint64_t dst, uint32_t pages,
                          CopyPriority priority = CopyPriority::kDemandFetch) {
    MoveRequest r;
    r.direction = direction;
    r.priority = priority;
    r.src_slot = src;
    r.dst_slot = dst;
    r.num_pages = pages;
    return r;
  }

  static MoveRequest DiskMove(CopyDirection direction, uint64_t slot, PageKey key, uint32_t pages,
                              CopyPriority priority = CopyPriority::kWriteBack) {
    MoveRequest r = Move(direction, slot, slot, pages, priority);
    r.disk_key = key;
    return r;
  }

  TempDir dir_;
  std::unique_ptr<DevicePool> device_;
  std::unique_ptr<HostPool> host_;
  std::unique_ptr<DiskStore> disk_;
};

PageKey KeyFor(uint64_t seq, int layer, int head, uint32_t ordinal) {
  return PageKey{SequenceId(seq, ~seq), LayerId(layer), HeadId(head), ordinal};
}

TEST_F(CopyEngineTest, RoundTripThroughEveryTierPreservesBytes) {
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  constexpr uint32_t kPages = 16;
  std::mt19937_64 rng(21);
  const Extent d0 = *device_->AllocateExtent(kPages);
  const Extent h0 = *host_->AllocateExtent(kPages);
  const Extent h1 = *host_->AllocateExtent(kPages);
  const Extent d1 = *device_->AllocateExtent(kPages);
  std::vector<std::byte> original(kPages * kSlot);
  FillRandom(original.data(), original.size(), rng);
  std::memcpy(device_->SlotAddress(d0.first_slot), original.data(), original.size());
  // Fill the destinations with other random bytes so a skipped copy cannot pass.
  FillRandom(host_->SlotAddress(h0.first_slot), original.size(), rng);
  FillRandom(host_->SlotAddress(h1.first_slot), original.size(), rng);
  FillRandom(device_->SlotAddress(d1.first_slot), original.size(), rng);
  const PageKey key = KeyFor(42, 3, 1, 100);

  ASSERT_TRUE(
      MoveAndWait(*engine, Move(CopyDirection::kDeviceToHost, d0.first_slot, h0.first_slot, kPages))
          .ok());
  ASSERT_TRUE(SameBytes(host_->SlotAddress(h0.first_slot), original.data(), original.size()));
  ASSERT_TRUE(
      MoveAndWait(*engine, DiskMove(CopyDirection::kHostToDisk, h0.first_slot, key, kPages)).ok());
  ASSERT_TRUE(
      MoveAndWait(*engine, DiskMove(CopyDirection::kDiskToHost, h1.first_slot, key, kPages)).ok());
  ASSERT_TRUE(SameBytes(host_->SlotAddress(h1.first_slot), original.data(), original.size()));
  ASSERT_TRUE(
      MoveAndWait(*engine, Move(CopyDirection::kHostToDevice, h1.first_slot, d1.first_slot, kPages))
          .ok());
  EXPECT_TRUE(SameBytes(device_->SlotAddress(d1.first_slot), original.data(), original.size()));

  const CopyEngineStats stats = engine->Stats();
  for (int d = 0; d < kNumCopyDirections; ++d) {
    EXPECT_EQ(stats.bytes_moved[d], kPages * kSlot) << CopyDirectionName(CopyDirection(d));
  }
  EXPECT_EQ(stats.moves, 4u);
  EXPECT_EQ(stats.pages_moved, 4 * kPages);
  EXPECT_EQ(stats.failed_moves, 0u);
  EXPECT_EQ(disk_->Stats().pages_written, kPages);
}

TEST_F(CopyEngineTest, DemandRunsBeforePrefetchBeforeWriteBackBeforeDemotion) {
  auto engine = MakeEngine(/*workers=*/1, /*paused=*/true);
  ASSERT_NE(engine, nullptr);
  Mutex mu;
  std::vector<int> order;
  // Submitted least urgent first; every move non-adjacent to the others so none coalesce.
  const CopyPriority submitted[] = {CopyPriority::kDemotion, CopyPriority::kWriteBack,
                                    CopyPriority::kPrefetch, CopyPriority::kDemandFetch,
                                    CopyPriority::kPrefetch, CopyPriority::kDemandFetch};
  for (int i = 0; i < 6; ++i) {
    MoveRequest r = Move(CopyDirection::kDeviceToHost, 10 * i, 10 * i, 1, submitted[i]);
    r.done = [&, i](absl::Status s) {
      EXPECT_TRUE(s.ok());
      MutexLock lock(&mu);
      order.push_back(i);
    };
    ASSERT_TRUE(engine->Submit(std::move(r)).ok());
  }
  EXPECT_EQ(engine->Stats().queued, 6u);
  EXPECT_EQ(engine->Drain().code(), absl::StatusCode::kFailedPrecondition);
  engine->Resume();
  ASSERT_TRUE(engine->Drain().ok());
  MutexLock lock(&mu);
  // Demand (FIFO among themselves), then prefetch, write-back, demotion.
  EXPECT_EQ(order, (std::vector<int>{3, 5, 2, 4, 1, 0}));
}

TEST_F(CopyEngineTest, AdjacentMovesCoalesceIntoOneTransfer) {
  auto engine = MakeEngine(/*workers=*/1, /*paused=*/true);
  ASSERT_NE(engine, nullptr);
  std::mt19937_64 rng(5);
  FillRandom(device_->SlotAddress(0), 16 * kSlot, rng);
  // 8 single-page moves, consecutive source AND destination: one transfer.
  for (uint64_t i = 0; i < 8; ++i) {
    ASSERT_TRUE(engine->Submit(Move(CopyDirection::kDeviceToHost, i, 40 + i, 1)).ok());
  }
  // Consecutive source but a gap in the destination: not merged with the run above.
  ASSERT_TRUE(engine->Submit(Move(CopyDirection::kDeviceToHost, 8, 60, 1)).ok());
  // Adjacent, but another priority: its own transfer.
  ASSERT_TRUE(
      engine->Submit(Move(CopyDirection::kDeviceToHost, 9, 61, 1, CopyPriority::kPrefetch)).ok());
  // Host -> disk, consecutive slots and consecutive ordinals of one (sequence, layer, head).
  for (uint32_t i = 0; i < 4; ++i) {
    ASSERT_TRUE(
        engine->Submit(DiskMove(CopyDirection::kHostToDisk, 40 + i, KeyFor(1, 0, 0, i), 1)).ok());
  }
  engine->Resume();
  ASSERT_TRUE(engine->Drain().ok());
  const CopyEngineStats stats = engine->Stats();
  EXPECT_EQ(stats.moves, 14u);
  EXPECT_EQ(stats.transfers, 4u);
  EXPECT_EQ(stats.coalesced_transfers, 2u);
  EXPECT_EQ(stats.coalesced_moves, 7u + 3u);
  EXPECT_EQ(stats.bytes(CopyDirection::kDeviceToHost), 10u * kSlot);
  EXPECT_EQ(stats.bytes(CopyDirection::kHostToDisk), 4u * kSlot);
  EXPECT_TRUE(SameBytes(host_->SlotAddress(40), device_->SlotAddress(0), 8 * kSlot));
  EXPECT_TRUE(SameBytes(host_->SlotAddress(60), device_->SlotAddress(8), 2 * kSlot));
  std::vector<std::byte> out(kSlot);
  for (uint32_t i = 0; i < 4; ++i) {
    ASSERT_TRUE(disk_->GetPage(KeyFor(1, 0, 0, i), absl::MakeSpan(out)).ok());
    EXPECT_TRUE(SameBytes(out.data(), device_->SlotAddress(i), kSlot));
  }
}

TEST_F(CopyEngineTest, CoalescingStopsAtMaxCoalescePages) {
  auto engine = MakeEngine(/*workers=*/1, /*paused=*/true, /*max_coalesce=*/4);
  ASSERT_NE(engine, nullptr);
  for (uint64_t i = 0; i < 10; ++i) {
    ASSERT_TRUE(engine->Submit(Move(CopyDirection::kHostToDevice, i, i, 1)).ok());
  }
  engine->Resume();
  ASSERT_TRUE(engine->Drain().ok());
  EXPECT_EQ(engine->Stats().transfers, 3u);  // 4 + 4 + 2
  EXPECT_EQ(engine->Stats().coalesced_moves, 7u);
}

TEST_F(CopyEngineTest, NoWaitingMeansAllOverlappedAndNoStall) {
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  for (uint64_t i = 0; i < 20; ++i) {
    ASSERT_TRUE(engine->Submit(Move(CopyDirection::kDeviceToHost, 2 * i, 2 * i, 1)).ok());
  }
  ASSERT_TRUE(engine->Drain().ok());
  const CopyEngineStats stats = engine->Stats();
  EXPECT_EQ(stats.stall_ns, 0u);
  EXPECT_EQ(stats.overlapped_ns, stats.busy_ns);
  EXPECT_EQ(stats.waiters, 0u);
}

TEST_F(CopyEngineTest, WaitingBeforeTheMoveStartsIsAllStall) {
  auto engine = MakeEngine(/*workers=*/1, /*paused=*/true);
  ASSERT_NE(engine, nullptr);
  auto ticket = engine->Submit(Move(CopyDirection::kHostToDevice, 0, 0, 8));
  ASSERT_TRUE(ticket.ok());
  std::thread waiter([&] { EXPECT_TRUE(engine->Wait(*ticket).ok()); });
  // Deterministic: resume only once the waiter is blocked, so it waited before the move began.
  while (engine->Stats().waiters == 0) std::this_thread::yield();
  engine->Resume();
  waiter.join();
  CopyEngineStats stats = engine->Stats();
  EXPECT_GT(stats.stall_ns, 0u);
  EXPECT_EQ(stats.overlapped_ns, 0u);
  EXPECT_GE(stats.stall_ns, stats.busy_ns) << "the waiter blocked through the whole transfer";
  // Waiting on a finished move does not block or add stall.
  const uint64_t stall = stats.stall_ns;
  EXPECT_TRUE(engine->Wait(*ticket).ok());
  EXPECT_EQ(engine->Stats().stall_ns, stall);
  EXPECT_EQ(engine->Wait(CopyTicket(999)).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(engine->Wait(CopyTicket(0)).code(), absl::StatusCode::kNotFound);
}

TEST_F(CopyEngineTest, ShutdownCancelsQueuedMoves) {
  auto engine = MakeEngine(/*workers=*/2, /*paused=*/true);
  ASSERT_NE(engine, nullptr);
  std::atomic<int> cancelled{0};
  std::vector<CopyTicket> tickets;
  for (uint64_t i = 0; i < 3; ++i) {
    MoveRequest r = Move(CopyDirection::kDeviceToHost, 4 * i, 4 * i, 1);
    r.done = [&](absl::Status s) {
      if (s.code() == absl::StatusCode::kCancelled) ++cancelled;
    };
    tickets.push_back(*engine->Submit(std::move(r)));
  }
  engine->Shutdown();
  EXPECT_EQ(cancelled.load(), 3);
  for (CopyTicket t : tickets) EXPECT_TRUE(engine->Wait(t).ok());
  const CopyEngineStats stats = engine->Stats();
  EXPECT_EQ(stats.cancelled_moves, 3u);
  EXPECT_EQ(stats.moves, 0u);
  EXPECT_EQ(stats.queued, 0u);
  EXPECT_EQ(engine->Submit(Move(CopyDirection::kDeviceToHost, 0, 0, 1)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  engine->Shutdown();  // idempotent
}

TEST_F(CopyEngineTest, SubmitValidatesAndDiskErrorsReachTheCallback) {
  auto engine = MakeEngine();
  ASSERT_NE(engine, nullptr);
  EXPECT_EQ(engine->Submit(Move(CopyDirection::kDeviceToHost, 0, 0, 0)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine->Submit(Move(CopyDirection::kDeviceToHost, 127, 0, 2)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine->Submit(Move(CopyDirection::kHostToDevice, 0, 128, 1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine->Submit(DiskMove(CopyDirection::kHostToDisk, 0, KeyFor(1, 70000, 0, 0), 1))
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  // A page that was never written: NOT_FOUND through the callback; nothing counted as moved.
  EXPECT_EQ(
      MoveAndWait(*engine, DiskMove(CopyDirection::kDiskToHost, 0, KeyFor(9, 0, 0, 0), 1)).code(),
      absl::StatusCode::kNotFound);
  EXPECT_EQ(engine->Stats().failed_moves, 1u);
  EXPECT_EQ(engine->Stats().bytes(CopyDirection::kDiskToHost), 0u);

  CopyEngineOptions no_disk;
  no_disk.host = host_.get();
  auto host_only = *CopyEngine::Create(no_disk);
  EXPECT_EQ(host_only->Submit(DiskMove(CopyDirection::kHostToDisk, 0, KeyFor(1, 0, 0, 0), 1))
                .status()
                .code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(host_only->Submit(Move(CopyDirection::kHostToDevice, 0, 0, 1)).status().code(),
            absl::StatusCode::kFailedPrecondition);

  HostPoolOptions other;
  other.pool.slot_bytes = 2 * kSlot;
  other.pool.budget_bytes = 8 * kSlot;
  auto mismatched = *HostPool::Create(other);
  CopyEngineOptions bad;
  bad.device = device_.get();
  bad.host = mismatched.get();
  EXPECT_EQ(CopyEngine::Create(bad).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CopyEngine::Create(CopyEngineOptions{}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// 8 threads each repeatedly: allocate, fill random, device->host, host->disk, scribble host,
// disk->host, host->device into a fresh extent, byte-compare, free. Budgets checked throughout;
// final counters equal the sum of what the threads moved.
TEST_F(CopyEngineTest, EightThreadsMoveConcurrentlyWithExactBytes) {
  auto engine = MakeEngine(/*workers=*/3);
  ASSERT_NE(engine, nullptr);
  constexpr int kThreads = 8;
  constexpr int kRounds = 25;
  std::atomic<int> failures{0};
  std::atomic<uint64_t> pages_per_direction{0};
  auto check = [&](bool ok, const char* what) {
    if (!ok) {
      ++failures;
      ADD_FAILURE() << what;
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(1000 + t);
      for (int round = 0; round < kRounds; ++round) {
        const uint32_t pages = 1 + rng() % 4;
        // 8 threads x (2 device + 2 host extents of <= 4 pages) fit in 128 slots: allocation
        // can only fail through a bug.
        auto d0 = device_->AllocateExtent(pages);
        auto d1 = device_->AllocateExtent(pages);
        auto h0 = host_->AllocateExtent(pages);
        auto h1 = host_->AllocateExtent(pages);
        check(d0.ok() && d1.ok() && h0.ok() && h1.ok(), "allocation");
        if (!(d0.ok() && d1.ok() && h0.ok() && h1.ok())) return;
        check(device_->Stats().used_bytes <= device_->capacity_bytes(), "device budget");
        check(host_->Stats().used_bytes <= host_->capacity_bytes(), "host budget");
        const size_t bytes = pages * kSlot;
        std::vector<std::byte> expected(bytes);
        FillRandom(expected.data(), bytes, rng);
        std::memcpy(device_->SlotAddress(d0->first_slot), expected.data(), bytes);
        FillRandom(device_->SlotAddress(d1->first_slot), bytes, rng);
        const PageKey key = KeyFor(t, round % 3, t % 2, round * 4);
        const CopyPriority priority = static_cast<CopyPriority>(rng() % kNumCopyPriorities);

        check(MoveAndWait(*engine, Move(CopyDirection::kDeviceToHost, d0->first_slot,
                                        h0->first_slot, pages, priority))
                  .ok(),
              "device->host");
        check(SameBytes(host_->SlotAddress(h0->first_slot), expected.data(), bytes), "bytes@h0");
        check(MoveAndWait(*engine, DiskMove(CopyDirection::kHostToDisk, h0->first_slot, key, pages,
                                            priority))
                  .ok(),
              "host->disk");
        FillRandom(host_->SlotAddress(h1->first_slot), bytes, rng);
        check(MoveAndWait(*engine, DiskMove(CopyDirection::kDiskToHost, h1->first_slot, key, pages,
                                            priority))
                  .ok(),
              "disk->host");
        check(SameBytes(host_->SlotAddress(h1->first_slot), expected.data(), bytes), "bytes@h1");
        check(MoveAndWait(*engine, Move(CopyDirection::kHostToDevice, h1->first_slot,
                                        d1->first_slot, pages, priority))
                  .ok(),
              "host->device");
        check(SameBytes(device_->SlotAddress(d1->first_slot), expected.data(), bytes), "bytes@d1");
        check(SameBytes(device_->SlotAddress(d0->first_slot), expected.data(), bytes),
              "source untouched");
        pages_per_direction += pages;
        for (auto* e : {&d0, &d1}) check(device_->Free(**e).ok(), "device free");
        for (auto* e : {&h0, &h1}) check(host_->Free(**e).ok(), "host free");
      }
    });
  }
  for (std::thread& t : threads) t.join();
  ASSERT_EQ(failures.load(), 0);
  ASSERT_TRUE(engine->Drain().ok());
  const CopyEngineStats stats = engine->Stats();
  for (int d = 0; d < kNumCopyDirections; ++d) {
    EXPECT_EQ(stats.bytes_moved[d], pages_per_direction.load() * kSlot);
  }
  EXPECT_EQ(stats.moves, uint64_t{4} * kThreads * kRounds);
  EXPECT_EQ(stats.failed_moves, 0u);
  EXPECT_LE(stats.overlapped_ns, stats.busy_ns);
  EXPECT_EQ(device_->Stats().used_bytes, 0u);
  EXPECT_EQ(host_->Stats().used_bytes, 0u);
  EXPECT_EQ(device_->Stats().free_runs, 1u);
}

}  // namespace
}  // namespace headwise
