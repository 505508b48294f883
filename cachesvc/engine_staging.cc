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
  const PoolSet& pools = s.pools();
  DevicePool* device = pools.device.get();
  out.pools = &pools;
  out.h_begin = h_begin;
  out.h_end = h_end;
  out.indptr.push_back(0);
  out.indices.reserve(1);  // The kernels want non-null arrays even for an empty layer.
  const bool copy = s.placement.mode != PlacementMode::kDeviceOnly;
  const int P = s.layout().page_tokens;
  // The ordinal of entry i of head h's list.
  const auto ordinal = [&](int h, size_t i) -> size_t {
    return lists == nullptr ? i : static_cast<size_t>((*lists)[h][i]);
  };
  const auto range = [&](int h, const HeadTable& t) {
    const size_t n = lists == nullptr ? t.phys.size() : (*lists)[h].size();
    const size_t end = std::min(page_end, n);
    return std::make_pair(std::min(page_begin, end), end);
  };
  int64_t total = 0;
  bool sparse = false;
  if (copy) {
    // Spilled pages come back from disk first, all reads in flight together.
    std::vector<PageRef> on_disk;
    for (int h = h_begin; h < h_end; ++h) {
      HeadTable& t = s.table(layer, h);
      const auto [first, end] = range(h, t);
      for (size_t i = first; i < end; ++i) {
        const size_t p = ordinal(h, i);
        if (t.phys[p]->tier == Tier::kDisk) on_disk.push_back(PageRef{&t, p});
      }
    }
    const size_t base = static_cast<size_t>(layer) * s.layout().num_kv_heads;
    RETURN_IF_ERROR(FetchToHost(s, on_disk, base + protect_from_head, base + h_end));
  }
  for (int h = h_begin; h < h_end; ++h) {
    HeadTable& t = s.table(layer, h);
    const auto [first, end] = range(h, t);
    for (size_t i = first; i < end; ++i) {
      const size_t p = ordinal(h, i);
      const int32_t count = t.meta[p].token_count;
      out.page_len.push_back(count);
      sparse = sparse || (count != P && i + 1 != end);
      t.meta[p].last_touched_step = s.step;
    }
    total += static_cast<int64_t>(end - first);
    out.indptr.push_back(static_cast<int32_t>(total));
    out.last_page_len.push_back(end == first ? 0 : out.page_len.back());
  }
  if (!sparse) out.page_len.clear();
  if (!copy) {
    for (int h = h_begin; h < h_end; ++h) {
      const HeadTable& t = s.table(layer, h);
      const auto [first, end] = range(h, t);
      for (size_t i = first; i < end; ++i) {
        out.indices.push_back(static_cast<int32_t>(t.phys[ordinal(h, i)]->slot));
      }
    }
    out.active = true;
    return absl::OkStatus();
  }
  RETURN_IF_ERROR(Fault("alloc.device"));
  // One device extent for the whole staging when it fits contiguously, else single slots.
  std::vector<uint64_t> dst;
  dst.reserve(total);
  if (total > 0) {
    absl::StatusOr<Extent> run = device->AllocateExtent(static_cast<uint64_t>(total));
    if (run.ok()) {
      out.extents.push_back(*run);
      for (int64_t i = 0; i < total; ++i) dst.push_back(run->first_slot + i);
    } else {
      for (int64_t i = 0; i < total; ++i) {
        absl::StatusOr<Extent> one = device->AllocateExtent(1);
        if (!one.ok()) {
          for (const Extent& e : out.extents) (void)device->Free(e);
          out.extents.clear();
          return absl::ResourceExhaustedError(absl::StrCat("device tier cannot stage ", total,
                                                           " pages of layer ", layer, ": ",
                                                           one.status().message()));
        }
        out.extents.push_back(*one);
        dst.push_back(one->first_slot);
      }
    }
  }
  out.active = true;
  size_t d = 0;
  for (int h = h_begin; h < h_end; ++h) {
    const HeadTable& t = s.table(layer, h);
    const auto [first, end] = range(h, t);
    for (size_t i = first; i < end; ++i) {
      PhysPage* p = t.phys[ordinal(h, i)];
      out.indices.push_back(static_cast<int32_t>(dst[d]));
      out.sources.push_back(p);
      out.versions.push_back(p->version);
      if (absl::Status st = SubmitCopy(p, dst[d++], priority, out); !st.ok()) {
        Unstage(out);
        return st;
      }
    }
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
  if (!WaitStaged(kept).ok()) {
    Unstage(kept);
    return Stage(s, layer, 0, s.layout().num_kv_heads, CopyPriority::kDemandFetch, 0, out, lists);
  }
  // Kept copies by source page: a page keeps its copy wherever drops moved it in the list.
  absl::flat_hash_map<const PhysPage*, size_t> copies;
  copies.reserve(kept.sources.size());
  for (size_t i = 0; i < kept.sources.size(); ++i) copies.emplace(kept.sources[i], i);
  const int H = s.layout().num_kv_heads;
  const int P = s.layout().page_tokens;
  const PoolSet& pools = s.pools();
  {
    // Spilled pages come back first, all reads in flight together; a failure leaves nothing
    // staged.
    std::vector<PageRef> on_disk;
    for (int h = 0; h < H; ++h) {
      HeadTable& t = s.table(layer, h);
      const size_t n = lists == nullptr ? t.phys.size() : (*lists)[h].size();
      for (size_t j = 0; j < n; ++j) {
        const size_t i = lists == nullptr ? j : static_cast<size_t>((*lists)[h][j]);
        if (t.phys[i]->tier == Tier::kDisk) on_disk.push_back(PageRef{&t, i});
      }
    }
    if (absl::Status st = FetchToHost(s, on_disk, static_cast<size_t>(layer) * H,
                                      static_cast<size_t>(layer + 1) * H);
        !st.ok()) {
      Unstage(kept);
      return st;
    }
  }
  out = Staging();
  out.pools = &pools;
  out.h_begin = 0;
  out.h_end = H;
  out.active = true;
  out.extents = std::move(kept.extents);  // Replaced copies' slots are freed with the rest.
  out.indptr.push_back(0);
  out.indices.reserve(1);
  struct Missing {
    PhysPage* page;
    size_t entry;
  };
  std::vector<Missing> missing;
  bool sparse = false;
  for (int h = 0; h < H; ++h) {
    HeadTable& t = s.table(layer, h);
    const size_t n = lists == nullptr ? t.phys.size() : (*lists)[h].size();
    for (size_t j = 0; j < n; ++j) {
      const size_t i = lists == nullptr ? j : static_cast<size_t>((*lists)[h][j]);
      PhysPage* p = t.phys[i];
      auto it = copies.find(p);
      if (it != copies.end() && kept.versions[it->second] == p->version) {
        out.indices.push_back(kept.indices[it->second]);
      } else {
        missing.push_back(Missing{p, out.indices.size()});
        out.indices.push_back(-1);
      }
      out.sources.push_back(p);
      out.versions.push_back(p->version);
      const int32_t count = t.meta[i].token_count;
      out.page_len.push_back(count);
      sparse = sparse || (count != P && j + 1 != n);
      t.meta[i].last_touched_step = s.step;
    }
    out.indptr.push_back(static_cast<int32_t>(out.indices.size()));
    out.last_page_len.push_back(n == 0 ? 0 : out.page_len.back());
  }
  if (!sparse) out.page_len.clear();
  kept = Staging();
  // The pages that changed since they were staged (the tails appended to, new pages) are copied
  // now, at demand priority.
  for (const Missing& m : missing) {
    RETURN_IF_ERROR(Fault("alloc.device"));
    absl::StatusOr<Extent> one = pools.device->AllocateExtent(1);
    if (!one.ok()) {
      Unstage(out);
      return absl::ResourceExhaustedError(
          absl::StrCat("device tier cannot stage layer ", layer, ": ", one.status().message()));
    }
    out.extents.push_back(*one);
    out.indices[m.entry] = static_cast<int32_t>(one->first_slot);
    if (absl::Status st = SubmitCopy(m.page, one->first_slot, CopyPriority::kDemandFetch, out);
        !st.ok()) {
      Unstage(out);
      return st;
    }
  }
  return absl::OkStatus();
}

void Engine::PrefetchLayers(Sequence& s, int layer) {
  s.mu.AssertHeld();
  if (s.placement.mode != PlacementMode::kLayerOffload) return;
  const int L = s.layout().num_layers;
  if (s.layer_stage.size() != static_cast<size_t>(L)) s.layer_stage.resize(L);
  for (int next : s.stack->prefetcher().LayersAhead(layer, L)) {
    if (next == layer || s.layer_stage[next].active) continue;
    // Best effort: a layer that does not fit beside the current one is staged on demand.
    if (!Stage(s, next, 0, s.layout().num_kv_heads, CopyPriority::kPrefetch, 0, s.layer_stage[next])
             .ok()) {
      s.layer_stage[next] = Staging();
      break;
    }
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
