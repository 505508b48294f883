// ExtentAllocator: first-fit allocation of runs of consecutive slots over an ordered free map,
// with coalescing of freed neighbours. Not thread-safe: the owning pool holds the lock.
#ifndef HEADWISE_OFFLOAD_INTERNAL_EXTENT_ALLOCATOR_H_
#define HEADWISE_OFFLOAD_INTERNAL_EXTENT_ALLOCATOR_H_

#include <cstdint>
#include <map>
#include <optional>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "offload/extent.h"

namespace headwise::offload_internal {

class ExtentAllocator {
 public:
  // Manages slots [0, num_slots), all free at first.
  explicit ExtentAllocator(uint64_t num_slots);

  // Allocates `num_slots` consecutive slots. When `preferred_first` is set and the slots
  // [preferred_first, preferred_first + num_slots) are all free, returns exactly those (so a
  // caller can grow a run in place); otherwise the lowest-addressed free run that fits
  // (first-fit). INVALID_ARGUMENT for num_slots == 0; RESOURCE_EXHAUSTED when no free run is
  // long enough (state unchanged).
  absl::StatusOr<Extent> Allocate(uint64_t num_slots,
                                  std::optional<uint64_t> preferred_first = std::nullopt);

  // Returns `extent` to the free map, merging it with free neighbours. `extent` may be any
  // sub-range of one live allocation (it then splits that allocation). INVALID_ARGUMENT when
  // any of its slots is not allocated (double free, out of range, or spanning two allocations);
  // state unchanged then.
  absl::Status Free(Extent extent);

  uint64_t num_slots() const { return num_slots_; }
  uint64_t used_slots() const { return used_slots_; }
  // Live allocations (a partial free that splits an allocation counts the pieces).
  uint64_t live_extents() const { return allocated_.size(); }
  // Maximal runs of free slots; 1 when nothing is allocated (0 when full).
  uint64_t free_runs() const { return free_.size(); }
  // Length of the longest free run.
  uint64_t largest_free_run() const;

 private:
  uint64_t num_slots_;
  uint64_t used_slots_ = 0;
  // first slot -> length; runs are disjoint, non-adjacent (always coalesced), non-empty.
  std::map<uint64_t, uint64_t> free_;
  // first slot -> length of each live allocation.
  std::map<uint64_t, uint64_t> allocated_;
};

}  // namespace headwise::offload_internal

#endif  // HEADWISE_OFFLOAD_INTERNAL_EXTENT_ALLOCATOR_H_
