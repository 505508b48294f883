// Pages and slots of the engine: page lifetime (refcounts), slots per tier, spill of cold pages
// to the disk tier and demand fetch back (engine.h; docs/engine.md "Placement").
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
// Pages and slots. Every function here REQUIRES the lock of the sequence whose tables it touches.

Engine::PhysPage* Engine::NewPage(Tier tier, uint64_t slot) {
  auto* page = new PhysPage;
  page->tier = tier;
  page->slot = slot;
  page->version = NextVersion();
  live_pages_[static_cast<int>(tier)].fetch_add(1, std::memory_order_relaxed);
  return page;
}

void Engine::FreeSlot(const PoolSet& pools, Tier tier, uint64_t slot) {
  // Cannot fail for a slot this engine allocated and still owns.
  (void)pools.Pool(tier)->Free(Extent{slot, 1});
}

void Engine::DeleteDiskPage(const PageKey& key) {
  // The page is already gone from the engine's view either way; a failed delete only leaves its
  // bytes behind in RocksDB, which the stats report.
  if (!disk_->DeletePage(key).ok()) {
    disk_delete_failures_.fetch_add(1, std::memory_order_relaxed);
  }
}

void Engine::Unref(const PoolSet& pools, PhysPage* page) {
  if (page->refs.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  live_pages_[static_cast<int>(page->tier)].fetch_sub(1, std::memory_order_relaxed);
  if (page->tier == Tier::kDisk) {
    disk_bytes_.fetch_sub(pools.host->slot_bytes(), std::memory_order_relaxed);
    DeleteDiskPage(page->disk_key);
  } else {
    FreeSlot(pools, page->tier, page->slot);
  }
  delete page;
}

void Engine::ReleaseArena(const PoolSet& pools, HeadTable& table) {
  if (table.has_arena && table.arena_next < table.arena.end_slot()) {
    (void)pools.Pool(table.arena_tier)
        ->Free(Extent{table.arena_next, table.arena.end_slot() - table.arena_next});
  }
  table.has_arena = false;
}

void Engine::ReleaseAllPages(Sequence& s) {
  s.mu.AssertHeld();
  DropLayerStages(s);
  const PoolSet& pools = s.pools();
  for (HeadTable& t : s.heads) {
    for (PhysPage* p : t.phys) Unref(pools, p);
    t.phys.clear();
    t.meta.clear();
    ReleaseArena(pools, t);
  }
}

// A free slot of `tier` for `table`: a spare of its extent, the slots right after it, or any
// run. When the host tier is full and a disk tier exists, spills the sequence's coldest pages
// (never those of tables [protect_begin, protect_end)) and retries.
absl::StatusOr<uint64_t> Engine::TakeSlot(Sequence& s, HeadTable& table, Tier tier,
                                          size_t protect_begin, size_t protect_end) {
  s.mu.AssertHeld();
  RETURN_IF_ERROR(Fault(tier == Tier::kDevice ? "alloc.device" : "alloc.host"));
  if (table.has_arena && table.arena_tier == tier && table.arena_next < table.arena.end_slot()) {
    return table.arena_next++;
  }
  const PoolSet& pools = s.pools();
  PagePool* pool = pools.Pool(tier);
  for (int attempt = 0;; ++attempt) {
    absl::StatusOr<Extent> extent = table.has_arena && table.arena_tier == tier
                                        ? pool->GrowExtent(table.arena)
                                        : pool->AllocateExtent();
    if (!extent.ok() && absl::IsResourceExhausted(extent.status())) {
      extent = pool->AllocateExtent(1);  // The budget may still hold single pages.
    }
    if (extent.ok()) {
      ReleaseArena(pools, table);
      table.arena_tier = tier;
      table.arena = *extent;
      table.arena_next = extent->first_slot + 1;
      table.has_arena = true;
      return extent->first_slot;
    }
    if (absl::IsResourceExhausted(extent.status()) && attempt == 0) {
      // Spare slots reserved by the sequence's other heads come back before failing or spilling.
      bool reclaimed = false;
      for (HeadTable& other : s.heads) {
        if (&other != &table && other.has_arena && other.arena_tier == tier &&
            other.arena_next < other.arena.end_slot()) {
          ReleaseArena(pools, other);
          reclaimed = true;
        }
      }
      if (reclaimed) continue;
    }
    if (!absl::IsResourceExhausted(extent.status()) || tier != Tier::kHost || disk_ == nullptr ||
        attempt > 1) {
      return absl::ResourceExhaustedError(absl::StrCat(tier == Tier::kDevice ? "device" : "host",
                                                       " tier is full (", pool->capacity_bytes(),
                                                       " bytes): ", extent.status().message()));
    }
    RETURN_IF_ERROR(
        SpillColdest(s, static_cast<int64_t>(options_.extent_pages), protect_begin, protect_end));
  }
}

absl::Status Engine::SpillColdest(Sequence& s, int64_t count, size_t protect_begin,
                                  size_t protect_end) {
  s.mu.AssertHeld();
  const ModelLayout& layout = s.layout();
  const PoolSet& pools = s.pools();
  std::vector<SpillCandidate> candidates;
  std::vector<std::pair<size_t, size_t>> where;  // (table index, page index) per handle.
  for (size_t ti = 0; ti < s.heads.size(); ++ti) {
    if (ti >= protect_begin && ti < protect_end) continue;
    HeadTable& t = s.heads[ti];
    for (size_t pi = 0; pi < t.phys.size(); ++pi) {
      PhysPage* p = t.phys[pi];
      if (p->tier != Tier::kHost || t.meta[pi].token_count != layout.page_tokens ||
          !p->exclusive() || p->pins.load(std::memory_order_relaxed) > 0) {
        continue;
      }
      candidates.push_back(SpillCandidate{static_cast<int64_t>(where.size()),
                                          t.meta[pi].last_touched_step, t.meta[pi].first_position});
      where.emplace_back(ti, pi);
    }
  }
  const std::vector<int64_t> victims = ChooseSpillVictims(std::move(candidates), count);
  if (victims.empty()) {
    return absl::ResourceExhaustedError(
        "host tier is full and this sequence has no page that can spill to disk");
  }
  struct Pending {
    PhysPage* page;
    PageMeta* meta;
    PageKey key;
    CopyTicket ticket;
  };
  std::vector<Pending> pending;
  auto failure = std::make_shared<absl::Status>();
  auto failure_mu = std::make_shared<Mutex>();
  for (int64_t v : victims) {
    const auto [ti, pi] = where[v];
    HeadTable& t = s.heads[ti];
    PageKey key{s.id, LayerId(static_cast<int>(ti / layout.num_kv_heads)),
                HeadId(static_cast<int>(ti % layout.num_kv_heads)),
                next_disk_ordinal_.fetch_add(1, std::memory_order_relaxed)};
    MoveRequest move;
    move.direction = CopyDirection::kHostToDisk;
    move.priority = CopyPriority::kWriteBack;
    move.src_slot = t.phys[pi]->slot;
    move.disk_key = key;
    move.done = [failure, failure_mu](absl::Status st) {
      MutexLock lock(failure_mu.get());
      if (failure->ok()) *failure = std::move(st);
    };
    ASSIGN_OR_RETURN(CopyTicket ticket, pools.copier->Submit(std::move(move)));
    pending.push_back(Pending{t.phys[pi], &t.meta[pi], key, ticket});
  }
  for (const Pending& p : pending) RETURN_IF_ERROR(pools.copier->Wait(p.ticket));
  {
    MutexLock lock(failure_mu.get());
    RETURN_IF_ERROR(*failure);
  }
  for (const Pending& p : pending) {
    FreeSlot(pools, Tier::kHost, p.page->slot);
    live_pages_[static_cast<int>(Tier::kHost)].fetch_sub(1, std::memory_order_relaxed);
    live_pages_[static_cast<int>(Tier::kDisk)].fetch_add(1, std::memory_order_relaxed);
    disk_bytes_.fetch_add(pools.host->slot_bytes(), std::memory_order_relaxed);
    p.page->tier = Tier::kDisk;
    p.page->disk_key = p.key;
    s.Track(Tier::kHost, -1);
    s.Track(Tier::kDisk, 1);
  }
  spilled_pages_.fetch_add(static_cast<int64_t>(pending.size()), std::memory_order_relaxed);
  return absl::OkStatus();
}

// Brings page `index` of `table` from disk back to the host tier (demand fetch).
absl::Status Engine::EnsureInMemory(Sequence& s, HeadTable& table, size_t index,
                                    size_t protect_begin, size_t protect_end) {
  const PageRef one{&table, index};
  return FetchToHost(s, absl::MakeConstSpan(&one, 1), protect_begin, protect_end);
}

// Brings every listed page that is on disk back to the host tier: all the reads are submitted
// first and waited for together, so a layer's spilled pages cost one round of disk waits, not
// one per page. A page shared with another sequence is not moved: this table gets a private
// host copy instead. On an error the pages read so far are kept in memory (nothing is lost)
// and the error is returned.
absl::Status Engine::FetchToHost(Sequence& s, absl::Span<const PageRef> pages, size_t protect_begin,
                                 size_t protect_end) {
  s.mu.AssertHeld();
  const PoolSet& pools = s.pools();
  struct Pending {
    PageRef ref;
    uint64_t slot;
    CopyTicket ticket;
    std::shared_ptr<absl::Status> result;
  };
  std::vector<Pending> pending;
  absl::Status st;
  for (const PageRef& ref : pages) {
    if (ref.table->phys[ref.index]->tier != Tier::kDisk) continue;
    absl::StatusOr<uint64_t> slot =
        TakeSlot(s, *ref.table, Tier::kHost, protect_begin, protect_end);
    if (!slot.ok()) {
      st = slot.status();
      break;
    }
    MoveRequest move;
    move.direction = CopyDirection::kDiskToHost;
    move.priority = CopyPriority::kDemandFetch;
    move.dst_slot = *slot;
    move.disk_key = ref.table->phys[ref.index]->disk_key;
    auto result = std::make_shared<absl::Status>();
    move.done = [result](absl::Status done) { *result = std::move(done); };
    st = Fault("disk.get");
    absl::StatusOr<CopyTicket> ticket =
        st.ok() ? pools.copier->Submit(std::move(move)) : absl::StatusOr<CopyTicket>(st);
    if (!ticket.ok()) {
      FreeSlot(pools, Tier::kHost, *slot);
      st = ticket.status();
      break;
    }
    pending.push_back(Pending{ref, *slot, *ticket, std::move(result)});
  }
  for (Pending& p : pending) {
    absl::Status done = pools.copier->Wait(p.ticket);
    if (done.ok()) done = *p.result;
    if (!done.ok()) {
      FreeSlot(pools, Tier::kHost, p.slot);
      if (st.ok()) st = done;
      continue;
    }
    HeadTable& table = *p.ref.table;
    PhysPage* page = table.phys[p.ref.index];
    fetched_pages_.fetch_add(1, std::memory_order_relaxed);
    if (page->exclusive()) {
      DeleteDiskPage(page->disk_key);
      live_pages_[static_cast<int>(Tier::kDisk)].fetch_sub(1, std::memory_order_relaxed);
      live_pages_[static_cast<int>(Tier::kHost)].fetch_add(1, std::memory_order_relaxed);
      disk_bytes_.fetch_sub(pools.host->slot_bytes(), std::memory_order_relaxed);
      page->tier = Tier::kHost;
      page->slot = p.slot;
    } else {
      table.phys[p.ref.index] = NewPage(Tier::kHost, p.slot);
      Unref(pools, page);
    }
    s.Track(Tier::kDisk, -1);
    s.Track(Tier::kHost, 1);
  }
  return st;
}

}  // namespace headwise
