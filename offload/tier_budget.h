// TierBudget: a byte budget shared by several pools of one tier (e.g. the device pools of
// different page sizes in one engine). Every pool that points at it (PagePoolOptions::
// shared_budget) charges each allocation here as well as against its own slots, so the pools
// together never hold more than capacity() bytes.
//
// Thread-safety: every method may be called from any thread concurrently; charges are
// lock-free (a compare-and-swap loop), so used() never passes capacity() even transiently.
#ifndef HEADWISE_OFFLOAD_TIER_BUDGET_H_
#define HEADWISE_OFFLOAD_TIER_BUDGET_H_

#include <atomic>
#include <cstdint>

namespace headwise {

class TierBudget {
 public:
  explicit TierBudget(uint64_t capacity_bytes) : capacity_(capacity_bytes) {}
  TierBudget(const TierBudget&) = delete;
  TierBudget& operator=(const TierBudget&) = delete;

  uint64_t capacity() const { return capacity_; }
  // Bytes charged and not yet released.
  uint64_t used() const { return used_.load(std::memory_order_relaxed); }
  // Highest used() ever reached.
  uint64_t peak() const { return peak_.load(std::memory_order_relaxed); }

  // Charges `bytes`; false (and nothing charged) when used() + bytes would exceed capacity().
  bool TryCharge(uint64_t bytes) {
    uint64_t used = used_.load(std::memory_order_relaxed);
    do {
      if (bytes > capacity_ - used) return false;
    } while (!used_.compare_exchange_weak(used, used + bytes, std::memory_order_relaxed));
    const uint64_t now = used + bytes;
    uint64_t peak = peak_.load(std::memory_order_relaxed);
    while (peak < now && !peak_.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
    }
    return true;
  }

  // Returns `bytes` charged earlier. REQUIRES: bytes <= used().
  void Release(uint64_t bytes) { used_.fetch_sub(bytes, std::memory_order_relaxed); }

 private:
  const uint64_t capacity_;
  std::atomic<uint64_t> used_{0};
  std::atomic<uint64_t> peak_{0};
};

}  // namespace headwise

#endif  // HEADWISE_OFFLOAD_TIER_BUDGET_H_
