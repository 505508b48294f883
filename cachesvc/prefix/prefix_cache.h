// PrefixCache: the daemon's cache of content-addressed prefix blocks (docs/scale-out.md).
//
// A sequence released with token ids leaves its full blocks (block_hash.h) here, as pages pinned
// in the engine (Engine::PinBlocks): nothing is copied. A new sequence given token ids starts
// from the longest run of leading blocks found here (Engine::CreateSequenceFromBlocks: its pages
// are the cached pages, shared copy-on-write in every layer and head), then, with a remote store,
// from blocks read back from it (imported into the tier, then cached here too).
//
// Budgets and eviction. Blocks are kept per (tier, block bytes): a device part for device_only
// sequences, a host part for the offload placements (a sequence only reuses blocks in its own
// home tier). Each part is one BlockCache of the named policy (cachesvc/replay/block_cache.h, the
// same implementations the request-level replay simulates) whose capacity is the tier's budget
// divided by the block's bytes, so each part keeps at most the tier's budget. A budget of 0
// keeps nothing in that tier. Evicted blocks are unpinned (their pages are freed once no live
// sequence shares them).
//
// References follow the replay's semantics (cachesvc/replay/request_replay.h) so that replaying
// a trace against this cache and simulating it agree: Start touches the blocks it reuses, in
// order, up to the first miss; Publish then references (touches or inserts) every later block
// of the sequence in order.
//
// Thread-safety: every method may be called from any thread; one mutex serializes them (it is
// held across the engine calls and remote reads of Start). Lock order: the daemon's sequence
// locks, then this cache's mutex, then the engine's locks.
#ifndef HEADWISE_CACHESVC_PREFIX_PREFIX_CACHE_H_
#define HEADWISE_CACHESVC_PREFIX_PREFIX_CACHE_H_

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "cachesvc/engine.h"
#include "cachesvc/prefix/block_hash.h"
#include "cachesvc/prefix/remote_block_store.h"
#include "cachesvc/replay/block_cache.h"

namespace headwise {

struct PrefixCacheOptions {
  // Not owned; must outlive the cache. Required.
  Engine* engine = nullptr;
  // Eviction policy (block_cache.h: "lru", "lfu", "s3fifo", "arc"; not the offline "belady").
  // Default: "lru".
  std::string policy = "lru";
  // Bytes of cached blocks kept per tier (per block size). Default: 0 device, 256 MiB host.
  uint64_t device_budget_bytes = 0;
  uint64_t host_budget_bytes = uint64_t{256} << 20;
  // Remote tier; not owned, must outlive the cache. nullptr: none. Default: nullptr.
  RemoteBlockStore* remote = nullptr;
};

// Counters of one tier (device, host, remote).
struct PrefixTierStats {
  // Blocks reused from this tier and their tokens; bytes of those blocks (KV not recomputed
  // and, for device and host, not held twice).
  int64_t hit_blocks = 0;
  int64_t hit_tokens = 0;
  uint64_t bytes_saved = 0;
  // Local tiers: blocks and bytes cached now, the budget, insertions and evictions.
  int64_t resident_blocks = 0;
  uint64_t resident_bytes = 0;
  uint64_t budget_bytes = 0;
  int64_t inserted_blocks = 0;
  int64_t evicted_blocks = 0;
};

struct PrefixCacheStats {
  // Start calls with at least one full block, and blocks they asked for that no tier had.
  int64_t lookups = 0;
  int64_t miss_blocks = 0;
  // Remote blocks that could not be imported (tier full) or whose size did not fit the layout.
  int64_t import_failures = 0;
  // Indexed by Tier (device, host) and 2 for the remote tier.
  std::array<PrefixTierStats, 3> tiers{};
};
inline constexpr int kRemoteTierIndex = 2;

// What Start needs to know about the new sequence.
struct PrefixRequest {
  std::string engine_layout;  // The engine's layout name.
  headwise::v1::PolicySpec spec;
  Tier tier = Tier::kHost;  // The spec's home tier.
  int64_t block_tokens = 0;
  int64_t block_bytes = 0;  // Bytes of one block over every layer and kv head.
  absl::Span<const BlockHash> hashes;
};

struct PrefixStart {
  SequenceId id;
  // Leading tokens the sequence starts with (blocks reused), and of those blocks how many came
  // from the remote tier.
  int64_t cached_tokens = 0;
  int64_t hit_blocks = 0;
  int64_t remote_blocks = 0;
};

class PrefixCache {
 public:
  // INVALID_ARGUMENT for a missing engine or an unknown or offline policy.
  static absl::StatusOr<std::unique_ptr<PrefixCache>> Create(const PrefixCacheOptions& options);
  // Unpins every cached block.
  ~PrefixCache();
  PrefixCache(const PrefixCache&) = delete;
  PrefixCache& operator=(const PrefixCache&) = delete;

  // Creates the sequence, starting from the longest cached prefix of `request.hashes`.
  // Errors of Engine::CreateSequence (nothing cached changes then except the touches).
  absl::StatusOr<PrefixStart> Start(const PrefixRequest& request);

  // Offers the full blocks of the live sequence `seq` (hashes[i] names block i) before it is
  // released: blocks [0, touched) were referenced by its Start; every later one is referenced
  // now (touched when cached, else inserted, evicting as the policy says). Blocks the sequence
  // does not hold densely in memory (Engine::PinBlocks) end the offer. Newly inserted blocks are
  // queued for the remote tier. Best effort: errors are counted, not returned.
  void Publish(const SequenceId& seq, int64_t block_tokens, absl::Span<const BlockHash> hashes,
               int64_t touched);

  PrefixCacheStats Stats() const;

 private:
  struct Entry {
    BlockHash hash;
    BlockPagesId pin;
    int64_t tokens = 0;
  };
  // One tier's blocks of one size.
  struct Part {
    Tier tier = Tier::kHost;
    int64_t block_bytes = 0;
    std::unique_ptr<BlockCache> policy;  // nullptr: the budget holds no block.
    absl::flat_hash_map<BlockId, Entry> entries;
  };

  explicit PrefixCache(const PrefixCacheOptions& options) : options_(options) {}
  Part& PartFor(Tier tier, int64_t block_bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The cached entry of `hash` in `part`, or nullptr.
  static const Entry* Find(const Part& part, const BlockHash& hash);
  // Inserts a pinned block; takes ownership of the pin (unpinned when not admitted). Returns
  // whether it was admitted.
  bool Insert(Part& part, const BlockHash& hash, const PinnedBlock& pin)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Reads request.hashes[from..] from the remote tier, in order up to the first miss, and
  // imports each into the request's tier: the new pins (not cached yet).
  std::vector<PinnedBlock> FetchRemote(const PrefixRequest& request, size_t from)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Unpin(BlockPagesId pin);

  const PrefixCacheOptions options_;
  mutable absl::Mutex mu_;
  // Keyed by (tier, block bytes).
  absl::flat_hash_map<std::pair<int, int64_t>, std::unique_ptr<Part>> parts_ ABSL_GUARDED_BY(mu_);
  PrefixCacheStats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_PREFIX_PREFIX_CACHE_H_
