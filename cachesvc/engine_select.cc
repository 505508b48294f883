// Metadata the query-aware page selectors read (engine.h; docs/policies.md "Quest"): per-page
// key bounds, kept lazily from the payloads.
#include <algorithm>
#include <limits>

#include "cachesvc/base/status_macros.h"
#include "cachesvc/engine.h"
#include "cachesvc/engine_internal.h"
#include "kernels/attention.h"

namespace headwise {

// A page's bounds are recomputed when its payload version changed since they were taken (an
// append, a token drop or a compaction writes a fresh version; pages that moved in the list
// after a drop mismatch their ordinal's old entry and are recomputed too). Rows removed without
// a new version (truncation, an undone append) leave bounds over a superset of the rows: still
// an upper bound. A page on disk cannot be read now: -inf / +inf, so it is always selected.
void Engine::RefreshKeyBounds(Sequence& s, HeadTable& t) {
  s.mu.AssertHeld();
  const ModelLayout& layout = s.layout();
  const int D = layout.head_dim;
  const size_t n = t.meta.size();
  t.key_bounds.resize(n * 2 * D);
  t.bounds_version.resize(n, 0);
  for (size_t i = 0; i < n; ++i) {
    const PhysPage* p = t.phys[i];
    if (p->version != 0 && t.bounds_version[i] == p->version) continue;
    float* kmin = t.key_bounds.data() + i * 2 * D;
    absl::Status st = absl::UnavailableError("on disk");
    if (p->tier != Tier::kDisk) {
      st = kernels::ComputeKeyBounds(s.pools().Pool(p->tier)->SlotAddress(p->slot), layout.dtype,
                                     layout.page_tokens, t.meta[i].token_count, D, kmin, kmin + D);
    }
    if (st.ok()) {
      t.bounds_version[i] = p->version;
    } else {
      std::fill_n(kmin, D, -std::numeric_limits<float>::infinity());
      std::fill_n(kmin + D, D, std::numeric_limits<float>::infinity());
      t.bounds_version[i] = 0;
    }
  }
}

HeadContext Engine::SelectorContext(Sequence& s, int layer, int h) {
  s.mu.AssertHeld();
  HeadTable& t = s.table(layer, h);
  if (s.stack->selector().needs_key_bounds()) RefreshKeyBounds(s, t);
  HeadContext head;
  head.layer = LayerId(layer);
  head.kv_head = HeadId(h);
  head.role = s.stack->roles().role(head.layer, head.kv_head);
  head.page_tokens = s.layout().page_tokens;
  head.seq_len = s.layer_len[layer];
  head.step = s.step;
  head.pages = t.meta;
  head.token_scores = t.scores;
  head.key_bounds = t.key_bounds;
  head.head_dim = s.layout().head_dim;
  return head;
}

const Engine::PageLists* Engine::PredictPages(Sequence& s, int layer, const float* q,
                                              PageLists& out) {
  s.mu.AssertHeld();
  if (s.stack->selector().selects_all()) return nullptr;
  const ModelLayout& layout = s.layout();
  const int H = layout.num_kv_heads;
  const int g = layout.group_size();
  const int D = layout.head_dim;
  const bool has_proxy =
      static_cast<size_t>(layer) < s.query_proxy.size() && !s.query_proxy[layer].empty();
  const float* hint = has_proxy ? s.query_proxy[layer].data() : q;  // Else this query.
  PageLists ranked(H);
  size_t longest = 0;
  for (int h = 0; h < H; ++h) {
    s.stack->selector().Rank(SelectorContext(s, layer, h),
                             absl::MakeConstSpan(hint + int64_t{h} * g * D, g * D), g, &ranked[h]);
    longest = std::max(longest, ranked[h].size());
  }
  // Round-robin over the heads, most critical first, within the transfer budget.
  int64_t budget = s.stack->prefetcher().pages_per_layer();
  if (budget < 0) budget = std::numeric_limits<int64_t>::max();
  out.assign(H, {});
  for (size_t rank = 0; rank < longest && budget > 0; ++rank) {
    for (int h = 0; h < H && budget > 0; ++h) {
      const int32_t p = rank < ranked[h].size() ? ranked[h][rank] : -1;
      if (p < 0 || static_cast<size_t>(p) >= s.table(layer, h).meta.size()) continue;
      out[h].push_back(p);
      --budget;
    }
  }
  for (std::vector<int32_t>& list : out) {
    std::sort(list.begin(), list.end());
    list.erase(std::unique(list.begin(), list.end()), list.end());
  }
  return &out;
}

absl::Status Engine::ComputeWindowVotes(Sequence& s, const Staging& staged, const float* q,
                                        const std::byte* k, int num_tokens, int num_q_heads,
                                        WindowVotes& out) {
  s.mu.AssertHeld();
  const ModelLayout& layout = s.layout();
  const int P = layout.page_tokens;
  const int heads = staged.h_end - staged.h_begin;
  const kernels::PagedKvView kv = ViewOf(*s.pools().device, layout, staged, heads);
  std::vector<float> cached(std::max<size_t>(1, static_cast<size_t>(staged.indptr.back()) * P));
  std::vector<float> chunk(static_cast<size_t>(heads) * num_tokens);
  kernels::WindowVoteArgs args;
  args.num_tokens = num_tokens;
  args.window = static_cast<int>(std::min<int64_t>(s.stack->actions().window_tokens(), num_tokens));
  args.q = q;
  args.k_new = k;
  args.num_q_heads = num_q_heads;
  args.cached_votes = cached.data();
  args.chunk_votes = chunk.data();
  args.num_threads = options_.compute_threads;
  RETURN_IF_ERROR(kernels::PrefillWindowVotes(kv, args));
  out.cached.resize(layout.num_kv_heads);
  out.chunk.resize(layout.num_kv_heads);
  for (int i = 0; i < heads; ++i) {
    const int h = staged.h_begin + i;
    out.cached[h].assign(cached.begin() + static_cast<size_t>(staged.indptr[i]) * P,
                         cached.begin() + static_cast<size_t>(staged.indptr[i + 1]) * P);
    out.chunk[h].assign(chunk.begin() + static_cast<size_t>(i) * num_tokens,
                        chunk.begin() + static_cast<size_t>(i + 1) * num_tokens);
  }
  return absl::OkStatus();
}

// The staged view listed every page of each head in order, so a cached token's ordinal and row
// are the same before and after the append; chunk tokens are found by position.
void Engine::LayoutWindowVotes(Sequence& s, const AppendPlan& plan, WindowVotes& votes) {
  s.mu.AssertHeld();
  const int P = s.layout().page_tokens;
  votes.by_head.assign(s.layout().num_kv_heads, {});
  for (int h = 0; h < s.layout().num_kv_heads; ++h) {
    const HeadTable& t = s.table(plan.layer, h);
    std::vector<float>& out = votes.by_head[h];
    out.assign(t.meta.size() * P, 0.0f);
    for (size_t i = 0; i < t.meta.size(); ++i) {
      for (int r = 0; r < t.meta[i].token_count; ++r) {
        const int64_t pos = t.meta[i].position(r);
        const size_t at = i * P + r;
        if (pos >= plan.start) {
          out[at] = votes.chunk[h][pos - plan.start];
        } else if (at < votes.cached[h].size()) {
          out[at] = votes.cached[h][at];
        }
      }
    }
  }
}

void Engine::CountPrefetch(Sequence& s, int64_t prefetched, int64_t used, int64_t needed,
                           int64_t late) {
  s.mu.AssertHeld();
  const int64_t late_bytes = late * s.layout().page_bytes();
  s.prefetch.prefetched_pages += prefetched;
  s.prefetch.used_pages += used;
  s.prefetch.needed_pages += needed;
  s.prefetch.late_pages += late;
  s.prefetch.late_bytes += late_bytes;
  const int64_t add[5] = {prefetched, used, needed, late, late_bytes};
  for (int i = 0; i < 5; ++i) prefetch_counts_[i].fetch_add(add[i], std::memory_order_relaxed);
}

}  // namespace headwise
