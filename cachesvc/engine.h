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
// keeps pages in the host pool and stages a whole layer on the device to attend it, keeping the
// next layer staged while the current one computes; head_offload (HeadInfer) keeps pages in the
// host pool and stages one KV head at a time, prefetching the next ones. With a disk tier, the
// host pool spills the coldest full pages of the sequence that needs room to RocksDB; they come
// back on demand.
//
// The policy stack (policies/policy_stack.h), built per sequence from its PolicySpec, decides;
// the engine applies. After every append each (layer, kv head)'s ActionPolicy chooses whole
// pages and single tokens to drop (plan, then apply: a failing decision undoes the append);
// pages carry their positions, so after token drops a head is sparse and compacted. Query-aware
// PageSelectors choose the pages each decode query reads. Where the stack keeps token scores,
// decode calls feed the kernel's attention statistics to its TokenScorer.
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
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/random/random.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "cachesvc/base/ids.h"
#include "cachesvc/base/layout.h"
#include "cachesvc/base/mutex.h"
#include "headwise/v1/policy.pb.h"
#include "offload/copy_engine.h"
#include "offload/device_pool.h"
#include "offload/disk_store.h"
#include "offload/host_pool.h"
#include "offload/tier_budget.h"
#include "policies/stages.h"

namespace headwise {

class PatternDirectory;  // policies/pattern_directory.h
namespace kernels {
struct PagedKvView;  // kernels/attention.h
}  // namespace kernels

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
  // Where DuoAttention patterns named by a PolicySpec (head_roles.duo_attention.pattern_name)
  // are looked up; not owned, must outlive the engine. nullptr: no named patterns (a spec that
  // names one is FAILED_PRECONDITION; inline gates still work). Default: nullptr.
  const PatternDirectory* patterns = nullptr;
  // Fault injection for tests (RocksDB SyncPoint style): called at each named point where the
  // engine may fail ("alloc.<tier>" before taking a slot, "disk.get" before reading a page back,
  // "copy.submit" before submitting a staging copy); a non-OK result is treated as that
  // operation's failure. Default: none.
  std::function<absl::Status(std::string_view point)> fault_hook;
};

// Bytes of one tier, summed over the pools of every page size.
struct TierUsage {
  uint64_t used_bytes = 0;    // Slots handed out (pages plus extent spares and staging copies).
  uint64_t peak_bytes = 0;    // Highest used_bytes of the tier as a whole.
  uint64_t budget_bytes = 0;  // The tier's byte budget (EngineOptions), shared by its pools.
};

// How well pages copied to the device ahead of need matched what attention then read, under the
// offload placements (layer_offload: the Prefetcher's layers or, with a page selector, the pages
// it predicts; head_offload: the next heads). Precision = used / prefetched; recall = used /
// needed; late pages were needed but not there in time (copied at demand priority).
struct PrefetchCounts {
  int64_t prefetched_pages = 0;  // Pages copied ahead of need.
  int64_t used_pages = 0;        // Of those, pages attention read (the copy was reused).
  int64_t needed_pages = 0;      // Pages attention read that had to be on the device.
  int64_t late_pages = 0;        // Needed pages not prefetched: copied on demand.
  int64_t late_bytes = 0;        // late_pages * page bytes.
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
  // All of those bytes by purpose, indexed by CopyPriority (demand fetch, prefetch, write-back,
  // demotion).
  std::array<uint64_t, kNumCopyPriorities> bytes_by_purpose{};
  // Copy time waited for (stall) vs. hidden behind other work (overlapped), nanoseconds.
  uint64_t stall_ns = 0;
  uint64_t overlapped_ns = 0;
  int64_t sequences = 0;
  // Pages dropped by eviction policies, spilled host->disk, fetched disk->host, copied on write.
  int64_t evicted_pages = 0;
  // Dropped tokens a merge policy folded into kept ones (each counted once).
  int64_t merged_tokens = 0;
  int64_t spilled_pages = 0;
  int64_t fetched_pages = 0;
  int64_t cow_copies = 0;
  // Disk pages that could not be deleted when they were freed or fetched back: their bytes stay
  // in the RocksDB store until it is wiped (the daemon wipes its spill store at start).
  int64_t disk_delete_failures = 0;
  // Prefetch quality over every sequence.
  PrefetchCounts prefetch;
};

struct SequenceStats {
  // Smallest layer length (the last completed step) and the per-layer lengths.
  int64_t length = 0;
  std::vector<int64_t> layer_lengths;
  // Pages referenced by this sequence's page tables, per tier (shared pages included).
  int64_t device_pages = 0;
  int64_t host_pages = 0;
  int64_t disk_pages = 0;
  // Of those, pages also referenced by another sequence (fork sharing); -1 unless asked for
  // (StatsDetail::kWithSharing), since counting them walks every page.
  int64_t shared_pages = -1;
  // Pages * page bytes per tier.
  int64_t device_bytes = 0;
  int64_t host_bytes = 0;
  int64_t disk_bytes = 0;
  // Tokens currently held over every (layer, head), after eviction.
  int64_t retained_tokens = 0;
  // Prefetch quality of this sequence.
  PrefetchCounts prefetch;
  // Pages this sequence dropped whole, and tokens it dropped (whole pages and single tokens).
  int64_t evicted_pages = 0;
  int64_t evicted_tokens = 0;
  // Of the dropped tokens, those a merge policy folded into kept ones.
  int64_t merged_tokens = 0;
  // Decode steps (tokens) completed by every layer; a prefill of T tokens counts T.
  int64_t step = 0;
};

// What one decode step of one layer would do, computed without doing it (Engine::PlanDecodeStep):
// the pages the append takes, what the stack's actions drop, the pages the kernel reads and the
// bytes the step moves by purpose. Replay and schedulers cost steps with it.
struct StepPlan {
  // Pages the append takes in the sequence's home tier (fresh pages and copy-on-write copies),
  // and of those the copies.
  int64_t pages_allocated = 0;
  int64_t cow_copies = 0;
  // What the actions drop. Policies that decide after the attention (scores, e.g. H2O) are not
  // known in advance: then drops_known is false and the counts are 0.
  bool drops_known = true;
  int64_t pages_dropped = 0;
  int64_t tokens_dropped = 0;
  // Pages the kernel reads. With a query-aware PageSelector the plan (which has no query)
  // counts every page: an upper bound.
  int64_t pages_attended = 0;
  // Bytes the step moves, by purpose (CopyPriority): demand fetch (pages staged for this layer
  // that are not already on the device; disk pages read back), prefetch (layers or heads staged
  // ahead), write-back (host pages spilled to disk to make room; an estimate: the shortfall of
  // free host slots, while the engine spills in extents), demotion (none yet).
  std::array<uint64_t, kNumCopyPriorities> bytes{};
};

// What the policy stack dropped from one layer in one operation: for each kv head, the positions
// of the tokens it removed (whole pages and single tokens), ascending. Logged by the daemon for
// policies whose decisions depend on queries, and given back to Engine::AppendReplay on restore.
struct LayerDrops {
  std::vector<std::vector<int64_t>> positions;  // [num_kv_heads][...]
};

// Called by an operation once its decisions are made and before anything is committed; a non-OK
// status undoes the operation (the sequence is left as it was) and is returned. The daemon
// writes a durable sequence's decisions to its log here.
using CommitHook = std::function<absl::Status(const LayerDrops&)>;

// A block of pages pinned for the prefix cache (Engine::PinBlocks).
using BlockPagesId = TypedIndex<struct BlockPagesTag, uint64_t>;
struct PinnedBlock {
  BlockPagesId id;
  Tier tier = Tier::kHost;
  // Positions [first_position, first_position + tokens) of every layer and kv head.
  int64_t first_position = 0;
  int64_t tokens = 0;
  // Pages * page bytes over every layer and kv head.
  int64_t bytes = 0;
};

// How much GetSequenceStats computes. kUsage is O(layers): every figure is maintained
// incrementally. kWithSharing also counts shared pages, walking every page of the sequence.
enum class StatsDetail : uint8_t { kUsage = 0, kWithSharing = 1 };

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
                      absl::Span<const std::byte> v, int num_tokens, DType dtype,
                      const CommitHook* before_commit = nullptr);

  // Restore: appends as Append does, but applies exactly `drops` (what the original operation's
  // decisions removed, as its CommitHook saw them) instead of asking the policy stack.
  // INVALID_ARGUMENT (nothing changed) when `drops` names a position the layer does not hold or
  // the newest token.
  absl::Status AppendReplay(const SequenceId& seq, LayerId layer, absl::Span<const std::byte> k,
                            absl::Span<const std::byte> v, int num_tokens, DType dtype,
                            const LayerDrops& drops);

  // True when the sequence's decisions depend on its queries (a score-driven action policy):
  // replaying its appends alone would not rebuild the same pages, so the daemon logs them.
  absl::StatusOr<bool> DecisionsDependOnQueries(const SequenceId& seq);

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
                       DType dtype, absl::Span<float> o, absl::Span<float> lse,
                       const CommitHook* before_commit = nullptr);

  // One decode step of one layer, atomically: the query attends over the cached tokens of `layer`
  // plus the new token (k, v: [1][num_kv_heads][head_dim] in `dtype`), then the token is
  // appended. Equivalent to Append followed by Attend, but all-or-nothing: when attention cannot
  // run (e.g. the device tier cannot stage the layer) or the append is refused, the sequence is
  // unchanged. q, o: [num_q_heads][head_dim]; lse: [num_q_heads]. On success *layer_length (if
  // not null) is the layer's length after the append.
  absl::Status DecodeStep(const SequenceId& seq, LayerId layer, absl::Span<const float> q,
                          absl::Span<const std::byte> k, absl::Span<const std::byte> v, DType dtype,
                          absl::Span<float> o, absl::Span<float> lse,
                          int64_t* layer_length = nullptr,
                          const CommitHook* before_commit = nullptr);

  // One item of a batched decode step: the arguments of DecodeStep for one sequence, and its
  // result. Distinct items must name distinct sequences.
  struct DecodeItem {
    SequenceId seq;
    absl::Span<const float> q;
    absl::Span<const std::byte> k;
    absl::Span<const std::byte> v;
    absl::Span<float> o;
    absl::Span<float> lse;
    absl::Status status;       // Out: this item's result.
    int64_t layer_length = 0;  // Out: on success, the layer's length after the append.
    const CommitHook* before_commit = nullptr;  // As DecodeStep's.
  };
  // One layer's decode step for many sequences, as a serving engine batches them. Each item is
  // an independent DecodeStep (its own status; one failing item changes nothing of its sequence
  // and does not affect the others); results equal one DecodeStep call per item. The sequences'
  // locks are taken in a fixed (handle) order, so concurrent batches cannot deadlock.
  // INVALID_ARGUMENT (and nothing done) when two items name the same sequence.
  absl::Status DecodeStepBatch(LayerId layer, DType dtype, absl::Span<DecodeItem> items);

  // A new sequence sharing every page of `seq` copy-on-write, with the same lengths, layout and
  // policies. The parent is unchanged by anything done to the child and vice versa.
  absl::StatusOr<SequenceId> Fork(const SequenceId& seq);

  // Drops every token at position >= new_length from every layer. INVALID_ARGUMENT unless
  // 0 <= new_length <= length() (a step in progress cannot be truncated into).
  absl::Status Truncate(const SequenceId& seq, int64_t new_length);

  // Frees the sequence; its handle is NOT_FOUND afterwards.
  absl::Status Release(const SequenceId& seq);

  // The plan of a DecodeStep of `layer` at the sequence's current state, with no side effect.
  // Errors as DecodeStep's validation (layer range, the append rule).
  absl::StatusOr<StepPlan> PlanDecodeStep(const SequenceId& seq, LayerId layer);

  // The positions (layer, kv_head) holds, in the order the kernel reads them (increasing).
  // O(tokens held). INVALID_ARGUMENT for a layer or head outside the layout.
  absl::StatusOr<std::vector<int64_t>> HeldPositions(const SequenceId& seq, LayerId layer,
                                                     HeadId kv_head);

  // Prefix blocks (engine_prefix.cc): the pages of a run of leading positions of a sequence,
  // held by reference (like a fork) so that they outlive it, for the prefix cache
  // (cachesvc/prefix/). A block covers positions [first_position, first_position + tokens) of
  // EVERY (layer, kv head); `tokens` is a multiple of the layout's page_tokens, so a block is
  // whole pages. Ids are engine-wide and never reused.
  //
  // Pins the sequence's blocks [first_block, first_block + max_blocks) of `block_tokens` tokens
  // each, in order, stopping before the first block that some (layer, kv head) does not hold
  // densely (its pages not exactly the block's positions, e.g. after an eviction), whose pages
  // are not all in memory (a spilled page), or that is not complete in every layer. Returns one
  // PinnedBlock per pinned block (possibly none). INVALID_ARGUMENT unless block_tokens is a
  // positive multiple of page_tokens and first_block >= 0.
  absl::StatusOr<std::vector<PinnedBlock>> PinBlocks(const SequenceId& seq, int64_t block_tokens,
                                                     int64_t first_block, int64_t max_blocks);
  // Drops a pin (its pages are freed once no sequence references them). NOT_FOUND for an
  // unknown id.
  absl::Status UnpinBlock(BlockPagesId id);
  // A new sequence (as CreateSequence) that starts with the pinned blocks `blocks` (block i must
  // cover positions [i * tokens, (i + 1) * tokens)), sharing their pages copy-on-write in every
  // layer and head: its length is the blocks' tokens, nothing is copied. The blocks stay pinned.
  // NOT_FOUND for an unknown block or layout; INVALID_ARGUMENT for blocks out of order, of
  // another page layout, or in a tier that is not the spec's home tier; errors of
  // CreateSequence.
  absl::StatusOr<SequenceId> CreateSequenceFromBlocks(const std::string& layout_name,
                                                      const headwise::v1::PolicySpec& spec,
                                                      absl::Span<const BlockPagesId> blocks);
  // The payload of a pinned block: every page, layer-major, then kv head, then page, each the
  // page's page_bytes() bytes (K rows then V rows, as stored). NOT_FOUND for an unknown id.
  absl::StatusOr<std::string> ReadBlock(BlockPagesId id);
  // A new pinned block of layout `layout_name` in `tier` (device or host) covering positions
  // [first_position, first_position + tokens), filled from `payload` (ReadBlock's format);
  // no sequence references it yet. INVALID_ARGUMENT for a payload of the wrong size, tokens not
  // a positive multiple of page_tokens, a first_position that is not a multiple of tokens, or
  // the disk tier; RESOURCE_EXHAUSTED when the tier is full (nothing kept).
  absl::StatusOr<PinnedBlock> ImportBlock(const std::string& layout_name, Tier tier,
                                          int64_t first_position, int64_t tokens,
                                          absl::Span<const std::byte> payload);
  // Blocks pinned now.
  int64_t pinned_blocks() const;

  absl::StatusOr<SequenceStats> GetSequenceStats(const SequenceId& seq,
                                                 StatsDetail detail = StatsDetail::kWithSharing);
  EngineStats GetStats() const;

 private:
  struct Sequence;
  struct PhysPage;
  struct HeadTable;
  struct Staging;
  struct AppendPlan;
  struct WindowVotes;
  // One page of a head table: the table and the page's ordinal in it.
  struct PageRef {
    HeadTable* table;
    size_t index;
  };
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
  absl::Status FetchToHost(Sequence& s, absl::Span<const PageRef> pages, size_t protect_begin,
                           size_t protect_end);
  static void FreeSlot(const PoolSet& pools, Tier tier, uint64_t slot);

  // Staging of heads [h_begin, h_end) of `layer` on the device, pages [page_begin, page_end) of
  // each (clamped to the head's pages); see engine.cc.
  // Page ordinals to attend per kv head of a layer (ascending), indexed by head.
  using PageLists = std::vector<std::vector<int32_t>>;
  absl::Status Stage(Sequence& s, int layer, int h_begin, int h_end, CopyPriority priority,
                     int protect_from_head, Staging& out, const PageLists* lists = nullptr,
                     size_t page_begin = 0, size_t page_end = SIZE_MAX);
  // Stage's parts: the pages a staging covers in CSR order (and how many per head), the view's
  // counts (page_len, last_page_len; marks them touched), and the device slots for `count`
  // copies (recorded in out.extents; nothing kept on failure).
  void ListStaged(Sequence& s, int layer, int h_begin, int h_end, const PageLists* lists,
                  size_t page_begin, size_t page_end, std::vector<PageRef>& pages,
                  std::vector<int32_t>& per_head);
  void DescribeView(Sequence& s, const std::vector<PageRef>& pages,
                    const std::vector<int32_t>& per_head, Staging& out);
  absl::Status AllocateStagingSlots(Sequence& s, int layer, size_t count, Staging& out,
                                    std::vector<uint64_t>& dst);
  static absl::Status WaitStaged(Staging& staging);
  static void Unpin(Staging& staging);
  // Submits the host-to-device copy of `page` into device slot `dst_slot` for `out` (whose
  // pools are set), pinning the page until the copy is waited for.
  absl::Status SubmitCopy(PhysPage* page, uint64_t dst_slot, CopyPriority priority, Staging& out);
  // A fresh payload version (PhysPage::version).
  uint64_t NextVersion() { return next_version_.fetch_add(1, std::memory_order_relaxed); }
  // layer_offload's staging kept across calls (Sequence::layer_stage). REQUIRES: s.mu held.
  // Restage: `layer`'s view, reusing the kept copies of pages unchanged since (page and version
  // equal) and copying the rest. PrefetchLayers: stages the layers the Prefetcher names after
  // `layer`, best effort (with a page selector: the pages PredictPages names, from the query
  // proxy or `q`). SettleLayer: waits for `layer`'s kept copies (before its pages are
  // written). DropLayerStages: releases every kept staging.
  absl::Status Restage(Sequence& s, int layer, Staging& kept, const PageLists* lists, Staging& out);
  void PrefetchLayers(Sequence& s, int layer, const float* q);
  void SettleLayer(Sequence& s, int layer);
  void DropLayerStages(Sequence& s);
  static void Unstage(Staging& staging);

  absl::Status ValidateAppend(const Sequence& s, int layer, int64_t k_bytes, int64_t v_bytes,
                              int num_tokens, DType dtype) const;
  // Append = PlanAppend (takes every slot, fills copy-on-write copies; on error frees what it
  // took and changes nothing) + ApplyAppend (cannot fail) + the stack's actions, then
  // CommitAppend. UndoAppend reverts an applied, uncommitted plan. REQUIRES: s.mu held.
  absl::Status AppendLocked(Sequence& s, int layer, const std::byte* k, const std::byte* v,
                            int num_tokens, const CommitHook* before_commit,
                            WindowVotes* votes = nullptr);
  // SnapKV's votes (engine_select.cc): the window of a Prefill chunk over heads [h_begin,
  // h_end) of `staged` (q: [T][num_q_heads][D], k: [T][h_end - h_begin][D]), and their layout
  // over the pages after the append.
  absl::Status ComputeWindowVotes(Sequence& s, const Staging& staged, const float* q,
                                  const std::byte* k, int num_tokens, int num_q_heads,
                                  WindowVotes& out);
  void LayoutWindowVotes(Sequence& s, const AppendPlan& plan, WindowVotes& votes);
  // Drops the token drops that cannot be applied now (pages shared or on disk) from `actions`,
  // so that what is applied is exactly what LayerDropsOf reports; then the positions removed.
  void KeepApplicable(Sequence& s, int layer, std::vector<HeadActions>& actions);
  LayerDrops LayerDropsOf(Sequence& s, int layer, const std::vector<HeadActions>& actions);
  // The actions that remove exactly `drops`; INVALID_ARGUMENT for a position not held or the
  // newest token.
  absl::Status ActionsFor(Sequence& s, int layer, const LayerDrops& drops,
                          std::vector<HeadActions>& out);
  absl::Status PlanAppend(Sequence& s, int layer, int num_tokens, AppendPlan& plan);
  void ApplyAppend(Sequence& s, AppendPlan& plan, const std::byte* k, const std::byte* v);
  void UndoAppend(Sequence& s, AppendPlan& plan);
  void ScoreAppendedKeys(Sequence& s, HeadTable& t, int h, int n, const std::byte* k);
  // The end of every appending operation, given the status so far (`st`) and the decided
  // actions: the applicable drops, the commit hook, then commit and apply, or undo on any error.
  absl::Status FinishAppend(Sequence& s, AppendPlan& plan, absl::Status st,
                            std::vector<HeadActions>& actions, const CommitHook* before_commit);
  // Ends an applied plan for good: releases the pages its copy-on-write copies replaced.
  void CommitAppend(Sequence& s, AppendPlan& plan);
  // The stack's decisions for every head of `layer` (pure), and applying them (cannot fail:
  // token drops on pages that are shared or not in memory are left for a later decision).
  absl::Status DecideActions(Sequence& s, int layer, std::vector<HeadActions>& out,
                             const WindowVotes* votes = nullptr);
  void ApplyActions(Sequence& s, int layer, const std::vector<HeadActions>& actions);
  void DropTokens(Sequence& s, HeadTable& t, const std::vector<TokenRef>& drops);
  // Merging (engine_merge.cc): every held key of `t` as f32 (NaN rows on disk); the stack's
  // merge plan for the drops `a` of one head, checked; the merges KeepApplicable left
  // applicable; applying one head's merges (before its drops).
  void HeldKeys(Sequence& s, const HeadTable& t, std::vector<float>& keys);
  absl::Status PlanMerges(Sequence& s, const HeadTable& t, HeadContext& head, HeadActions& a);
  void KeepApplicableMerges(Sequence& s, int layer, std::vector<HeadActions>& actions);
  void ApplyMerges(Sequence& s, HeadTable& t, const HeadMerges& merges);
  void MergePartialPages(Sequence& s, HeadTable& t);
  // Test hook (EngineOptions::fault_hook): the injected failure at `point`, or OK.
  absl::Status Fault(std::string_view point) const;
  // PlanDecodeStep's parts (REQUIRES: s.mu held): the append and the actions on a copy of the
  // layer's page metadata, then the staging.
  absl::Status PlanAppendAndActions(Sequence& s, int layer, StepPlan& plan,
                                    std::vector<std::vector<PageMeta>>& after,
                                    std::vector<std::vector<bool>>& written,
                                    std::vector<std::vector<int32_t>>& origin);
  void PlanStaging(Sequence& s, int layer, const std::vector<std::vector<PageMeta>>& after,
                   const std::vector<std::vector<bool>>& written,
                   const std::vector<std::vector<int32_t>>& origin, StepPlan& plan);
  // Decode attention of `layer` (REQUIRES: s.mu held): over every page, or, with `pending`
  // (the actions about to be applied), every page they keep. Feeds statistics to the stack when
  // it wants them.
  absl::Status AttendLocked(Sequence& s, int layer, const float* q, float* o, float* lse,
                            const std::vector<HeadActions>* pending);
  const PageLists* AttendedPages(Sequence& s, int layer, const std::vector<HeadActions>* pending,
                                 PageLists& storage);
  const PageLists* SelectPages(Sequence& s, int layer, const float* q, const PageLists* base,
                               PageLists& out);
  // Brings HeadTable::key_bounds up to date with the pages' payloads (engine_select.cc).
  void RefreshKeyBounds(Sequence& s, HeadTable& t);
  // What the page selector sees of (layer, h): pages, scores and, when it needs them, fresh key
  // bounds.
  HeadContext SelectorContext(Sequence& s, int layer, int h);
  // With a page selector under layer_offload: the pages of `layer` predicted for its next query
  // (the query proxy: its last query, else `q`, the current layer's), most critical first,
  // within the spec's transfer budget; ascending per head. Null when every page is read.
  const PageLists* PredictPages(Sequence& s, int layer, const float* q, PageLists& out);
  // Adds to the sequence's and the engine's PrefetchCounts (prefetched, used, needed, late).
  void CountPrefetch(Sequence& s, int64_t prefetched, int64_t used, int64_t needed, int64_t late);
  void FeedStats(Sequence& s, int layer, const Staging& staged, const PageLists* lists,
                 size_t page_begin);
  // The kernels' view of `staged` (num_heads heads) in the device pool.
  static kernels::PagedKvView ViewOf(const PagePool& device, const ModelLayout& layout,
                                     const Staging& staged, int num_heads);
  absl::Status RunDecode(Sequence& s, const Staging& staged, const float* q, int num_q_heads,
                         float* o, float* lse, int num_heads);
  absl::Status AttendHeadwise(Sequence& s, int layer, const float* q, float* o, float* lse,
                              const PageLists* lists);
  static absl::Status MergeParts(const std::vector<float>& part_o,
                                 const std::vector<float>& part_lse, int g, int D, int head,
                                 float* o, float* lse);
  absl::Status DecodeStepLocked(Sequence& s, int layer, absl::Span<const float> q,
                                absl::Span<const std::byte> k, absl::Span<const std::byte> v,
                                DType dtype, absl::Span<float> o, absl::Span<float> lse,
                                int64_t* layer_length, const CommitHook* before_commit);
  absl::Status PrefillLocked(Sequence& s, int layer, const float* q, const std::byte* k,
                             const std::byte* v, int num_tokens, float* o, float* lse,
                             const CommitHook* before_commit);

  const EngineOptions options_;
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

  // Blocks pinned for the prefix cache (engine_prefix.cc); released by the destructor.
  struct PinnedPages;
  mutable Mutex blocks_mu_;
  absl::flat_hash_map<uint64_t, std::unique_ptr<PinnedPages>> blocks_ ABSL_GUARDED_BY(blocks_mu_);
  uint64_t next_block_id_ ABSL_GUARDED_BY(blocks_mu_) = 1;
  BlockPagesId AddPinned(std::unique_ptr<PinnedPages> pinned);
  void ReleasePinned(PinnedPages& pinned);
  // The layout named `name`, or NOT_FOUND.
  absl::StatusOr<std::shared_ptr<const LayoutEntry>> FindLayout(const std::string& name) const;
  // Pins block `b` of `s` or returns nullptr when it is not dense and in memory. REQUIRES: s.mu.
  std::unique_ptr<PinnedPages> PinDense(Sequence& s, int64_t first, int64_t tokens);

  std::atomic<int64_t> live_pages_[3] = {0, 0, 0};
  std::atomic<int64_t> disk_bytes_{0};
  std::atomic<int64_t> num_sequences_{0};
  std::atomic<int64_t> evicted_pages_{0};
  std::atomic<int64_t> merged_tokens_{0};
  std::atomic<int64_t> spilled_pages_{0};
  std::atomic<int64_t> fetched_pages_{0};
  std::atomic<int64_t> cow_copies_{0};
  std::atomic<int64_t> disk_delete_failures_{0};
  std::atomic<int64_t> prefetch_counts_[5] = {0, 0, 0, 0, 0};  // PrefetchCounts' fields.
  std::atomic<uint32_t> next_disk_ordinal_{0};
  std::atomic<uint64_t> next_version_{1};
};

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_ENGINE_H_
