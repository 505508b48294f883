// Staging: copies of a layer's or a head's pages on the device tier, as the CSR view the
// kernels read (engine.h; docs/engine.md "Placement").
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "cachesvc/base/status_macros.h"
#include "cachesvc/engine.h"
#include "cachesvc/engine_internal.h"
#include "kernels/attention.h"

namespace headwise {
// ---------------------------------------------------------------------------------------------
// Staging on the device.

// Pages of heads [protect_from_head, h_end) of `layer` are never spilled meanwhile: they are the
// sources of copies still in flight and the pages being staged. For each head the pages staged
// are entries [page_begin, page_end) of its page list: `lists[h]` (page ordinals, ascending) when
// `lists` is given, else every page. The view carries per-page token counts (page_len) whenever
// a staged page other than a head's last is partial.
absl::Status Engine::Stage(Sequence& s, int layer, int h_begin, int h_end, CopyPriority priority,
                           int protect_from_head, Staging& out, const PageLists* lists,
                           size_t page_begin, size_t page_end) {
  s.mu.AssertHeld();
  out = Staging();
  out.pools = &s.pools();
  out.h_begin = h_begin;
  out.h_end = h_end;
  std::vector<PageRef> pages;
  std::vector<int32_t> per_head;
  ListStaged(s, layer, h_begin, h_end, lists, page_begin, page_end, pages, per_head);
  const bool copy = s.placement.mode != PlacementMode::kDeviceOnly;
  if (copy) {
    // Spilled pages come back from disk first, all reads in flight together.
    const size_t base = static_cast<size_t>(layer) * s.layout().num_kv_heads;
    RETURN_IF_ERROR(FetchToHost(s, pages, base + protect_from_head, base + h_end));
  }
  DescribeView(s, pages, per_head, out);
  if (!copy) {
    for (const PageRef& r : pages) {
      out.indices.push_back(static_cast<int32_t>(r.table->phys[r.index]->slot));
    }
    out.active = true;
    return absl::OkStatus();
  }
  std::vector<uint64_t> dst;
  RETURN_IF_ERROR(AllocateStagingSlots(s, layer, pages.size(), out, dst));
  out.active = true;
  for (size_t i = 0; i < pages.size(); ++i) {
    PhysPage* p = pages[i].table->phys[pages[i].index];
    out.indices.push_back(static_cast<int32_t>(dst[i]));
    out.sources.push_back(p);
    out.versions.push_back(p->version);
    if (absl::Status st = SubmitCopy(p, dst[i], priority, out); !st.ok()) {
      Unstage(out);
      return st;
    }
  }
  return absl::OkStatus();
}

void Engine::ListStaged(Sequence& s, int layer, int h_begin, int h_end, const PageLists* lists,
                        size_t page_begin, size_t page_end, std::vector<PageRef>& pages,
                        std::vector<int32_t>& per_head) {
  s.mu.AssertHeld();
  for (int h = h_begin; h < h_end; ++h) {
    HeadTable& t = s.table(layer, h);
    const size_t n = lists == nullptr ? t.phys.size() : (*lists)[h].size();
    const size_t end = std::min(page_end, n);
    const size_t first = std::min(page_begin, end);
    for (size_t i = first; i < end; ++i) {
      pages.push_back(PageRef{&t, lists == nullptr ? i : static_cast<size_t>((*lists)[h][i])});
    }
    per_head.push_back(static_cast<int32_t>(end - first));
  }
}

void Engine::DescribeView(Sequence& s, const std::vector<PageRef>& pages,
                          const std::vector<int32_t>& per_head, Staging& out) {
  s.mu.AssertHeld();
  const int P = s.layout().page_tokens;
  out.indptr.assign(1, 0);
  out.indices.reserve(std::max<size_t>(1, pages.size()));  // The kernels want non-null arrays.
  bool sparse = false;
  bool biased = false;
  size_t next = 0;
  for (int32_t n : per_head) {
    for (int32_t j = 0; j < n; ++j, ++next) {
      PageMeta& m = pages[next].table->meta[pages[next].index];
      biased = biased || !m.bias.empty();
      out.page_len.push_back(m.token_count);
      sparse = sparse || (m.token_count != P && j + 1 != n);
      m.last_touched_step = s.step;
    }
    out.indptr.push_back(static_cast<int32_t>(next));
    out.last_page_len.push_back(n == 0 ? 0 : out.page_len.back());
  }
  if (!sparse) out.page_len.clear();
  if (biased) {
    // Merged rows carry their logit bias (PagedKvView::page_bias, by CSR position).
    out.page_bias.assign(std::max<size_t>(1, pages.size()) * P, 0.0f);
    for (size_t i = 0; i < pages.size(); ++i) {
      const PageMeta& m = pages[i].table->meta[pages[i].index];
      std::copy(m.bias.begin(), m.bias.end(), out.page_bias.begin() + i * P);
    }
  }
}

// One device extent for the whole staging when it fits contiguously, else single slots; every
// slot is recorded in out.extents (freed by Unstage). On failure nothing stays allocated.
absl::Status Engine::AllocateStagingSlots(Sequence& s, int layer, size_t count, Staging& out,
                                          std::vector<uint64_t>& dst) {
  RETURN_IF_ERROR(Fault("alloc.device"));
  DevicePool* device = s.pools().device.get();
  dst.reserve(count);
  if (count == 0) return absl::OkStatus();
  if (absl::StatusOr<Extent> run = device->AllocateExtent(static_cast<uint64_t>(count)); run.ok()) {
    out.extents.push_back(*run);
    for (size_t i = 0; i < count; ++i) dst.push_back(run->first_slot + i);
    return absl::OkStatus();
  }
  for (size_t i = 0; i < count; ++i) {
    absl::StatusOr<Extent> one = device->AllocateExtent(1);
    if (!one.ok()) {
      for (const Extent& e : out.extents) (void)device->Free(e);
      out.extents.clear();
      dst.clear();
      return absl::ResourceExhaustedError(absl::StrCat("device tier cannot stage ", count,
                                                       " pages of layer ", layer, ": ",
                                                       one.status().message()));
    }
    out.extents.push_back(*one);
    dst.push_back(one->first_slot);
  }
  return absl::OkStatus();
}

absl::Status Engine::SubmitCopy(PhysPage* page, uint64_t dst_slot, CopyPriority priority,
                                Staging& out) {
  MoveRequest move;
  move.direction = CopyDirection::kHostToDevice;
  move.priority = priority;
  move.src_slot = page->slot;
  move.dst_slot = dst_slot;
  move.done = [state = out.copy_state](absl::Status st) {
    MutexLock lock(&state->mu);
    if (state->status.ok()) state->status = std::move(st);
  };
  RETURN_IF_ERROR(Fault("copy.submit"));
  ASSIGN_OR_RETURN(const CopyTicket ticket, out.pools->copier->Submit(std::move(move)));
  out.tickets.push_back(ticket);
  page->pins.fetch_add(1, std::memory_order_relaxed);
  out.pinned.push_back(page);
  return absl::OkStatus();
}

void Engine::Unpin(Staging& staging) {
  for (PhysPage* p : staging.pinned) p->pins.fetch_sub(1, std::memory_order_relaxed);
  staging.pinned.clear();
}

absl::Status Engine::WaitStaged(Staging& staging) {
  for (CopyTicket t : staging.tickets) RETURN_IF_ERROR(staging.pools->copier->Wait(t));
  staging.tickets.clear();
  Unpin(staging);
  MutexLock lock(&staging.copy_state->mu);
  return staging.copy_state->status;
}

void Engine::Unstage(Staging& staging) {
  if (!staging.active) return;
  for (CopyTicket t : staging.tickets) (void)staging.pools->copier->Wait(t);
  staging.tickets.clear();
  Unpin(staging);
  for (const Extent& e : staging.extents) (void)staging.pools->device->Free(e);
  staging.extents.clear();
  staging.active = false;
}

absl::Status Engine::Restage(Sequence& s, int layer, Staging& kept, const PageLists* lists,
                             Staging& out) {
  s.mu.AssertHeld();
  const int H = s.layout().num_kv_heads;
  if (!WaitStaged(kept).ok()) {
    Unstage(kept);
    RETURN_IF_ERROR(Stage(s, layer, 0, H, CopyPriority::kDemandFetch, 0, out, lists));
    const int64_t n = static_cast<int64_t>(out.sources.size());
    CountPrefetch(s, 0, 0, n, n);
    return absl::OkStatus();
  }
  std::vector<PageRef> pages;
  std::vector<int32_t> per_head;
  ListStaged(s, layer, 0, H, lists, 0, SIZE_MAX, pages, per_head);
  // Spilled pages come back first, all reads in flight together; a failure leaves nothing
  // staged.
  if (absl::Status st =
          FetchToHost(s, pages, static_cast<size_t>(layer) * H, static_cast<size_t>(layer + 1) * H);
      !st.ok()) {
    Unstage(kept);
    return st;
  }
  // Kept copies by source page: a page keeps its copy wherever drops moved it in the list.
  absl::flat_hash_map<const PhysPage*, size_t> copies;
  copies.reserve(kept.sources.size());
  for (size_t i = 0; i < kept.sources.size(); ++i) copies.emplace(kept.sources[i], i);
  out = Staging();
  out.pools = &s.pools();
  out.h_begin = 0;
  out.h_end = H;
  out.active = true;
  out.extents = std::move(kept.extents);  // Replaced copies' slots are freed with the rest.
  DescribeView(s, pages, per_head, out);
  std::vector<size_t> missing;  // Entries whose page changed since it was staged.
  for (const PageRef& r : pages) {
    PhysPage* p = r.table->phys[r.index];
    auto it = copies.find(p);
    const bool reused = it != copies.end() && kept.versions[it->second] == p->version;
    if (!reused) missing.push_back(out.indices.size());
    out.indices.push_back(reused ? kept.indices[it->second] : -1);
    out.sources.push_back(p);
    out.versions.push_back(p->version);
  }
  kept = Staging();
  const int64_t needed = static_cast<int64_t>(pages.size());
  const int64_t late = static_cast<int64_t>(missing.size());
  CountPrefetch(s, 0, needed - late, needed, late);
  // The pages that changed since they were staged (the tails appended to, new pages) are copied
  // now, at demand priority. Any failure releases the whole view.
  for (size_t entry : missing) {
    Staging one;
    one.pools = out.pools;
    std::vector<uint64_t> dst;
    absl::Status st = AllocateStagingSlots(s, layer, 1, one, dst);
    if (st.ok()) {
      out.extents.push_back(one.extents.front());
      out.indices[entry] = static_cast<int32_t>(dst.front());
      st = SubmitCopy(out.sources[entry], dst.front(), CopyPriority::kDemandFetch, out);
    }
    if (!st.ok()) {
      Unstage(out);
      return st;
    }
  }
  return absl::OkStatus();
}

void Engine::PrefetchLayers(Sequence& s, int layer, const float* q) {
  s.mu.AssertHeld();
  if (s.placement.mode != PlacementMode::kLayerOffload) return;
  const int L = s.layout().num_layers;
  if (s.layer_stage.size() != static_cast<size_t>(L)) s.layer_stage.resize(L);
  for (int next : s.stack->prefetcher().LayersAhead(layer, L)) {
    if (next == layer || s.layer_stage[next].active) continue;
    PageLists predicted;
    const PageLists* lists = PredictPages(s, next, q, predicted);
    // Best effort: a layer that does not fit beside the current one is staged on demand.
    if (!Stage(s, next, 0, s.layout().num_kv_heads, CopyPriority::kPrefetch, 0, s.layer_stage[next],
               lists)
             .ok()) {
      s.layer_stage[next] = Staging();
      break;
    }
    CountPrefetch(s, static_cast<int64_t>(s.layer_stage[next].sources.size()), 0, 0, 0);
  }
}

void Engine::SettleLayer(Sequence& s, int layer) {
  s.mu.AssertHeld();
  if (static_cast<size_t>(layer) >= s.layer_stage.size()) return;
  Staging& kept = s.layer_stage[layer];
  if (kept.active && !WaitStaged(kept).ok()) Unstage(kept);
}

void Engine::DropLayerStages(Sequence& s) {
  s.mu.AssertHeld();
  for (Staging& kept : s.layer_stage) Unstage(kept);
}

}  // namespace headwise
