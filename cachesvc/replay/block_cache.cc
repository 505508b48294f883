#include "cachesvc/replay/block_cache.h"

#include <set>
#include <tuple>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cachesvc/replay/block_cache_internal.h"

namespace headwise {
namespace replay_internal {
namespace {

class LruCache final : public BlockCache {
 public:
  explicit LruCache(int64_t capacity) : BlockCache(capacity) {}
  std::string_view name() const override { return "lru"; }
  int64_t size() const override { return queue_.size(); }
  bool Lookup(BlockId id) const override { return queue_.contains(id); }
  void Touch(BlockId id) override { queue_.MoveToFront(id); }
  bool Insert(BlockId id, std::vector<BlockId>* evicted) override {
    while (queue_.size() >= capacity()) {
      const BlockId victim = queue_.PopBack();
      if (evicted != nullptr) evicted->push_back(victim);
    }
    queue_.PushFront(id);
    return true;
  }
  bool Erase(BlockId id) override { return queue_.Remove(id); }

 private:
  IdQueue queue_;
};

// Ordered by (count, last use tick, id): the first element is the victim. Ticks count Touch and
// Insert calls, so they are distinct and the id never decides.
class LfuCache final : public BlockCache {
 public:
  explicit LfuCache(int64_t capacity) : BlockCache(capacity) {}
  std::string_view name() const override { return "lfu"; }
  int64_t size() const override { return static_cast<int64_t>(entries_.size()); }
  bool Lookup(BlockId id) const override { return entries_.contains(id); }
  void Touch(BlockId id) override {
    Entry& entry = entries_.at(id);
    order_.erase({entry.count, entry.tick, id});
    ++entry.count;
    entry.tick = ++tick_;
    order_.insert({entry.count, entry.tick, id});
  }
  bool Insert(BlockId id, std::vector<BlockId>* evicted) override {
    while (size() >= capacity()) {
      const BlockId victim = std::get<2>(*order_.begin());
      order_.erase(order_.begin());
      entries_.erase(victim);
      if (evicted != nullptr) evicted->push_back(victim);
    }
    const Entry entry{.count = 1, .tick = ++tick_};
    entries_[id] = entry;
    order_.insert({entry.count, entry.tick, id});
    return true;
  }
  bool Erase(BlockId id) override {
    const auto it = entries_.find(id);
    if (it == entries_.end()) return false;
    order_.erase({it->second.count, it->second.tick, id});
    entries_.erase(it);
    return true;
  }

 private:
  struct Entry {
    int64_t count;
    int64_t tick;
  };
  absl::flat_hash_map<BlockId, Entry> entries_;
  std::set<std::tuple<int64_t, int64_t, BlockId>> order_;
  int64_t tick_ = 0;
};

}  // namespace

std::unique_ptr<BlockCache> MakeLruCache(int64_t capacity) {
  return std::make_unique<LruCache>(capacity);
}
std::unique_ptr<BlockCache> MakeLfuCache(int64_t capacity) {
  return std::make_unique<LfuCache>(capacity);
}

}  // namespace replay_internal

std::vector<std::string> BlockCachePolicyNames() {
  return {"lru", "lfu", "s3fifo", "arc", "belady"};
}

bool BlockCachePolicyIsOffline(std::string_view name) { return name == "belady"; }

absl::StatusOr<std::unique_ptr<BlockCache>> MakeBlockCache(std::string_view name, int64_t capacity,
                                                           absl::Span<const BlockId> future) {
  if (capacity < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("block cache capacity must be at least 1 block, got ", capacity));
  }
  using namespace replay_internal;  // NOLINT(build/namespaces): the factories.
  if (name == "lru") return MakeLruCache(capacity);
  if (name == "lfu") return MakeLfuCache(capacity);
  if (name == "s3fifo") return MakeS3FifoCache(capacity);
  if (name == "arc") return MakeArcCache(capacity);
  if (name == "belady") return MakeBeladyCache(capacity, future);
  return absl::InvalidArgumentError(
      absl::StrCat("unknown block cache policy '", std::string(name),
                   "'; known: ", absl::StrJoin(BlockCachePolicyNames(), ", ")));
}

}  // namespace headwise
