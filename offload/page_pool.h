// PagePool: a fixed budget of equal-sized page slots (one head-page each), handed out in
// contiguous extents so that moves of one (sequence, layer, head) coalesce. HostPool and
// DevicePool provide the memory; this class owns the allocator and the accounting.
//
// Budget contract: the pool's memory is reserved once at creation (capacity_bytes =
// floor(budget_bytes / slot_bytes) * slot_bytes) and never grows, so used bytes can never pass
// the budget: an allocation that does not fit returns RESOURCE_EXHAUSTED and changes nothing.
// A pool may also charge a TierBudget shared with other pools (PagePoolOptions::shared_budget):
// an allocation must then fit both, and Free returns the bytes to both.
//
// Thread-safety: every method may be called from any thread concurrently. Reading or writing
// the bytes of a slot is not synchronized by the pool: whoever holds an extent owns its bytes.
#ifndef HEADWISE_OFFLOAD_PAGE_POOL_H_
#define HEADWISE_OFFLOAD_PAGE_POOL_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cachesvc/base/ids.h"
#include "cachesvc/base/mutex.h"
#include "offload/extent.h"
#include "offload/internal/extent_allocator.h"
#include "offload/tier_budget.h"

namespace headwise {

// Options shared by every pool.
struct PagePoolOptions {
  // Bytes of one slot: one head-page of a layout (ModelLayout::page_bytes()). Must be positive
  // and a multiple of 16. Default: 32 KiB (D=128, f16, 64 tokens).
  int64_t slot_bytes = 32 * 1024;
  // The byte budget. The pool holds floor(budget_bytes / slot_bytes) slots; must be at least one
  // slot. Default: 256 MiB.
  uint64_t budget_bytes = uint64_t{256} << 20;
  // Slots per extent when AllocateExtent is called without a count. Default: 16.
  uint64_t extent_pages = 16;
  // A budget shared with other pools of the tier (not owned; must outlive the pool). Every
  // allocation is charged to it in addition to this pool's own budget, and a charge it refuses
  // is RESOURCE_EXHAUSTED with nothing allocated. Default: nullptr (only the pool's own budget).
  TierBudget* shared_budget = nullptr;
};

struct PagePoolStats {
  Tier tier = Tier::kHost;
  // True for a device pool that stands in with host memory (no GPU or no CUDA build).
  bool emulated = false;
  int64_t slot_bytes = 0;
  uint64_t capacity_bytes = 0;
  uint64_t used_bytes = 0;
  // Highest used_bytes ever observed.
  uint64_t peak_used_bytes = 0;
  // Live allocations (extents handed out and not yet freed; a partial free splits one).
  uint64_t live_extents = 0;
  // Maximal runs of free slots (fragmentation: 1 means all free space is one run).
  uint64_t free_runs = 0;
  uint64_t largest_free_run_slots = 0;
  // Successful and refused (RESOURCE_EXHAUSTED) allocations since creation.
  uint64_t allocations = 0;
  uint64_t failed_allocations = 0;
};

class PagePool {
 public:
  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;
  virtual ~PagePool() = default;

  Tier tier() const { return tier_; }
  int64_t slot_bytes() const { return slot_bytes_; }
  uint64_t num_slots() const { return num_slots_; }
  uint64_t capacity_bytes() const { return num_slots_ * static_cast<uint64_t>(slot_bytes_); }
  uint64_t default_extent_pages() const { return extent_pages_; }
  // True when this pool stands in for a tier it cannot reach (emulated device memory).
  bool emulated() const { return emulated_; }
  // True when slot memory may be read and written by the CPU (host pools, emulated device
  // pools). A real CUDA pool returns false: use the copy engine to move its bytes.
  bool host_accessible() const { return host_accessible_; }

  // First byte of slot 0. Slot s lives at base() + s * slot_bytes(). Valid for the pool's
  // lifetime; a device address when !host_accessible().
  std::byte* base() const { return base_; }
  // REQUIRES: slot < num_slots().
  std::byte* SlotAddress(uint64_t slot) const {
    return base_ + slot * static_cast<uint64_t>(slot_bytes_);
  }

  // Allocates `num_slots` consecutive slots (0 means default_extent_pages()), first-fit.
  // RESOURCE_EXHAUSTED when no free run is long enough (the budget is full or fragmented) or the
  // shared budget refuses the bytes;
  // INVALID_ARGUMENT when num_slots exceeds the pool. The caller owns the extent until Free.
  absl::StatusOr<Extent> AllocateExtent(uint64_t num_slots = 0);

  // Allocates the next extent of a run that already ends at previous.end_slot(): returns the
  // slots directly after `previous` when they are free (so one (sequence, layer, head) stays
  // contiguous and its moves coalesce), otherwise any first-fit run. Same errors as above.
  absl::StatusOr<Extent> GrowExtent(const Extent& previous, uint64_t num_slots = 0);

  // Returns `extent`, which must lie inside one live allocation (freeing part of an extent,
  // e.g. one evicted page, is allowed). INVALID_ARGUMENT on a double free or a foreign range.
  absl::Status Free(const Extent& extent);

  PagePoolStats Stats() const;

 protected:
  struct Memory {
    std::byte* base = nullptr;
    bool host_accessible = true;
    bool emulated = false;
  };
  // Validates options; the number of slots the budget allows, or INVALID_ARGUMENT.
  static absl::StatusOr<uint64_t> SlotsForBudget(const PagePoolOptions& options);
  // `memory.base` must stay valid until the subclass destructor releases it.
  PagePool(Tier tier, const PagePoolOptions& options, uint64_t num_slots, Memory memory);

 private:
  absl::StatusOr<Extent> AllocateLocked(uint64_t num_slots, std::optional<uint64_t> preferred)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Tier tier_;
  const int64_t slot_bytes_;
  const uint64_t num_slots_;
  const uint64_t extent_pages_;
  std::byte* const base_;
  TierBudget* const shared_budget_;
  const bool host_accessible_;
  const bool emulated_;

  mutable Mutex mu_;
  offload_internal::ExtentAllocator allocator_ ABSL_GUARDED_BY(mu_);
  uint64_t peak_used_slots_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t allocations_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t failed_allocations_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace headwise

#endif  // HEADWISE_OFFLOAD_PAGE_POOL_H_
