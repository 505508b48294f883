#include "offload/internal/extent_allocator.h"

#include <algorithm>
#include <iterator>

#include "absl/strings/str_cat.h"

namespace headwise::offload_internal {

ExtentAllocator::ExtentAllocator(uint64_t num_slots) : num_slots_(num_slots) {
  if (num_slots_ > 0) free_.emplace(0, num_slots_);
}

uint64_t ExtentAllocator::largest_free_run() const {
  uint64_t best = 0;
  for (const auto& [first, length] : free_) best = std::max(best, length);
  return best;
}

absl::StatusOr<Extent> ExtentAllocator::Allocate(uint64_t num_slots,
                                                 std::optional<uint64_t> preferred_first) {
  if (num_slots == 0) return absl::InvalidArgumentError("cannot allocate an empty extent");
  auto take = [&](std::map<uint64_t, uint64_t>::iterator run, uint64_t first) {
    const uint64_t run_first = run->first;
    const uint64_t run_end = run->first + run->second;
    free_.erase(run);
    if (run_first < first) free_.emplace(run_first, first - run_first);
    if (first + num_slots < run_end) free_.emplace(first + num_slots, run_end - first - num_slots);
    allocated_.emplace(first, num_slots);
    used_slots_ += num_slots;
    return Extent{first, num_slots};
  };
  if (preferred_first.has_value()) {
    const uint64_t want = *preferred_first;
    auto it = free_.upper_bound(want);
    if (it != free_.begin()) {
      --it;
      if (want >= it->first && want + num_slots <= it->first + it->second &&
          want + num_slots > want) {
        return take(it, want);
      }
    }
  }
  // First-fit: a linear walk over free runs. Free runs stay few because neighbours coalesce and
  // allocations are whole extents; an index by size is the upgrade if that stops holding.
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second >= num_slots) return take(it, it->first);
  }
  return absl::ResourceExhaustedError(
      absl::StrCat("no free run of ", num_slots, " slots (", num_slots_ - used_slots_, " of ",
                   num_slots_, " slots free, largest run ", largest_free_run(), ")"));
}

absl::Status ExtentAllocator::Free(Extent extent) {
  const uint64_t first = extent.first_slot;
  const uint64_t end = extent.first_slot + extent.num_slots;
  if (extent.num_slots == 0 || end > num_slots_ || end < first) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad extent [", first, ", ", end, ") for a pool of ", num_slots_, " slots"));
  }
  // The allocation containing `first`.
  auto owner = allocated_.upper_bound(first);
  if (owner == allocated_.begin()) {
    return absl::InvalidArgumentError(absl::StrCat("slot ", first, " is not allocated"));
  }
  --owner;
  const uint64_t owner_first = owner->first;
  const uint64_t owner_end = owner->first + owner->second;
  if (first >= owner_end || end > owner_end) {
    return absl::InvalidArgumentError(absl::StrCat(
        "extent [", first, ", ", end, ") is not inside one live allocation (nearest: [",
        owner_first, ", ", owner_end, "))"));
  }
  allocated_.erase(owner);
  if (owner_first < first) allocated_.emplace(owner_first, first - owner_first);
  if (end < owner_end) allocated_.emplace(end, owner_end - end);
  used_slots_ -= extent.num_slots;

  uint64_t new_first = first;
  uint64_t new_end = end;
  auto next = free_.lower_bound(end);
  if (next != free_.end() && next->first == end) {
    new_end = next->first + next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == first) {
      new_first = prev->first;
      free_.erase(prev);
    }
  }
  free_.emplace(new_first, new_end - new_first);
  return absl::OkStatus();
}

}  // namespace headwise::offload_internal
