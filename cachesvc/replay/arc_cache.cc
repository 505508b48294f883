// ARC (block_cache.h), as Megiddo & Modha, "ARC: A Self-Tuning, Low Overhead Replacement
// Cache", FAST'03, Figure 4. Cases I-IV below are the paper's.
#include <algorithm>

#include "cachesvc/replay/block_cache_internal.h"

namespace headwise::replay_internal {
namespace {

class ArcCache final : public BlockCache {
 public:
  explicit ArcCache(int64_t capacity) : BlockCache(capacity) {}

  std::string_view name() const override { return "arc"; }
  int64_t size() const override { return t1_.size() + t2_.size(); }
  bool Lookup(BlockId id) const override { return t1_.contains(id) || t2_.contains(id); }

  // Case I: a hit moves the block to the MRU end of T2.
  void Touch(BlockId id) override {
    if (t1_.Remove(id)) {
      t2_.PushFront(id);
    } else {
      t2_.MoveToFront(id);
    }
  }

  bool Insert(BlockId id, std::vector<BlockId>* evicted) override {
    const double c = static_cast<double>(capacity());
    const double b1 = static_cast<double>(b1_.size());
    const double b2 = static_cast<double>(b2_.size());
    if (b1_.contains(id)) {  // Case II: a B1 ghost hit grows the recency target.
      p_ = std::min(c, p_ + std::max(b2 / b1, 1.0));
      Replace(/*in_b2=*/false, evicted);
      b1_.Remove(id);
      t2_.PushFront(id);
      return true;
    }
    if (b2_.contains(id)) {  // Case III: a B2 ghost hit shrinks it.
      p_ = std::max(0.0, p_ - std::max(b1 / b2, 1.0));
      Replace(/*in_b2=*/true, evicted);
      b2_.Remove(id);
      t2_.PushFront(id);
      return true;
    }
    // Case IV: a miss everywhere.
    const int64_t l1 = t1_.size() + b1_.size();
    const int64_t all = l1 + t2_.size() + b2_.size();
    if (l1 >= capacity()) {  // Case A.
      if (t1_.size() < capacity()) {
        b1_.PopBack();
        Replace(/*in_b2=*/false, evicted);
      } else {
        Evicted(t1_.PopBack(), evicted);
      }
    } else if (all >= capacity()) {  // Case B.
      if (all >= 2 * capacity()) b2_.PopBack();
      Replace(/*in_b2=*/false, evicted);
    }
    t1_.PushFront(id);
    return true;
  }

  bool Erase(BlockId id) override { return t1_.Remove(id) || t2_.Remove(id); }

 private:
  static void Evicted(BlockId id, std::vector<BlockId>* evicted) {
    if (evicted != nullptr) evicted->push_back(id);
  }

  // REPLACE(x, p): demotes the LRU block of T1 to B1 when T1 is over the target p (or at it, for
  // a B2 hit), else the LRU block of T2 to B2. Only when the cache is full: the paper's
  // invariant, which Erase can break.
  void Replace(bool in_b2, std::vector<BlockId>* evicted) {
    if (size() < capacity()) return;
    const double t1 = static_cast<double>(t1_.size());
    if (t2_.empty() || (!t1_.empty() && ((in_b2 && t1 == p_) || t1 > p_))) {
      const BlockId victim = t1_.PopBack();
      b1_.PushFront(victim);
      Evicted(victim, evicted);
    } else {
      const BlockId victim = t2_.PopBack();
      b2_.PushFront(victim);
      Evicted(victim, evicted);
    }
  }

  IdQueue t1_, t2_, b1_, b2_;
  // The target size of T1, in [0, capacity].
  double p_ = 0;
};

}  // namespace

std::unique_ptr<BlockCache> MakeArcCache(int64_t capacity) {
  return std::make_unique<ArcCache>(capacity);
}

}  // namespace headwise::replay_internal
