// S3-FIFO (block_cache.h), after the SOSP'23 paper's reference implementation.
#include <algorithm>

#include "cachesvc/replay/block_cache_internal.h"

namespace headwise::replay_internal {
namespace {

// A small-FIFO block touched this many times moves to the main FIFO (the reference's
// move-to-main threshold).
constexpr int kMoveToMainThreshold = 2;
// Frequencies are two bits.
constexpr int kMaxFrequency = 3;

class S3FifoCache final : public BlockCache {
 public:
  explicit S3FifoCache(int64_t capacity)
      : BlockCache(capacity),
        small_capacity_(std::max<int64_t>(1, capacity / 10)),
        main_capacity_(capacity - small_capacity_) {}

  std::string_view name() const override { return "s3fifo"; }
  int64_t size() const override { return small_.size() + main_.size(); }
  bool Lookup(BlockId id) const override { return small_.contains(id) || main_.contains(id); }
  void Touch(BlockId id) override {
    int& frequency = frequency_.at(id);
    frequency = std::min(frequency + 1, kMaxFrequency);
  }
  bool Insert(BlockId id, std::vector<BlockId>* evicted) override {
    const bool in_ghost = ghost_.Remove(id);
    while (size() >= capacity()) Evict(evicted);
    (in_ghost ? main_ : small_).PushFront(id);
    frequency_[id] = 0;
    return true;
  }
  bool Erase(BlockId id) override {
    if (!small_.Remove(id) && !main_.Remove(id)) return false;
    frequency_.erase(id);
    return true;
  }

 private:
  void Evict(std::vector<BlockId>* evicted) {
    if (main_.size() > main_capacity_ || small_.empty()) {
      EvictMain(evicted);
    } else {
      EvictSmall(evicted);
    }
  }

  // Moves tail blocks touched often enough to the main FIFO until one is evicted (its id goes to
  // the ghost) or the small FIFO is empty.
  void EvictSmall(std::vector<BlockId>* evicted) {
    while (!small_.empty()) {
      const BlockId tail = small_.PopBack();
      if (frequency_.at(tail) >= kMoveToMainThreshold) {
        main_.PushFront(tail);
        frequency_[tail] = 0;
        continue;
      }
      frequency_.erase(tail);
      if (evicted != nullptr) evicted->push_back(tail);
      if (main_capacity_ > 0) {
        ghost_.PushFront(tail);
        while (ghost_.size() > main_capacity_) ghost_.PopBack();
      }
      return;
    }
  }

  // Two-bit CLOCK over the main FIFO: reinserts touched tail blocks with one less, evicts the
  // first untouched one.
  void EvictMain(std::vector<BlockId>* evicted) {
    while (!main_.empty()) {
      const BlockId tail = main_.Back();
      int& frequency = frequency_.at(tail);
      if (frequency > 0) {
        frequency = std::min(frequency, kMaxFrequency) - 1;
        main_.MoveToFront(tail);
        continue;
      }
      main_.PopBack();
      frequency_.erase(tail);
      if (evicted != nullptr) evicted->push_back(tail);
      return;
    }
  }

  const int64_t small_capacity_;
  const int64_t main_capacity_;
  IdQueue small_;
  IdQueue main_;
  IdQueue ghost_;
  absl::flat_hash_map<BlockId, int> frequency_;
};

}  // namespace

std::unique_ptr<BlockCache> MakeS3FifoCache(int64_t capacity) {
  return std::make_unique<S3FifoCache>(capacity);
}

}  // namespace headwise::replay_internal
