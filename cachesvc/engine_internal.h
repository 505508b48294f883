// Private to the engine's .cc files (engine.cc, engine_append.cc, engine_tiers.cc,
// engine_attention.cc): the page table of a sequence, its payloads and the staging views.
// Everything here is guarded by the owning sequence's lock (Sequence::mu) unless it says
// otherwise.
#ifndef HEADWISE_CACHESVC_ENGINE_INTERNAL_H_
#define HEADWISE_CACHESVC_ENGINE_INTERNAL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "cachesvc/engine.h"
#include "cachesvc/placement.h"
#include "policies/page_meta.h"
#include "policies/policy_stack.h"

namespace headwise {

// One page payload, shared by the page tables of forked sequences. `refs` counts them. Its
// location (tier, slot, disk_key) changes only while refs == 1, under the lock of the one
// sequence that references it; the acquire load of refs orders that change after every other
// sequence's last read (their release decrement).
struct Engine::PhysPage {
  std::atomic<int32_t> refs{1};
  Tier tier = Tier::kHost;
  uint64_t slot = 0;
  PageKey disk_key;
  // Identifies the payload's contents: a fresh engine-wide value when the page is created and
  // each time its rows are written (append, token drop, compaction), so a staged copy taken at
  // (page, version) is still exact while both match. Changed only while exclusive.
  uint64_t version = 0;
  // Staging copies reading this page that are still in flight: a pinned page is not spilled.
  std::atomic<int32_t> pins{0};

  bool exclusive() const { return refs.load(std::memory_order_acquire) == 1; }
};

// The page table of one (sequence, layer, kv head): metadata as policies see it, the payloads,
// and the spare slots of the extent the head's pages are being taken from.
struct Engine::HeadTable {
  std::vector<PageMeta> meta;
  std::vector<PhysPage*> phys;
  Tier arena_tier = Tier::kHost;
  Extent arena;
  uint64_t arena_next = 0;  // Spare slots: [arena_next, arena.end_slot()).
  bool has_arena = false;
  // Tokens held (the sum of meta[i].token_count), kept up to date by every change.
  int64_t tokens = 0;
  // With a TokenScorer: the score of each held token, page-major (page i row r at
  // scores[i * page_tokens + r]); moved with its token, dropped with it. Empty otherwise.
  std::vector<float> scores;
  // With a selector that needs key bounds (Quest): per page, kmin[head_dim] then kmax[head_dim],
  // computed from the payload when bounds_version[i] differs from the page's version (lazily,
  // when a query selects; RefreshKeyBounds). Empty otherwise.
  std::vector<float> key_bounds;
  std::vector<uint64_t> bounds_version;
  // The merge policy's per-head state (HeadContext::merge_state). Empty without one.
  std::vector<float> merge_state;
};

// Device-resident pages of some heads of one layer, as a CSR view. For device_only the view
// points at the pages themselves; otherwise at staging copies in `extents`.
struct Engine::Staging {
  const PoolSet* pools = nullptr;  // Set by Stage.
  int h_begin = 0;
  int h_end = 0;
  std::vector<int32_t> indptr;
  std::vector<int32_t> indices;
  std::vector<int32_t> last_page_len;
  // Per staged page token counts; empty when every page but each head's last is full.
  std::vector<int32_t> page_len;
  // Per staged page, page_tokens logit biases (PageMeta::bias, merged rows); empty when no
  // staged page has merged rows.
  std::vector<float> page_bias;
  std::vector<Extent> extents;
  std::vector<CopyTicket> tickets;
  // The staged pages and their versions, in CSR order (copies only): what a later call may reuse.
  std::vector<PhysPage*> sources;
  std::vector<uint64_t> versions;
  // Sources pinned until their copies are waited for.
  std::vector<PhysPage*> pinned;
  // The first failure reported by a move callback; shared with the callbacks, so a Staging may
  // be moved while its copies run.
  struct CopyState {
    Mutex mu;
    absl::Status status ABSL_GUARDED_BY(mu);
  };
  std::shared_ptr<CopyState> copy_state = std::make_shared<CopyState>();
  bool active = false;
};

struct Engine::Sequence {
  Mutex mu;
  SequenceId id;
  std::shared_ptr<const LayoutEntry> layout_entry;
  headwise::v1::PolicySpec spec;
  PlacementSpec placement;
  std::unique_ptr<PolicyStack> stack ABSL_GUARDED_BY(mu);
  bool released ABSL_GUARDED_BY(mu) = false;
  std::vector<int64_t> layer_len ABSL_GUARDED_BY(mu);
  std::vector<HeadTable> heads ABSL_GUARDED_BY(mu);  // [layer * num_kv_heads + head].
  // Decode steps (tokens): advanced when the last layer of a step has appended.
  int64_t step ABSL_GUARDED_BY(mu) = 0;
  int64_t evicted_pages ABSL_GUARDED_BY(mu) = 0;
  int64_t evicted_tokens ABSL_GUARDED_BY(mu) = 0;
  int64_t merged_tokens ABSL_GUARDED_BY(mu) = 0;
  // Incremental usage: pages referenced per tier and tokens held, over every head.
  int64_t pages_in[3] ABSL_GUARDED_BY(mu) = {0, 0, 0};
  int64_t retained_tokens ABSL_GUARDED_BY(mu) = 0;
  // The stack wants attention statistics (a scorer): decode calls ask the kernel for per-token
  // probabilities and per-page mass into these scratch buffers, grown once and reused.
  bool wants_stats = false;
  std::vector<float> probs_scratch ABSL_GUARDED_BY(mu);
  std::vector<float> mass_scratch ABSL_GUARDED_BY(mu);
  // layer_offload: layers staged ahead of need (the Prefetcher's choice), one per layer, kept
  // across calls until the layer is attended (its unchanged pages are reused) or changed.
  std::vector<Staging> layer_stage ABSL_GUARDED_BY(mu);
  // With a page selector: each layer's last decode query ([num_q_heads][head_dim]; empty until
  // one), the proxy its next pages are predicted from (policies.md §7.5).
  std::vector<std::vector<float>> query_proxy ABSL_GUARDED_BY(mu);
  PrefetchCounts prefetch ABSL_GUARDED_BY(mu);

  const ModelLayout& layout() const { return layout_entry->layout; }
  const PoolSet& pools() const { return *layout_entry->pools; }
  HeadTable& table(int layer, int head) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    return heads[static_cast<size_t>(layer) * layout().num_kv_heads + head];
  }
  int64_t length() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    return *std::min_element(layer_len.begin(), layer_len.end());
  }
  // Counts `delta` pages referenced in `tier` (incremental usage).
  void Track(Tier tier, int64_t delta) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    pages_in[static_cast<int>(tier)] += delta;
  }
};

// SnapKV's observation-window votes of one Prefill call (kernels::PrefillWindowVotes), per kv
// head: `cached` by page ordinal and row of the pages held before the call, `chunk` per chunk
// token; `by_head` the same votes laid out page-major over the pages held after the append
// (HeadContext::window_votes).
struct Engine::WindowVotes {
  std::vector<std::vector<float>> cached;
  std::vector<std::vector<float>> chunk;
  std::vector<std::vector<float>> by_head;
};

// A prefix block's pages held by the engine (Engine::PinBlocks): one reference on each page of
// positions [first_position, first_position + tokens) of every (layer, kv head). Guarded by
// blocks_mu_; the pages themselves follow PhysPage's rules (a pinned page is shared, so no
// sequence moves or writes it while the pin exists).
struct Engine::PinnedPages {
  std::shared_ptr<const LayoutEntry> layout_entry;
  Tier tier = Tier::kHost;
  int64_t first_position = 0;
  int64_t tokens = 0;
  // [layer][kv head][page of the block], flattened in that order.
  std::vector<PhysPage*> pages;
};

// What an append to one layer will do, built before anything changes (plan, then apply): the
// slots every head needs, taken up front, and the copy-on-write copies of shared or off-tier tail
// pages, already filled. Apply cannot fail; Undo restores the table exactly as it was.
struct Engine::AppendPlan {
  struct Head {
    // The partial tail page is replaced by a private copy in `slots[0]` (filled by PlanAppend).
    bool copy_tail = false;
    PhysPage* old_tail = nullptr;  // The page the copy replaces (copy_tail only).
    int32_t old_tail_count = 0;    // Tokens of the tail page before the append (0: no pages).
    size_t old_pages = 0;          // Pages before the append.
    std::vector<uint64_t> slots;   // copy_tail slot first, then fresh pages.
  };
  int layer = 0;
  int num_tokens = 0;
  int64_t start = 0;  // The layer's length before the append.
  Tier home = Tier::kHost;
  std::vector<Head> heads;
  bool applied = false;
  bool completes_step = false;  // Appending makes every layer reach the step's length.
};

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_ENGINE_INTERNAL_H_
