// Belady's MIN (block_cache.h): the offline optimum over a known reference string.
#include <limits>
#include <set>
#include <utility>

#include "cachesvc/replay/block_cache_internal.h"

namespace headwise::replay_internal {
namespace {

constexpr int64_t kNever = std::numeric_limits<int64_t>::max();

class BeladyCache final : public BlockCache {
 public:
  BeladyCache(int64_t capacity, absl::Span<const BlockId> future)
      : BlockCache(capacity), next_(future.size(), kNever) {
    // next_[i]: the next position after i that references future[i]; chain_ starts at each id's
    // first position.
    absl::flat_hash_map<BlockId, int64_t> last;
    for (int64_t i = 0; i < static_cast<int64_t>(future.size()); ++i) {
      const auto [it, first] = last.try_emplace(future[i], i);
      if (first) {
        chain_[future[i]] = i;
      } else {
        next_[it->second] = i;
        it->second = i;
      }
    }
  }

  std::string_view name() const override { return "belady"; }
  int64_t size() const override { return static_cast<int64_t>(resident_.size()); }
  bool Lookup(BlockId id) const override { return resident_.contains(id); }

  void Touch(BlockId id) override {
    int64_t& next = resident_.at(id);
    order_.erase({next, id});
    next = NextUse(id);
    order_.insert({next, id});
  }

  bool Insert(BlockId id, std::vector<BlockId>* evicted) override {
    const int64_t next = NextUse(id);
    if (size() >= capacity()) {
      const auto farthest = std::prev(order_.end());
      if (next >= farthest->first) return false;  // Not admitted: needed no sooner.
      if (evicted != nullptr) evicted->push_back(farthest->second);
      resident_.erase(farthest->second);
      order_.erase(farthest);
    }
    resident_[id] = next;
    order_.insert({next, id});
    return true;
  }

  bool Erase(BlockId id) override {
    const auto it = resident_.find(id);
    if (it == resident_.end()) return false;
    order_.erase({it->second, id});
    resident_.erase(it);
    return true;
  }

 private:
  // Consumes one position of the reference string for a use of `id` and returns the position of
  // its next use after this one (kNever when there is none).
  int64_t NextUse(BlockId id) {
    const int64_t now = now_++;
    const auto it = chain_.find(id);
    if (it == chain_.end()) return kNever;
    int64_t& position = it->second;
    while (position != kNever && position <= now) position = next_[position];
    return position;
  }

  std::vector<int64_t> next_;
  absl::flat_hash_map<BlockId, int64_t> chain_;
  int64_t now_ = 0;
  absl::flat_hash_map<BlockId, int64_t> resident_;  // id -> next use.
  std::set<std::pair<int64_t, BlockId>> order_;     // (next use, id); the last is evicted.
};

}  // namespace

std::unique_ptr<BlockCache> MakeBeladyCache(int64_t capacity, absl::Span<const BlockId> future) {
  return std::make_unique<BeladyCache>(capacity, future);
}

}  // namespace headwise::replay_internal
