// Staging: copies of a layer's or a head's pages on the device tier, as the CSR view the
// kernels read (engine.h; docs/engine.md "Placement").
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

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
                           size_t page_begin, size_t page_end) ABSL_NO_THREAD_SAFETY_ANALYSIS {
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
  for (int h = h_begin; h < h_end; ++h) {
    HeadTable& t = s.table(layer, h);
    const auto [first, end] = range(h, t);
    for (size_t i = first; i < end; ++i) {
      const size_t p = ordinal(h, i);
      if (copy) {
        const size_t base = static_cast<size_t>(layer) * s.layout().num_kv_heads;
        RETURN_IF_ERROR(EnsureInMemory(s, t, p, base + protect_from_head, base + h_end));
      }
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
  std::shared_ptr<Staging::CopyState> state = out.copy_state;
  size_t d = 0;
  for (int h = h_begin; h < h_end; ++h) {
    const HeadTable& t = s.table(layer, h);
    const auto [first, end] = range(h, t);
    for (size_t i = first; i < end; ++i) {
      const PhysPage* p = t.phys[ordinal(h, i)];
      MoveRequest move;
      move.direction = CopyDirection::kHostToDevice;
      move.priority = priority;
      move.src_slot = p->slot;
      move.dst_slot = dst[d];
      out.indices.push_back(static_cast<int32_t>(dst[d]));
      ++d;
      move.done = [state](absl::Status st) {
        MutexLock lock(&state->mu);
        if (state->status.ok()) state->status = std::move(st);
      };
      absl::Status fault = Fault("copy.submit");
      absl::StatusOr<CopyTicket> ticket =
          fault.ok() ? pools.copier->Submit(std::move(move)) : absl::StatusOr<CopyTicket>(fault);
      if (!ticket.ok()) {
        Unstage(out);
        return ticket.status();
      }
      out.tickets.push_back(*ticket);
    }
  }
  return absl::OkStatus();
}

absl::Status Engine::WaitStaged(Staging& staging) {
  for (CopyTicket t : staging.tickets) RETURN_IF_ERROR(staging.pools->copier->Wait(t));
  staging.tickets.clear();
  MutexLock lock(&staging.copy_state->mu);
  return staging.copy_state->status;
}

void Engine::Unstage(Staging& staging) {
  if (!staging.active) return;
  for (CopyTicket t : staging.tickets) (void)staging.pools->copier->Wait(t);
  staging.tickets.clear();
  for (const Extent& e : staging.extents) (void)staging.pools->device->Free(e);
  staging.extents.clear();
  staging.active = false;
}

}  // namespace headwise
