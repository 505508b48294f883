// Engine: the embeddable KV cache engine. It owns the tier pools (device, host, optional disk),
// the copy engines that move pages between them, and the sequences: per (sequence, layer, KV
// head) a page table of head-wise pages (docs/engine.md). Tests, benchmarks and the gRPC daemon
// all use it in-process.
//
// Page sizes. Layouts of different page sizes (ModelLayout::page_bytes()) may be registered in
// one engine: each page size gets its own device pool, host pool and copy engine, created with
// the first layout of that size. The pools of one tier share one byte budget (the engine's
// device_budget_bytes / host_budget_bytes, a TierBudget), so together they never hold more than
// it; the disk tier is one store for every page size.
//
// Sequences and the append rule. A sequence has a length per layer. Appends (Append, Prefill)
// advance one layer at a time in STEPS: when every layer has the same length n, an append of T
// tokens to any layer starts a step to length n + T; until every layer has reached n + T, only
// layers still at n may append, and each must append exactly T tokens. So no layer ever gets past
// n + T before every layer has reached it, and chunk boundaries line up across layers. The
// sequence's length() is the smallest layer length (the last completed step).
//
// Placement (PolicySpec.placement): device_only keeps every page in the device pool (appends past
// the device budget fail with RESOURCE_EXHAUSTED and leave the sequence unchanged); layer_offload
// keeps pages in the host pool and stages a whole layer on the device to attend it; head_offload
// (HeadInfer) keeps pages in the host pool and stages one KV head at a time, prefetching the next
// ones. With a disk tier, the host pool spills the coldest full pages of the sequence that needs
// room to RocksDB; they come back on demand.
//
// Eviction (PolicySpec.eviction / head_roles) is applied after every append: dropped pages are
// freed and later attention covers only the kept pages.
//
// Fork shares every page copy-on-write (refcounts); the first write into a shared partial tail
// page copies it.
//
// Errors: INVALID_ARGUMENT for bad arguments (sizes, dtype, layer), NOT_FOUND for an unknown
// or released sequence or layout, RESOURCE_EXHAUSTED when a tier is full, FAILED_PRECONDITION
// for an append that breaks the append rule.
//
// Thread-safety: every method may be called from any thread. Calls on different sequences run
// concurrently; calls on one sequence are serialized by its lock.
#ifndef HEADWISE_CACHESVC_ENGINE_H_
#define HEADWISE_CACHESVC_ENGINE_H_

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/random/random.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "cachesvc/base/clock.h"
#include "cachesvc/base/ids.h"
#include "cachesvc/base/layout.h"
#include "cachesvc/base/mutex.h"
#include "headwise/v1/policy.pb.h"
#include "offload/copy_engine.h"
#include "offload/device_pool.h"
#include "offload/disk_store.h"
#include "offload/host_pool.h"
#include "offload/tier_budget.h"

namespace headwise {

class PatternDirectory;  // policies/pattern_directory.h

struct EngineOptions {
  // Byte budget of the device tier (emulated with host memory when no GPU). Default: 1 GiB.
  uint64_t device_budget_bytes = uint64_t{1} << 30;
  // Byte budget of the host tier. Default: 1 GiB.
  uint64_t host_budget_bytes = uint64_t{1} << 30;
  // Directory of the RocksDB disk tier. Empty: no disk tier (host-full appends fail instead of
  // spilling). Default: empty.
  std::string disk_path;
  // Pages per extent: the pages of one (sequence, layer, head) are taken from runs of this many
  // contiguous slots so that their moves coalesce. Default: 16.
  uint64_t extent_pages = 16;
  // Copy engine worker threads. Default: 2.
  int copy_threads = 2;
  // OpenMP threads per kernel call. Default: 1 (sequences already run concurrently).
  int compute_threads = 1;
  // Time source; not owned, must outlive the engine. Default: nullptr = Clock::Real().
  Clock* clock = nullptr;
  // Where DuoAttention patterns named by a PolicySpec (head_roles.duo_attention.pattern_name)
  // are looked up; not owned, must outlive the engine. nullptr: no named patterns (a spec that
  // names one is FAILED_PRECONDITION; inline gates still work). Default: nullptr.
  const PatternDirectory* patterns = nullptr;
};

// Bytes of one tier, summed over the pools of every page size.
struct TierUsage {
  uint64_t used_bytes = 0;    // Slots handed out (pages plus extent spares and staging copies).
  uint64_t peak_bytes = 0;    // Highest used_bytes of the tier as a whole.
  uint64_t budget_bytes = 0;  // The tier's byte budget (EngineOptions), shared by its pools.
};

struct EngineStats {
  TierUsage device;
  TierUsage host;
  // True when the device pools are host memory standing in for a GPU.
  bool device_emulated = false;
  bool has_disk = false;
  // Live page payloads per tier (a page shared by forks counts once).
  int64_t device_pages = 0;
  int64_t host_pages = 0;
  int64_t disk_pages = 0;
  // Bytes of the live disk pages (pages of different layouts may differ in size).
  uint64_t disk_bytes = 0;
  // Bytes moved by the copy engines, per direction.
  uint64_t bytes_host_to_device = 0;
  uint64_t bytes_device_to_host = 0;
  uint64_t bytes_host_to_disk = 0;
  uint64_t bytes_disk_to_host = 0;
  // Copy time waited for (stall) vs. hidden behind other work (overlapped), nanoseconds.
  uint64_t stall_ns = 0;
  uint64_t overlapped_ns = 0;
  int64_t sequences = 0;
  // Pages dropped by eviction policies, spilled host->disk, fetched disk->host, copied on write.
  int64_t evicted_pages = 0;
  int64_t spilled_pages = 0;
  int64_t fetched_pages = 0;
  int64_t cow_copies = 0;
  // Disk pages that could not be deleted when they were freed or fetched back: their bytes stay
  // in the RocksDB store until it is wiped (the daemon wipes its spill store at start).
  int64_t disk_delete_failures = 0;
};

struct SequenceStats {
  // Smallest layer length (the last completed step) and the per-layer lengths.
  int64_t length = 0;
  std::vector<int64_t> layer_lengths;
  // Pages referenced by this sequence's page tables, per tier (shared pages included).
  int64_t device_pages = 0;
  int64_t host_pages = 0;
  int64_t disk_pages = 0;
  // Of those, pages also referenced by another sequence (fork sharing).
  int64_t shared_pages = 0;
  // Pages * page bytes per tier.
  int64_t device_bytes = 0;
  int64_t host_bytes = 0;
  int64_t disk_bytes = 0;
  // Tokens currently held over every (layer, head), after eviction.
  int64_t retained_tokens = 0;
  // Pages this sequence dropped by eviction.
  int64_t evicted_pages = 0;
};

class Engine {
 public:
  // INVALID_ARGUMENT for zero budgets, extent_pages < 1, copy_threads < 1; errors of opening
  // the disk store. The pools of a page size are created when the first layout of that page size
  // is registered.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options);
  // Releases every sequence. REQUIRES: no call is in flight.
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Registers `layout` under `name`. INVALID_ARGUMENT for an empty name or an invalid layout
  // (ValidateLayout); ALREADY_EXISTS for a name registered with a different layout (registering
  // the same layout again is OK); RESOURCE_EXHAUSTED when a budget holds no page of it. A layout
  // whose page size no earlier layout has creates that page size's pools (see "Page sizes").
  absl::Status RegisterLayout(const std::string& name, const ModelLayout& layout);

  // A new empty sequence with a fresh 128-bit random handle. NOT_FOUND for an unknown layout
  // or a missing DuoAttention TSV; INVALID_ARGUMENT for a spec that does not resolve
  // (placement, head roles, eviction). Every placement works without a disk tier.
  absl::StatusOr<SequenceId> CreateSequence(const std::string& layout_name,
                                            const headwise::v1::PolicySpec& spec);

  // Appends `num_tokens` tokens to `layer`: k and v are [num_tokens][num_kv_heads][head_dim] in
  // the layout's dtype (the byte sizes must match exactly). Follows the append rule above.
  // All-or-nothing: on any error the sequence is unchanged. Eviction runs afterwards.
  absl::Status Append(const SequenceId& seq, LayerId layer, absl::Span<const std::byte> k,
                      absl::Span<const std::byte> v, int num_tokens, DType dtype);

  // Decode attention of one query token per query head over the current cached (kept) tokens of
  // `layer`. q: [num_q_heads][head_dim]; o: [num_q_heads][head_dim]; lse: [num_q_heads] (natural
  // log; -inf and o = 0 for a layer with no tokens).
  absl::Status Attend(const SequenceId& seq, LayerId layer, absl::Span<const float> q,
                      absl::Span<float> o, absl::Span<float> lse);

  // Chunked causal prefill: the T chunk tokens attend to the cached tokens of `layer` plus the
  // chunk up to themselves (kernels::PrefillAttention), then the chunk is appended (Append's
  // rules and all-or-nothing; eviction runs after the store, so it does not affect this chunk's
  // output). q: [T][num_q_heads][head_dim] f32; k, v: [T][num_kv_heads][head_dim] in `dtype`;
  // o: [T][num_q_heads][head_dim]; lse: [T][num_q_heads] (may be empty: not written).
  absl::Status Prefill(const SequenceId& seq, LayerId layer, absl::Span<const float> q,
                       absl::Span<const std::byte> k, absl::Span<const std::byte> v, int num_tokens,
                       DType dtype, absl::Span<float> o, absl::Span<float> lse);

  // A new sequence sharing every page of `seq` copy-on-write, with the same lengths, layout and
  // policies. The parent is unchanged by anything done to the child and vice versa.
  absl::StatusOr<SequenceId> Fork(const SequenceId& seq);

  // Drops every token at position >= new_length from every layer. INVALID_ARGUMENT unless
  // 0 <= new_length <= length() (a step in progress cannot be truncated into).
  absl::Status Truncate(const SequenceId& seq, int64_t new_length);

  // Frees the sequence; its handle is NOT_FOUND afterwards.
  absl::Status Release(const SequenceId& seq);

  absl::StatusOr<SequenceStats> GetSequenceStats(const SequenceId& seq);
  EngineStats GetStats() const;

 private:
  struct Sequence;
  struct PhysPage;
  struct HeadTable;
  struct Staging;
  // The pools and copy engine of one page size. Created with the first layout of that size and
  // immutable until the engine is destroyed. The copy engine is declared last so that it stops
  // before the pools it uses are released.
  struct PoolSet {
    std::unique_ptr<DevicePool> device;
    std::unique_ptr<HostPool> host;
    std::unique_ptr<CopyEngine> copier;
    PagePool* Pool(Tier tier) const;
  };
  struct LayoutEntry {
    std::string name;
    ModelLayout layout;
    PoolSet* pools = nullptr;  // The pools of layout.page_bytes(); owned by pool_sets_.
  };
  static constexpr int kNumShards = 16;
  struct Shard {
    Mutex mu;
    absl::flat_hash_map<SequenceId, std::shared_ptr<Sequence>> sequences ABSL_GUARDED_BY(mu);
  };

  explicit Engine(const EngineOptions& options);
  Shard& ShardFor(const SequenceId& id) { return shards_[(id.lo() ^ id.hi()) % kNumShards]; }
  // The live sequence, or NOT_FOUND.
  absl::StatusOr<std::shared_ptr<Sequence>> Find(const SequenceId& id);
  absl::Status CheckLive(const Sequence& s) const;
  absl::StatusOr<SequenceId> Insert(std::shared_ptr<Sequence> s);
  // The pools of `page_bytes`, created on first use. REQUIRES: the page size is valid.
  absl::StatusOr<PoolSet*> PoolsFor(int64_t page_bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(layouts_mu_);

  // Page lifetime and slots. The REQUIRES on the sequence lock are stated in engine.cc. A page
  // lives in the pools of its sequence's page size (`pools`).
  PhysPage* NewPage(Tier tier, uint64_t slot);
  void Unref(const PoolSet& pools, PhysPage* page);
  // Deletes a page from the disk tier; a failure is counted in disk_delete_failures.
  void DeleteDiskPage(const PageKey& key);
  void ReleaseArena(const PoolSet& pools, HeadTable& table);
  void ReleaseAllPages(Sequence& s);
  absl::StatusOr<uint64_t> TakeSlot(Sequence& s, HeadTable& table, Tier tier, size_t protect_begin,
                                    size_t protect_end);
  absl::Status SpillColdest(Sequence& s, int64_t count, size_t protect_begin, size_t protect_end);
  absl::Status EnsureInMemory(Sequence& s, HeadTable& table, size_t index, size_t protect_begin,
                              size_t protect_end);
  static void FreeSlot(const PoolSet& pools, Tier tier, uint64_t slot);

  // Staging of heads [h_begin, h_end) of `layer` on the device, pages [page_begin, page_end) of
  // each (clamped to the head's pages); see engine.cc.
  absl::Status Stage(Sequence& s, int layer, int h_begin, int h_end, CopyPriority priority,
                     int protect_from_head, Staging& out, size_t page_begin = 0,
                     size_t page_end = SIZE_MAX);
  static absl::Status WaitStaged(Staging& staging);
  static void Unstage(Staging& staging);

  absl::Status ValidateAppend(const Sequence& s, int layer, int64_t k_bytes, int64_t v_bytes,
                              int num_tokens, DType dtype) const;
  absl::Status AppendLocked(Sequence& s, int layer, const std::byte* k, const std::byte* v,
                            int num_tokens);
  absl::Status ApplyEviction(Sequence& s, int layer);
  absl::Status AttendLocked(Sequence& s, int layer, const float* q, float* o, float* lse);
  absl::Status PrefillLocked(Sequence& s, int layer, const float* q, const std::byte* k,
                             const std::byte* v, int num_tokens, float* o, float* lse);

  const EngineOptions options_;
  Clock* const clock_;
  std::unique_ptr<DiskStore> disk_;
  // The byte budgets of the device and host tiers, charged by the pools of every page size.
  TierBudget device_budget_;
  TierBudget host_budget_;

  mutable Mutex layouts_mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<const LayoutEntry>> layouts_
      ABSL_GUARDED_BY(layouts_mu_);
  // page bytes -> its pools. Entries are only added; a PoolSet stays at its address until the
  // engine is destroyed, so sequences use it without layouts_mu_.
  absl::flat_hash_map<int64_t, std::unique_ptr<PoolSet>> pool_sets_ ABSL_GUARDED_BY(layouts_mu_);

  std::array<Shard, kNumShards> shards_;
  Mutex bitgen_mu_;
  absl::BitGen bitgen_ ABSL_GUARDED_BY(bitgen_mu_);

  std::atomic<int64_t> live_pages_[3] = {0, 0, 0};
  std::atomic<int64_t> disk_bytes_{0};
  std::atomic<int64_t> num_sequences_{0};
  std::atomic<int64_t> evicted_pages_{0};
  std::atomic<int64_t> spilled_pages_{0};
  std::atomic<int64_t> fetched_pages_{0};
  std::atomic<int64_t> cow_copies_{0};
  std::atomic<int64_t> disk_delete_failures_{0};
  std::atomic<uint32_t> next_disk_ordinal_{0};
};

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_ENGINE_H_
