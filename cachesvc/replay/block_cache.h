// Eviction policies over content-addressed blocks (prefix blocks of a request-level trace, or
// the prefix cache's full blocks): one small interface, five implementations registered by name.
// Every policy counts capacity in blocks (all blocks cost the same), is deterministic (no wall
// clock, no randomness: the order of calls decides everything) and is single-threaded (callers
// synchronize).
//
//   "lru"     least recently used.
//   "lfu"     least frequently used; a block's count starts at 1 when it is inserted and grows by
//             one per Touch; it is forgotten when the block leaves. Ties: among the blocks with
//             the lowest count, the least recently used (inserted or touched) goes first.
//   "s3fifo"  S3-FIFO (Yang et al., SOSP'23), as the paper's reference implementation
//             (libCacheSim S3FIFOv0): a small FIFO of max(1, capacity/10) blocks, a main FIFO of
//             the rest, a ghost FIFO of ids (as many entries as the main FIFO's capacity), a
//             per-block frequency capped at 3. New blocks enter the small FIFO (or the main one
//             when their id is in the ghost). Eviction takes from the main FIFO when it is over
//             its share or the small one is empty, else from the small FIFO. From the small FIFO,
//             a tail block touched at least twice moves to the main FIFO (frequency cleared),
//             otherwise it is evicted and its id enters the ghost. From the main FIFO, a tail
//             block with frequency f > 0 is reinserted at the head with f - 1, otherwise evicted.
//   "arc"     ARC (Megiddo & Modha, FAST'03, Fig. 4): T1/T2 resident, B1/B2 ghosts, target p
//             adapted by ghost hits (a real number, as in the paper).
//   "belady"  the offline optimum (Belady's MIN): it is given the whole reference string up front
//             and evicts the resident block whose next use is farthest (never used again first;
//             ties: the larger id). A new block whose next use is no nearer than every resident's
//             is not admitted (the same miss count as admitting and evicting it next). For the
//             count of misses on a reference string no policy does better, which makes it the
//             ceiling of the hit ratio for every online policy at the same capacity.
#ifndef HEADWISE_CACHESVC_REPLAY_BLOCK_CACHE_H_
#define HEADWISE_CACHESVC_REPLAY_BLOCK_CACHE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace headwise {

// A block's content id (the Mooncake trace's hash_ids; a prefix block's chained hash).
using BlockId = uint64_t;

class BlockCache {
 public:
  // REQUIRES: capacity >= 1.
  explicit BlockCache(int64_t capacity) : capacity_(capacity) {}
  virtual ~BlockCache() = default;
  BlockCache(const BlockCache&) = delete;
  BlockCache& operator=(const BlockCache&) = delete;

  // The registered name ("lru", ...).
  virtual std::string_view name() const = 0;
  // The most blocks the cache holds.
  int64_t capacity() const { return capacity_; }
  // Blocks resident now (<= capacity()).
  virtual int64_t size() const = 0;

  // Whether `id` is resident. Changes nothing (ghost entries do not count).
  virtual bool Lookup(BlockId id) const = 0;
  // Records one use of the resident block `id`. REQUIRES: Lookup(id).
  virtual void Touch(BlockId id) = 0;
  // Records one use of the non-resident block `id` and makes it resident, evicting what the
  // policy chooses; every evicted id is appended to `evicted` when it is not null. Returns false
  // when the policy declines to keep `id` (only "belady" does). REQUIRES: !Lookup(id).
  virtual bool Insert(BlockId id, std::vector<BlockId>* evicted) = 0;
  // Drops `id` if it is resident (its owner freed it); not an eviction, so no ghost entry is
  // made. Returns whether it was resident.
  virtual bool Erase(BlockId id) = 0;

  // One reference: Touch when resident (returns true, a hit), else Insert (returns false).
  bool Access(BlockId id, std::vector<BlockId>* evicted = nullptr) {
    if (Lookup(id)) {
      Touch(id);
      return true;
    }
    Insert(id, evicted);
    return false;
  }

 private:
  int64_t capacity_;
};

// Registered policy names in display order: "lru", "lfu", "s3fifo", "arc", "belady".
std::vector<std::string> BlockCachePolicyNames();

// Whether the policy named `name` needs the whole reference string up front ("belady").
bool BlockCachePolicyIsOffline(std::string_view name);

// A new, empty cache of the policy `name` (case-sensitive, as listed above) holding `capacity`
// blocks. `future` is the whole reference string, in the order Touch/Insert will be called: the
// offline policy plans from it (calls that stray from it still work, with a worse choice); the
// online ones ignore it. INVALID_ARGUMENT for an unknown name (listing the names) or a capacity
// below 1.
absl::StatusOr<std::unique_ptr<BlockCache>> MakeBlockCache(std::string_view name, int64_t capacity,
                                                           absl::Span<const BlockId> future = {});

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_REPLAY_BLOCK_CACHE_H_
