// Shared pieces of the BlockCache implementations (block_cache.h). Internal to headwise_replay.
#ifndef HEADWISE_CACHESVC_REPLAY_BLOCK_CACHE_INTERNAL_H_
#define HEADWISE_CACHESVC_REPLAY_BLOCK_CACHE_INTERNAL_H_

#include <cstdint>
#include <list>
#include <memory>

#include "absl/container/flat_hash_map.h"
#include "absl/types/span.h"
#include "cachesvc/replay/block_cache.h"

namespace headwise::replay_internal {

// An ordered set of ids with O(1) insertion at the front, removal anywhere and access to the
// back: the queues of LRU, S3-FIFO and ARC. Front = newest (MRU, FIFO head), back = oldest.
class IdQueue {
 public:
  bool contains(BlockId id) const { return where_.contains(id); }
  int64_t size() const { return static_cast<int64_t>(where_.size()); }
  bool empty() const { return where_.empty(); }

  // REQUIRES: !contains(id).
  void PushFront(BlockId id) {
    order_.push_front(id);
    where_[id] = order_.begin();
  }
  // REQUIRES: !empty().
  BlockId Back() const { return order_.back(); }
  // Removes and returns the oldest id. REQUIRES: !empty().
  BlockId PopBack() {
    const BlockId id = order_.back();
    order_.pop_back();
    where_.erase(id);
    return id;
  }
  bool Remove(BlockId id) {
    const auto it = where_.find(id);
    if (it == where_.end()) return false;
    order_.erase(it->second);
    where_.erase(it);
    return true;
  }
  // REQUIRES: contains(id).
  void MoveToFront(BlockId id) { order_.splice(order_.begin(), order_, where_.at(id)); }

 private:
  std::list<BlockId> order_;
  absl::flat_hash_map<BlockId, std::list<BlockId>::iterator> where_;
};

// Factories behind MakeBlockCache. REQUIRES: capacity >= 1.
std::unique_ptr<BlockCache> MakeLruCache(int64_t capacity);
std::unique_ptr<BlockCache> MakeLfuCache(int64_t capacity);
std::unique_ptr<BlockCache> MakeS3FifoCache(int64_t capacity);
std::unique_ptr<BlockCache> MakeArcCache(int64_t capacity);
std::unique_ptr<BlockCache> MakeBeladyCache(int64_t capacity, absl::Span<const BlockId> future);

}  // namespace headwise::replay_internal

#endif  // HEADWISE_CACHESVC_REPLAY_BLOCK_CACHE_INTERNAL_H_
