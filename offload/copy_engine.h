// CopyEngine: asynchronous page moves between tiers.
//
// A move copies `num_pages` consecutive pages from one tier to another: device <-> host memory
// (memcpy on the CPU path, where the device pool is emulated) and host <-> disk (DiskStore).
// Moves wait in one FIFO queue per priority; worker threads always take the most urgent
// non-empty queue (demand fetch > prefetch > write-back > demotion). When a worker takes a move
// it also takes queued moves of the same priority and direction that continue it (their source
// starts where the run's source ends AND their destination starts where the run's destination
// ends; for disk, "continues" means the same (sequence, layer, head) and the next ordinal), up
// to max_coalesce_pages, and performs them as ONE transfer (one memcpy, one WriteBatch, one
// MultiGet). Only successors are found: a move queued before its predecessor is not merged.
//
// The engine copies bytes; it neither allocates nor frees slots. The caller owns the source and
// destination slots and must keep both allocated (and not write the source or touch the
// destination) until the move's callback has run. Moves are not ordered with each other beyond
// the priority rule: two moves touching the same slot must be serialized by the caller.
//
// Time accounting (steady clock): a transfer is "busy" from its start to its end. Wait() adds
// the time it blocks to stall_ns. The part of a transfer's busy time before anyone waited on any
// of its moves is overlapped_ns (the copy ran behind other work). So overlapped_ns <= busy_ns
// always, and overlapped_ns == busy_ns when nobody waits.
//
// Shutdown: Shutdown() (and the destructor) CANCELS moves still queued: their callbacks run
// with CANCELLED, on the thread calling Shutdown. Transfers already running finish normally.
// Call Drain() first for a drain-then-stop shutdown.
//
// Thread-safety: every method may be called from any thread, except that Shutdown() and the
// destructor must not be called from a move callback.
#ifndef HEADWISE_OFFLOAD_COPY_ENGINE_H_
#define HEADWISE_OFFLOAD_COPY_ENGINE_H_

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cachesvc/base/ids.h"
#include "cachesvc/base/mutex.h"
#include "offload/device_pool.h"
#include "offload/disk_store.h"
#include "offload/host_pool.h"

namespace headwise {

// The directions a page can move (list in copy_kinds.def).
enum class CopyDirection : uint8_t {
#define HEADWISE_COPY_DIRECTION(name, str, src_tier, dst_tier) name,
#include "offload/copy_kinds.def"
};
inline constexpr int kNumCopyDirections = 0
#define HEADWISE_COPY_DIRECTION(name, str, src_tier, dst_tier) +1
#include "offload/copy_kinds.def"
    ;

// Move priorities, most urgent first (list in copy_kinds.def).
enum class CopyPriority : uint8_t {
#define HEADWISE_COPY_PRIORITY(name, str) name,
#include "offload/copy_kinds.def"
};
inline constexpr int kNumCopyPriorities = 0
#define HEADWISE_COPY_PRIORITY(name, str) +1
#include "offload/copy_kinds.def"
    ;

// "device_to_host", ... / "demand_fetch", ...
std::string_view CopyDirectionName(CopyDirection direction);
std::string_view CopyPriorityName(CopyPriority priority);
Tier SourceTier(CopyDirection direction);
Tier DestinationTier(CopyDirection direction);

// Identifies one submitted move. Tickets are issued in increasing order starting at 1.
using CopyTicket = TypedIndex<struct CopyTicketTag, uint64_t>;

struct MoveRequest {
  CopyDirection direction = CopyDirection::kDeviceToHost;
  CopyPriority priority = CopyPriority::kDemandFetch;
  // First slot of the run in the source / destination pool. Ignored on the disk side.
  uint64_t src_slot = 0;
  uint64_t dst_slot = 0;
  // Disk side (kHostToDisk destination, kDiskToHost source): key of the first page; page i of
  // the move uses the same key with ordinal + i.
  PageKey disk_key;
  // Consecutive pages to move. Must be at least 1.
  uint32_t num_pages = 1;
  // Called exactly once with the outcome, on a worker thread (CANCELLED ones on the thread
  // calling Shutdown), before Wait() on this move returns. May be empty. Must not block long:
  // it runs on a copy worker.
  std::function<void(absl::Status)> done;
};

struct CopyEngineOptions {
  // Endpoints; not owned, must outlive the engine. host is required; device and disk may be
  // null when no move uses them. Every pool must have the same slot_bytes (one page), which is
  // also the size of every disk page. A device pool that is not host_accessible() (real CUDA
  // memory) is not supported yet: Create returns UNIMPLEMENTED.
  DevicePool* device = nullptr;
  HostPool* host = nullptr;
  DiskStore* disk = nullptr;
  // Worker threads. Default: 2.
  int num_workers = 2;
  // Start with workers paused (they take no moves until Resume()). For tests and for callers
  // that want to queue a batch before any of it runs. Default: false.
  bool start_paused = false;
  // Most pages in one coalesced transfer. Default: 64 (2 MiB of 32 KiB pages).
  uint32_t max_coalesce_pages = 64;
  // fsync the WAL on every host->disk transfer. Default: false (the WAL is still written).
  bool sync_disk_writes = false;
};

struct CopyEngineStats {
  // Bytes moved successfully, indexed by CopyDirection.
  std::array<uint64_t, kNumCopyDirections> bytes_moved{};
  uint64_t bytes(CopyDirection direction) const { return bytes_moved[static_cast<int>(direction)]; }
  // The same bytes by purpose (the priority each move was submitted with).
  std::array<uint64_t, kNumCopyPriorities> bytes_by_priority{};
  uint64_t bytes(CopyPriority priority) const {
    return bytes_by_priority[static_cast<int>(priority)];
  }
  // Moves (requests) that finished OK, failed, or were cancelled.
  uint64_t moves = 0;
  uint64_t failed_moves = 0;
  uint64_t cancelled_moves = 0;
  // Pages moved successfully.
  uint64_t pages_moved = 0;
  // Transfers performed; a coalesced transfer carries more than one move.
  uint64_t transfers = 0;
  uint64_t coalesced_transfers = 0;
  // Moves that rode in a transfer started for an earlier move.
  uint64_t coalesced_moves = 0;
  // See "Time accounting" above.
  uint64_t busy_ns = 0;
  uint64_t stall_ns = 0;
  uint64_t overlapped_ns = 0;
  // Right now: moves queued, transfers running, threads blocked in Wait().
  uint64_t queued = 0;
  uint64_t running = 0;
  uint64_t waiters = 0;
};

class CopyEngine {
 public:
  // INVALID_ARGUMENT for missing host pool, mismatched slot sizes, num_workers < 1 or
  // max_coalesce_pages < 1; UNIMPLEMENTED for a real (non host-accessible) device pool.
  static absl::StatusOr<std::unique_ptr<CopyEngine>> Create(const CopyEngineOptions& options);
  // Shutdown(), then joins the workers.
  ~CopyEngine();
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;

  // Queues a move and returns its ticket. Validation errors come back here, and then the
  // callback is never called: INVALID_ARGUMENT (num_pages 0, slots past the pool, bad disk
  // key), FAILED_PRECONDITION (the direction's endpoint is absent, or the engine is shut down).
  absl::StatusOr<CopyTicket> Submit(MoveRequest request);

  // Blocks until the move has completed (its callback has returned) and adds the blocked time
  // to stall_ns. OK once completed — the move's own Status goes to its callback — or NOT_FOUND
  // for a ticket this engine never issued. Returns at once for a move already completed.
  absl::Status Wait(CopyTicket ticket);

  // Blocks until no move is queued or running. FAILED_PRECONDITION while paused with moves
  // queued (it would never return).
  absl::Status Drain();

  // Test hook and batching aid: paused workers finish their current transfer and take no new
  // ones until Resume().
  void Pause();
  void Resume();

  // Cancels queued moves (callbacks get CANCELLED), lets running transfers finish and joins
  // the workers. Later Submits fail with FAILED_PRECONDITION. Idempotent.
  // REQUIRES: not called from a move callback.
  void Shutdown();

  CopyEngineStats Stats() const;

 private:
  using SteadyTime = std::chrono::steady_clock::time_point;
  struct Queued {
    CopyTicket ticket;
    MoveRequest request;
  };
  using Queue = std::list<Queued>;
  struct TicketState {
    // When the first Wait() on this move began; unset while nobody waits.
    std::optional<SteadyTime> first_wait;
  };

  explicit CopyEngine(const CopyEngineOptions& options);
  void WorkerLoop();
  // Removes the next transfer from the queues: the head of the most urgent non-empty queue plus
  // the queued moves that continue it. REQUIRES: some queue is non-empty.
  std::vector<Queued> TakeRunLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void IndexLocked(int priority, Queue::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void UnindexLocked(int priority, Queue::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool AnyQueuedLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Performs one transfer; one Status per move of `run`. Called without mu_.
  std::vector<absl::Status> Execute(const std::vector<Queued>& run);
  // Stable key of the position of page `offset` of a move's source / destination.
  std::string SourcePosition(const MoveRequest& request, uint32_t offset) const;
  std::string DestinationPosition(const MoveRequest& request, uint32_t offset) const;
  PagePool* MemoryPool(Tier tier) const;

  const CopyEngineOptions options_;
  const uint64_t page_bytes_;

  mutable Mutex mu_;
  CondVar work_cv_;  // Signalled when work arrives, on Resume and on Shutdown.
  CondVar done_cv_;  // Signalled when moves complete.
  std::array<Queue, kNumCopyPriorities> queues_ ABSL_GUARDED_BY(mu_);
  // Per priority: source start position -> the queued move starting there (the first one, when
  // several do). Lets a worker find a run's successor without scanning the queue.
  std::array<absl::flat_hash_map<std::string, Queue::iterator>, kNumCopyPriorities> by_source_
      ABSL_GUARDED_BY(mu_);
  // Moves queued or running.
  absl::flat_hash_map<uint64_t, TicketState> pending_ ABSL_GUARDED_BY(mu_);
  uint64_t next_ticket_ ABSL_GUARDED_BY(mu_) = 1;
  bool paused_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  CopyEngineStats stats_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> workers_;  // Written only by the constructor and Shutdown.
  Mutex shutdown_mu_;                 // Serializes Shutdown callers.
};

}  // namespace headwise

#endif  // HEADWISE_OFFLOAD_COPY_ENGINE_H_
