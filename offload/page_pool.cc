#include "offload/page_pool.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace headwise {

absl::StatusOr<uint64_t> PagePool::SlotsForBudget(const PagePoolOptions& options) {
  if (options.slot_bytes <= 0 || options.slot_bytes % 16 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("slot_bytes must be a positive multiple of 16, got ", options.slot_bytes));
  }
  if (options.extent_pages == 0) {
    return absl::InvalidArgumentError("extent_pages must be positive");
  }
  const uint64_t slots = options.budget_bytes / static_cast<uint64_t>(options.slot_bytes);
  if (slots == 0) {
    return absl::InvalidArgumentError(absl::StrCat("budget_bytes ", options.budget_bytes,
                                                   " is less than one slot of ", options.slot_bytes,
                                                   " bytes"));
  }
  return slots;
}

PagePool::PagePool(Tier tier, const PagePoolOptions& options, uint64_t num_slots, Memory memory)
    : tier_(tier),
      slot_bytes_(options.slot_bytes),
      num_slots_(num_slots),
      extent_pages_(options.extent_pages),
      base_(memory.base),
      shared_budget_(options.shared_budget),
      host_accessible_(memory.host_accessible),
      emulated_(memory.emulated),
      allocator_(num_slots) {}

absl::StatusOr<Extent> PagePool::AllocateLocked(uint64_t num_slots,
                                                std::optional<uint64_t> preferred) {
  if (num_slots == 0) num_slots = extent_pages_;
  if (num_slots > num_slots_) {
    ++failed_allocations_;
    return absl::InvalidArgumentError(
        absl::StrCat("extent of ", num_slots, " slots exceeds the pool's ", num_slots_));
  }
  absl::StatusOr<Extent> extent = allocator_.Allocate(num_slots, preferred);
  if (!extent.ok()) {
    ++failed_allocations_;
    return extent.status();
  }
  if (shared_budget_ != nullptr &&
      !shared_budget_->TryCharge(extent->num_slots * static_cast<uint64_t>(slot_bytes_))) {
    // Just allocated, so this cannot fail.
    (void)allocator_.Free(*extent);
    ++failed_allocations_;
    return absl::ResourceExhaustedError(absl::StrCat(
        "shared budget of ", shared_budget_->capacity(), " bytes (", shared_budget_->used(),
        " used) cannot take ", num_slots, " more slots of ", slot_bytes_, " bytes"));
  }
  ++allocations_;
  peak_used_slots_ = std::max(peak_used_slots_, allocator_.used_slots());
  return extent;
}

absl::StatusOr<Extent> PagePool::AllocateExtent(uint64_t num_slots) {
  MutexLock lock(&mu_);
  return AllocateLocked(num_slots, std::nullopt);
}

absl::StatusOr<Extent> PagePool::GrowExtent(const Extent& previous, uint64_t num_slots) {
  MutexLock lock(&mu_);
  return AllocateLocked(num_slots, previous.end_slot());
}

absl::Status PagePool::Free(const Extent& extent) {
  MutexLock lock(&mu_);
  absl::Status status = allocator_.Free(extent);
  if (status.ok() && shared_budget_ != nullptr) {
    shared_budget_->Release(extent.num_slots * static_cast<uint64_t>(slot_bytes_));
  }
  return status;
}

PagePoolStats PagePool::Stats() const {
  MutexLock lock(&mu_);
  PagePoolStats stats;
  const uint64_t slot = static_cast<uint64_t>(slot_bytes_);
  stats.tier = tier_;
  stats.emulated = emulated_;
  stats.slot_bytes = slot_bytes_;
  stats.capacity_bytes = num_slots_ * slot;
  stats.used_bytes = allocator_.used_slots() * slot;
  stats.peak_used_bytes = peak_used_slots_ * slot;
  stats.live_extents = allocator_.live_extents();
  stats.free_runs = allocator_.free_runs();
  stats.largest_free_run_slots = allocator_.largest_free_run();
  stats.allocations = allocations_;
  stats.failed_allocations = failed_allocations_;
  return stats;
}

}  // namespace headwise
