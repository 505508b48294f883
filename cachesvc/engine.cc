#include "cachesvc/engine.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "cachesvc/base/status_macros.h"
#include "cachesvc/engine_internal.h"
#include "cachesvc/placement.h"
#include "kernels/attention.h"
#include "policies/page_meta.h"
#include "policies/policy_stack.h"

namespace headwise {


// ---------------------------------------------------------------------------------------------
// Creation, layouts, the sequence table.

Engine::Engine(const EngineOptions& options)
    : options_(options),
      device_budget_(options.device_budget_bytes),
      host_budget_(options.host_budget_bytes) {}

Engine::~Engine() {
  for (Shard& shard : shards_) {
    absl::flat_hash_map<SequenceId, std::shared_ptr<Sequence>> sequences;
    {
      MutexLock lock(&shard.mu);
      sequences.swap(shard.sequences);
    }
    for (auto& [id, s] : sequences) {
      MutexLock lock(&s->mu);
      ReleaseAllPages(*s);
      s->released = true;
    }
  }
  MutexLock lock(&layouts_mu_);
  for (auto& [page_bytes, pools] : pool_sets_) pools->copier->Shutdown();
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options) {
  if (options.device_budget_bytes == 0 || options.host_budget_bytes == 0) {
    return absl::InvalidArgumentError("device and host budgets must be positive");
  }
  if (options.extent_pages < 1) return absl::InvalidArgumentError("extent_pages must be >= 1");
  if (options.copy_threads < 1) return absl::InvalidArgumentError("copy_threads must be >= 1");
  std::unique_ptr<Engine> engine(new Engine(options));
  if (!options.disk_path.empty()) {
    DiskStoreOptions disk;
    disk.path = options.disk_path;
    ASSIGN_OR_RETURN(engine->disk_, DiskStore::Open(disk));
  }
  return engine;
}

absl::Status Engine::RegisterLayout(const std::string& name, const ModelLayout& layout) {
  if (name.empty()) return absl::InvalidArgumentError("layout name is empty");
  RETURN_IF_ERROR(ValidateLayout(layout));
  MutexLock lock(&layouts_mu_);
  if (auto it = layouts_.find(name); it != layouts_.end()) {
    const ModelLayout& old = it->second->layout;
    if (old.num_layers == layout.num_layers && old.num_q_heads == layout.num_q_heads &&
        old.num_kv_heads == layout.num_kv_heads && old.head_dim == layout.head_dim &&
        old.dtype == layout.dtype && old.page_tokens == layout.page_tokens) {
      return absl::OkStatus();
    }
    return absl::AlreadyExistsError(
        absl::StrCat("layout '", name, "' is already registered as ", old.DebugString()));
  }
  ASSIGN_OR_RETURN(PoolSet * pools, PoolsFor(layout.page_bytes()));
  auto entry = std::make_shared<LayoutEntry>();
  entry->name = name;
  entry->layout = layout;
  entry->pools = pools;
  layouts_[name] = std::move(entry);
  return absl::OkStatus();
}

absl::StatusOr<Engine::PoolSet*> Engine::PoolsFor(int64_t page_bytes) {
  if (auto it = pool_sets_.find(page_bytes); it != pool_sets_.end()) return it->second.get();
  PagePoolOptions pool;
  pool.slot_bytes = page_bytes;
  pool.extent_pages = options_.extent_pages;
  if (pool.slot_bytes % 16 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("page bytes ", pool.slot_bytes, " are not a multiple of 16"));
  }
  if (options_.device_budget_bytes < static_cast<uint64_t>(pool.slot_bytes) ||
      options_.host_budget_bytes < static_cast<uint64_t>(pool.slot_bytes)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("a budget is smaller than one page of ", pool.slot_bytes, " bytes"));
  }
  // Each pool may use the whole tier budget on its own; the shared TierBudget keeps the pools of
  // every page size within it together.
  auto set = std::make_unique<PoolSet>();
  DevicePoolOptions device;
  device.pool = pool;
  device.pool.budget_bytes = options_.device_budget_bytes;
  device.pool.shared_budget = &device_budget_;
  HostPoolOptions host;
  host.pool = pool;
  host.pool.budget_bytes = options_.host_budget_bytes;
  host.pool.shared_budget = &host_budget_;
  ASSIGN_OR_RETURN(set->device, DevicePool::Create(device));
  ASSIGN_OR_RETURN(set->host, HostPool::Create(host));
  if (!set->device->host_accessible()) {
    return absl::UnimplementedError("a real (non host-accessible) device pool is not supported");
  }
  CopyEngineOptions copy;
  copy.device = set->device.get();
  copy.host = set->host.get();
  copy.disk = disk_.get();
  copy.num_workers = options_.copy_threads;
  ASSIGN_OR_RETURN(set->copier, CopyEngine::Create(copy));
  PoolSet* result = set.get();
  pool_sets_.emplace(page_bytes, std::move(set));
  return result;
}

PagePool* Engine::PoolSet::Pool(Tier tier) const {
  switch (tier) {
    case Tier::kDevice:
      return device.get();
    case Tier::kHost:
      return host.get();
    case Tier::kDisk:
      return nullptr;
  }
  return nullptr;
}

absl::StatusOr<std::shared_ptr<Engine::Sequence>> Engine::Find(const SequenceId& id) {
  Shard& shard = ShardFor(id);
  MutexLock lock(&shard.mu);
  auto it = shard.sequences.find(id);
  if (it == shard.sequences.end()) {
    return absl::NotFoundError(absl::StrCat("no sequence ", id.ToHex()));
  }
  return it->second;
}

absl::Status Engine::CheckLive(const Sequence& s) const ABSL_NO_THREAD_SAFETY_ANALYSIS {
  if (s.released) return absl::NotFoundError(absl::StrCat("sequence ", s.id.ToHex(), " released"));
  return absl::OkStatus();
}

absl::StatusOr<SequenceId> Engine::Insert(std::shared_ptr<Sequence> s) {
  while (true) {
    SequenceId id;
    {
      MutexLock lock(&bitgen_mu_);
      id = SequenceId::Random(bitgen_);
    }
    Shard& shard = ShardFor(id);
    MutexLock lock(&shard.mu);
    if (shard.sequences.contains(id)) continue;
    s->id = id;
    shard.sequences.emplace(id, std::move(s));
    num_sequences_.fetch_add(1, std::memory_order_relaxed);
    return id;
  }
}

absl::StatusOr<SequenceId> Engine::CreateSequence(const std::string& layout_name,
                                                  const headwise::v1::PolicySpec& spec) {
  std::shared_ptr<const LayoutEntry> entry;
  {
    MutexLock lock(&layouts_mu_);
    auto it = layouts_.find(layout_name);
    if (it == layouts_.end()) {
      return absl::NotFoundError(absl::StrCat("no layout named '", layout_name, "'"));
    }
    entry = it->second;
  }
  auto s = std::make_shared<Sequence>();
  s->layout_entry = entry;
  s->spec = spec;
  ASSIGN_OR_RETURN(s->placement, ResolvePlacement(spec));
  {
    MutexLock lock(&s->mu);
    ASSIGN_OR_RETURN(s->stack,
                     PolicyStack::Create(spec, StackEnv{&entry->layout, options_.patterns}));
    s->wants_stats = s->stack->scorer() != nullptr;
    s->layer_len.assign(entry->layout.num_layers, 0);
    s->heads.resize(static_cast<size_t>(entry->layout.num_layers) * entry->layout.num_kv_heads);
    for (HeadTable& t : s->heads) t.arena_tier = s->placement.home_tier();
  }
  return Insert(std::move(s));
}

absl::Status Engine::Release(const SequenceId& id) {
  std::shared_ptr<Sequence> s;
  {
    Shard& shard = ShardFor(id);
    MutexLock lock(&shard.mu);
    auto it = shard.sequences.find(id);
    if (it == shard.sequences.end()) {
      return absl::NotFoundError(absl::StrCat("no sequence ", id.ToHex()));
    }
    s = std::move(it->second);
    shard.sequences.erase(it);
  }
  num_sequences_.fetch_sub(1, std::memory_order_relaxed);
  MutexLock lock(&s->mu);
  ReleaseAllPages(*s);
  s->released = true;
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Pages and slots. Every function here REQUIRES the lock of the sequence whose tables it touches.

Engine::PhysPage* Engine::NewPage(Tier tier, uint64_t slot) {
  auto* page = new PhysPage;
  page->tier = tier;
  page->slot = slot;
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

void Engine::ReleaseAllPages(Sequence& s) ABSL_NO_THREAD_SAFETY_ANALYSIS {
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
                                          size_t protect_begin,
                                          size_t protect_end) ABSL_NO_THREAD_SAFETY_ANALYSIS {
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
                                  size_t protect_end) ABSL_NO_THREAD_SAFETY_ANALYSIS {
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
          !p->exclusive()) {
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

// Brings page `index` of `table` from disk back to the host tier (demand fetch). A page shared
// with another sequence is not moved: this table gets a private host copy instead.
absl::Status Engine::EnsureInMemory(Sequence& s, HeadTable& table, size_t index,
                                    size_t protect_begin, size_t protect_end) {
  PhysPage* page = table.phys[index];
  if (page->tier != Tier::kDisk) return absl::OkStatus();
  const PoolSet& pools = s.pools();
  ASSIGN_OR_RETURN(const uint64_t slot,
                   TakeSlot(s, table, Tier::kHost, protect_begin, protect_end));
  MoveRequest move;
  move.direction = CopyDirection::kDiskToHost;
  move.priority = CopyPriority::kDemandFetch;
  move.dst_slot = slot;
  move.disk_key = page->disk_key;
  auto result = std::make_shared<absl::Status>();
  move.done = [result](absl::Status st) { *result = std::move(st); };
  absl::StatusOr<CopyTicket> ticket = pools.copier->Submit(std::move(move));
  absl::Status st = ticket.ok() ? pools.copier->Wait(*ticket) : ticket.status();
  if (st.ok()) st = *result;
  if (!st.ok()) {
    FreeSlot(pools, Tier::kHost, slot);
    return st;
  }
  fetched_pages_.fetch_add(1, std::memory_order_relaxed);
  if (page->exclusive()) {
    DeleteDiskPage(page->disk_key);
    live_pages_[static_cast<int>(Tier::kDisk)].fetch_sub(1, std::memory_order_relaxed);
    live_pages_[static_cast<int>(Tier::kHost)].fetch_add(1, std::memory_order_relaxed);
    disk_bytes_.fetch_sub(pools.host->slot_bytes(), std::memory_order_relaxed);
    page->tier = Tier::kHost;
    page->slot = slot;
  } else {
    table.phys[index] = NewPage(Tier::kHost, slot);
    Unref(pools, page);
  }
  s.Track(Tier::kDisk, -1);
  s.Track(Tier::kHost, 1);
  return absl::OkStatus();
}

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

// ---------------------------------------------------------------------------------------------
// Append.

absl::Status Engine::ValidateAppend(const Sequence& s, int layer, int64_t k_bytes, int64_t v_bytes,
                                    int num_tokens,
                                    DType dtype) const ABSL_NO_THREAD_SAFETY_ANALYSIS {
  const ModelLayout& layout = s.layout();
  if (layer < 0 || layer >= layout.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " out of range [0, ", layout.num_layers, ")"));
  }
  if (num_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("num_tokens must be >= 1, got ", num_tokens));
  }
  if (dtype != layout.dtype) {
    return absl::InvalidArgumentError(absl::StrCat("k/v dtype ", std::string(DTypeName(dtype)),
                                                   " differs from the layout's ",
                                                   std::string(DTypeName(layout.dtype))));
  }
  const int64_t want = int64_t{num_tokens} * layout.num_kv_heads * layout.head_dim *
                       static_cast<int64_t>(DTypeSize(layout.dtype));
  if (k_bytes != want || v_bytes != want) {
    return absl::InvalidArgumentError(
        absl::StrCat("k and v must hold ", want, " bytes (", num_tokens, " x ", layout.num_kv_heads,
                     " x ", layout.head_dim, " ", std::string(DTypeName(layout.dtype)), "), got ",
                     k_bytes, " and ", v_bytes));
  }
  const int64_t lo = *std::min_element(s.layer_len.begin(), s.layer_len.end());
  const int64_t hi = *std::max_element(s.layer_len.begin(), s.layer_len.end());
  const int64_t len = s.layer_len[layer];
  if (lo != hi) {
    if (len != lo) {
      return absl::FailedPreconditionError(absl::StrCat(
          "layer ", layer, " is at length ", len, ", ahead of the step in progress: every layer ",
          "must reach ", hi, " before any layer goes past it"));
    }
    if (len + num_tokens != hi) {
      return absl::FailedPreconditionError(absl::StrCat("the step in progress goes to length ", hi,
                                                        "; layer ", layer, " must append exactly ",
                                                        hi - len, " tokens, got ", num_tokens));
    }
  }
  if (len + num_tokens > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError("sequence length would exceed 2^31 - 1");
  }
  return absl::OkStatus();
}

absl::Status Engine::Append(const SequenceId& seq, LayerId layer, absl::Span<const std::byte> k,
                            absl::Span<const std::byte> v, int num_tokens, DType dtype) {
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> s, Find(seq));
  MutexLock lock(&s->mu);
  RETURN_IF_ERROR(CheckLive(*s));
  RETURN_IF_ERROR(ValidateAppend(*s, layer.value(), static_cast<int64_t>(k.size()),
                                 static_cast<int64_t>(v.size()), num_tokens, dtype));
  if (k.data() == nullptr || v.data() == nullptr) {
    return absl::InvalidArgumentError("k and v are required");
  }
  return AppendLocked(*s, layer.value(), k.data(), v.data(), num_tokens);
}

// ---------------------------------------------------------------------------------------------
// Attention.

namespace {

kernels::PagedKvView ViewOf(const PagePool& device, const ModelLayout& layout,
                            const std::vector<int32_t>& indptr, const std::vector<int32_t>& indices,
                            const std::vector<int32_t>& last_page_len,
                            const std::vector<int32_t>& page_len, int num_heads) {
  kernels::PagedKvView kv;
  kv.pool = device.base();
  kv.indptr = indptr.data();
  kv.indices = indices.data();
  kv.last_page_len = last_page_len.data();
  kv.page_len = page_len.empty() ? nullptr : page_len.data();
  kv.num_slots = static_cast<int64_t>(device.num_slots());
  kv.num_kv_heads = num_heads;
  kv.page_tokens = layout.page_tokens;
  kv.head_dim = layout.head_dim;
  kv.dtype = layout.dtype;
  return kv;
}

}  // namespace

// The page lists attention reads: every page of each head minus the whole pages `pending` is
// about to drop. Null (every page) when nothing is pending.
const Engine::PageLists* Engine::AttendedPages(Sequence& s, int layer,
                                               const std::vector<HeadActions>* pending,
                                               PageLists& storage) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  if (pending == nullptr) return nullptr;
  bool any = false;
  for (const HeadActions& a : *pending) any = any || !a.drop_pages.empty();
  if (!any) return nullptr;
  const int H = s.layout().num_kv_heads;
  storage.assign(H, {});
  for (int h = 0; h < H; ++h) {
    const HeadTable& t = s.table(layer, h);
    const std::vector<int32_t>& drop = (*pending)[h].drop_pages;
    size_t d = 0;
    for (size_t i = 0; i < t.meta.size(); ++i) {
      if (d < drop.size() && drop[d] == static_cast<int32_t>(i)) {
        ++d;
        continue;
      }
      storage[h].push_back(static_cast<int32_t>(i));
    }
  }
  return &storage;
}

// Feeds one kernel call's statistics to the stack: per-token probabilities into the token
// scores (TokenScorer::Accumulate) and per-page mass into PageMeta::attention_mass. `staged`
// covers heads [h_begin, h_end) of `layer` through `lists` (null: every page).
void Engine::FeedStats(Sequence& s, int layer, const Staging& staged, const PageLists* lists,
                       size_t page_begin) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  const TokenScorer* scorer = s.stack->scorer();
  const int P = s.layout().page_tokens;
  for (int h = staged.h_begin; h < staged.h_end; ++h) {
    HeadTable& t = s.table(layer, h);
    const int k = h - staged.h_begin;
    for (int32_t j = staged.indptr[k]; j < staged.indptr[k + 1]; ++j) {
      const size_t entry = page_begin + static_cast<size_t>(j - staged.indptr[k]);
      const size_t page = lists == nullptr ? entry : static_cast<size_t>((*lists)[h][entry]);
      t.meta[page].attention_mass += s.mass_scratch[j];
      if (scorer != nullptr) {
        scorer->Accumulate(absl::MakeConstSpan(s.probs_scratch.data() + int64_t{j} * P, P),
                           absl::MakeSpan(t.scores.data() + page * P, P));
      }
    }
  }
}

absl::Status Engine::AttendLocked(Sequence& s, int layer, const float* q, float* o, float* lse,
                                  const std::vector<HeadActions>* pending)
    ABSL_NO_THREAD_SAFETY_ANALYSIS {
  const ModelLayout& layout = s.layout();
  const int H = layout.num_kv_heads;
  PageLists storage;
  const PageLists* lists = AttendedPages(s, layer, pending, storage);
  if (s.placement.mode != PlacementMode::kHeadOffload) {
    Staging staged;
    RETURN_IF_ERROR(Stage(s, layer, 0, H, CopyPriority::kDemandFetch, 0, staged, lists));
    absl::Status st = WaitStaged(staged);
    if (st.ok()) {
      st = RunDecode(s, staged, q, layout.num_q_heads, o, lse, H);
      if (st.ok() && s.wants_stats) FeedStats(s, layer, staged, lists, 0);
    }
    Unstage(staged);
    return st;
  }
  return AttendHeadwise(s, layer, q, o, lse, lists);
}

absl::Status Engine::RunDecode(Sequence& s, const Staging& staged, const float* q, int num_q_heads,
                               float* o, float* lse, int num_heads) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  kernels::DecodeArgs args;
  args.q = q;
  args.num_q_heads = num_q_heads;
  args.o = o;
  args.lse = lse;
  args.num_threads = options_.compute_threads;
  if (s.wants_stats) {
    // Scratch kept with the sequence: no allocation per call once it has grown.
    const size_t pages = static_cast<size_t>(staged.indptr.back());
    s.probs_scratch.resize(std::max<size_t>(1, pages * s.layout().page_tokens));
    s.mass_scratch.resize(std::max<size_t>(1, pages));
    args.token_probs = s.probs_scratch.data();
    args.page_mass = s.mass_scratch.data();
  }
  return kernels::DecodeAttention(
      ViewOf(*s.pools().device, s.layout(), staged.indptr, staged.indices, staged.last_page_len,
             staged.page_len, num_heads),
      args);
}

// HeadInfer: the layer is attended in parts, part i computing while parts i+1 .. i+ahead are
// being copied in. A part is one head, or, for a head longer than a device share of
// capacity / (1 + ahead) slots, one of the consecutive page ranges it is cut into; the parts
// of such a head are merged exactly (MergeAttentionStates).
absl::Status Engine::AttendHeadwise(Sequence& s, int layer, const float* q, float* o, float* lse,
                                    const PageLists* lists) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  const ModelLayout& layout = s.layout();
  const int H = layout.num_kv_heads;
  const int g = layout.group_size();
  const int D = layout.head_dim;
  const int ahead = s.placement.heads_ahead();
  const size_t share =
      std::max<size_t>(1, s.pools().device->num_slots() / (1 + static_cast<size_t>(ahead)));
  struct Part {
    int head;
    size_t page_begin;
    size_t page_end;
  };
  std::vector<Part> parts;
  for (int h = 0; h < H; ++h) {
    const size_t n = lists == nullptr ? s.table(layer, h).phys.size() : (*lists)[h].size();
    const size_t cuts = std::max<size_t>(1, (n + share - 1) / share);
    if (cuts > 1 && s.wants_stats) {
      return absl::FailedPreconditionError(
          absl::StrCat("head ", h, " of layer ", layer, " is longer than the device share (", share,
                       " pages): attention statistics across a split head are not supported"));
    }
    for (size_t c = 0; c < cuts; ++c) parts.push_back(Part{h, n * c / cuts, n * (c + 1) / cuts});
  }
  std::vector<Staging> staged(parts.size());
  std::vector<float> part_o, part_lse;  // [parts of the current head][g][D] / [g].
  absl::Status st;
  for (size_t i = 0; i < parts.size() && st.ok(); ++i) {
    const Part& p = parts[i];
    if (!staged[i].active) {
      st = Stage(s, layer, p.head, p.head + 1, CopyPriority::kDemandFetch, p.head, staged[i], lists,
                 p.page_begin, p.page_end);
      if (!st.ok()) break;
    }
    // Best effort: a prefetch that does not fit (or fails) is staged on demand later.
    for (size_t j = i + 1; j < parts.size() && j <= i + ahead; ++j) {
      if (staged[j].active) continue;
      if (!Stage(s, layer, parts[j].head, parts[j].head + 1, CopyPriority::kPrefetch, p.head,
                 staged[j], lists, parts[j].page_begin, parts[j].page_end)
               .ok()) {
        break;
      }
    }
    st = WaitStaged(staged[i]);
    if (!st.ok()) break;
    const bool first = i == 0 || parts[i - 1].head != p.head;
    const bool last = i + 1 == parts.size() || parts[i + 1].head != p.head;
    if (first) {
      part_o.clear();
      part_lse.clear();
    }
    float* head_o = o + int64_t{p.head} * g * D;
    float* head_lse = lse == nullptr ? nullptr : lse + int64_t{p.head} * g;
    if (!(first && last)) {
      part_o.resize(part_o.size() + static_cast<size_t>(g) * D);
      part_lse.resize(part_lse.size() + g);
      head_o = part_o.data() + part_o.size() - static_cast<size_t>(g) * D;
      head_lse = part_lse.data() + part_lse.size() - g;
    }
    st = RunDecode(s, staged[i], q + int64_t{p.head} * g * D, g, head_o, head_lse, 1);
    if (st.ok() && s.wants_stats) FeedStats(s, layer, staged[i], lists, p.page_begin);
    Unstage(staged[i]);
    if (st.ok() && last && !first) st = MergeParts(part_o, part_lse, g, D, p.head, o, lse);
  }
  for (Staging& x : staged) Unstage(x);
  return st;
}

absl::Status Engine::MergeParts(const std::vector<float>& part_o,
                                const std::vector<float>& part_lse, int g, int D, int head,
                                float* o, float* lse) {
  const int n = static_cast<int>(part_lse.size() / g);
  std::vector<const float*> op(n), lp(n);
  for (int k = 0; k < n; ++k) {
    op[k] = part_o.data() + int64_t{k} * g * D;
    lp[k] = part_lse.data() + int64_t{k} * g;
  }
  std::vector<float> merged_lse(g);
  RETURN_IF_ERROR(kernels::MergeAttentionStates(op.data(), lp.data(), n, g, D,
                                                o + int64_t{head} * g * D, merged_lse.data()));
  if (lse != nullptr) std::copy(merged_lse.begin(), merged_lse.end(), lse + int64_t{head} * g);
  return absl::OkStatus();
}

absl::Status Engine::Attend(const SequenceId& seq, LayerId layer, absl::Span<const float> q,
                            absl::Span<float> o, absl::Span<float> lse) {
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> s, Find(seq));
  MutexLock lock(&s->mu);
  RETURN_IF_ERROR(CheckLive(*s));
  const ModelLayout& layout = s->layout();
  if (layer.value() < 0 || layer.value() >= layout.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer.value(), " out of range [0, ", layout.num_layers, ")"));
  }
  const size_t qsize = static_cast<size_t>(layout.num_q_heads) * layout.head_dim;
  if (q.size() != qsize || o.size() != qsize ||
      lse.size() != static_cast<size_t>(layout.num_q_heads)) {
    return absl::InvalidArgumentError(absl::StrCat("q and o must hold ", qsize, " floats and lse ",
                                                   layout.num_q_heads, "; got ", q.size(), ", ",
                                                   o.size(), ", ", lse.size()));
  }
  return AttendLocked(*s, layer.value(), q.data(), o.data(), lse.data(), /*pending=*/nullptr);
}

absl::Status Engine::PrefillLocked(Sequence& s, int layer, const float* q, const std::byte* k,
                                   const std::byte* v, int num_tokens, float* o,
                                   float* lse) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  const ModelLayout& layout = s.layout();
  const int H = layout.num_kv_heads;
  const int Hq = layout.num_q_heads;
  const int g = layout.group_size();
  const int D = layout.head_dim;
  const int64_t T = num_tokens;
  absl::Status st;
  if (s.placement.mode != PlacementMode::kHeadOffload) {
    Staging staged;
    RETURN_IF_ERROR(Stage(s, layer, 0, H, CopyPriority::kDemandFetch, 0, staged));
    st = WaitStaged(staged);
    if (st.ok()) {
      kernels::PrefillArgs args;
      args.num_tokens = num_tokens;
      args.q = q;
      args.k_new = k;
      args.v_new = v;
      args.num_q_heads = Hq;
      args.o = o;
      args.lse = lse;
      args.num_threads = options_.compute_threads;
      st =
          kernels::PrefillAttention(ViewOf(*s.pools().device, layout, staged.indptr, staged.indices,
                                           staged.last_page_len, staged.page_len, H),
                                    args);
    }
    Unstage(staged);
  } else {
    // Per head: gather the group's queries and the head's chunk K/V, compute, scatter.
    const int64_t row = int64_t{D} * DTypeSize(layout.dtype);
    std::vector<float> qh(T * g * D), oh(T * g * D), lh(T * g);
    std::vector<std::byte> kh(T * row), vh(T * row);
    Staging next_staged;
    for (int h = 0; h < H && st.ok(); ++h) {
      Staging cur;
      if (h == 0 || !next_staged.active) {
        st = Stage(s, layer, h, h + 1, CopyPriority::kDemandFetch, h, cur);
      } else {
        cur = std::move(next_staged);
        next_staged = Staging();
      }
      if (!st.ok()) break;
      if (h + 1 < H && s.placement.heads_ahead() > 0) {
        // Best effort: a prefetch that does not fit is staged on demand instead.
        if (!Stage(s, layer, h + 1, h + 2, CopyPriority::kPrefetch, h, next_staged).ok()) {
          next_staged = Staging();
        }
      }
      for (int64_t t = 0; t < T; ++t) {
        std::memcpy(&qh[(t * g) * D], q + (t * Hq + int64_t{h} * g) * D, sizeof(float) * g * D);
        std::memcpy(&kh[t * row], k + (t * H + h) * row, row);
        std::memcpy(&vh[t * row], v + (t * H + h) * row, row);
      }
      st = WaitStaged(cur);
      if (st.ok()) {
        kernels::PrefillArgs args;
        args.num_tokens = num_tokens;
        args.q = qh.data();
        args.k_new = kh.data();
        args.v_new = vh.data();
        args.num_q_heads = g;
        args.o = oh.data();
        args.lse = lh.data();
        args.num_threads = options_.compute_threads;
        st = kernels::PrefillAttention(ViewOf(*s.pools().device, layout, cur.indptr, cur.indices,
                                              cur.last_page_len, cur.page_len, 1),
                                       args);
      }
      Unstage(cur);
      if (!st.ok()) break;
      for (int64_t t = 0; t < T; ++t) {
        std::memcpy(o + (t * Hq + int64_t{h} * g) * D, &oh[(t * g) * D], sizeof(float) * g * D);
        if (lse != nullptr) {
          std::memcpy(lse + t * Hq + int64_t{h} * g, &lh[t * g], sizeof(float) * g);
        }
      }
    }
    Unstage(next_staged);
  }
  RETURN_IF_ERROR(st);
  return AppendLocked(s, layer, k, v, num_tokens);
}

absl::Status Engine::Prefill(const SequenceId& seq, LayerId layer, absl::Span<const float> q,
                             absl::Span<const std::byte> k, absl::Span<const std::byte> v,
                             int num_tokens, DType dtype, absl::Span<float> o,
                             absl::Span<float> lse) {
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> s, Find(seq));
  MutexLock lock(&s->mu);
  RETURN_IF_ERROR(CheckLive(*s));
  RETURN_IF_ERROR(ValidateAppend(*s, layer.value(), static_cast<int64_t>(k.size()),
                                 static_cast<int64_t>(v.size()), num_tokens, dtype));
  const ModelLayout& layout = s->layout();
  const size_t qsize = static_cast<size_t>(num_tokens) * layout.num_q_heads * layout.head_dim;
  const size_t lsize = static_cast<size_t>(num_tokens) * layout.num_q_heads;
  if (q.size() != qsize || o.size() != qsize || (!lse.empty() && lse.size() != lsize)) {
    return absl::InvalidArgumentError(absl::StrCat("q and o must hold ", qsize,
                                                   " floats and lse 0 or ", lsize, "; got ",
                                                   q.size(), ", ", o.size(), ", ", lse.size()));
  }
  return PrefillLocked(*s, layer.value(), q.data(), k.data(), v.data(), num_tokens, o.data(),
                       lse.empty() ? nullptr : lse.data());
}

absl::Status Engine::DecodeStepLocked(Sequence& s, int layer, absl::Span<const float> q,
                                      absl::Span<const std::byte> k, absl::Span<const std::byte> v,
                                      DType dtype, absl::Span<float> o, absl::Span<float> lse,
                                      int64_t* layer_length) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  RETURN_IF_ERROR(CheckLive(s));
  RETURN_IF_ERROR(ValidateAppend(s, layer, static_cast<int64_t>(k.size()),
                                 static_cast<int64_t>(v.size()), /*num_tokens=*/1, dtype));
  const ModelLayout& layout = s.layout();
  const size_t qsize = static_cast<size_t>(layout.num_q_heads) * layout.head_dim;
  if (q.size() != qsize || o.size() != qsize ||
      lse.size() != static_cast<size_t>(layout.num_q_heads)) {
    return absl::InvalidArgumentError(absl::StrCat("q and o must hold ", qsize, " floats and lse ",
                                                   layout.num_q_heads, "; got ", q.size(), ", ",
                                                   o.size(), ", ", lse.size()));
  }
  // Plan, apply, attend, then commit the stack's actions; a failure anywhere before the commit
  // undoes the append, so a refused step leaves the sequence exactly as it was. Position-only
  // policies (windows) decide before the attention, which then skips the pages they drop, as
  // Append + Attend would; score policies (H2O) decide after it, on scores that include it.
  AppendPlan plan;
  RETURN_IF_ERROR(PlanAppend(s, layer, /*num_tokens=*/1, plan));
  ApplyAppend(s, plan, k.data(), v.data());
  std::vector<HeadActions> actions;
  const bool decide_after = s.stack->actions().uses_scores();
  absl::Status st = decide_after ? absl::OkStatus() : DecideActions(s, layer, actions);
  if (st.ok()) {
    st = AttendLocked(s, layer, q.data(), o.data(), lse.data(), decide_after ? nullptr : &actions);
  }
  if (st.ok() && decide_after) st = DecideActions(s, layer, actions);
  if (!st.ok()) {
    UndoAppend(s, plan);
    return st;
  }
  CommitAppend(s, plan);
  ApplyActions(s, layer, actions);
  if (layer_length != nullptr) *layer_length = s.layer_len[layer];
  return absl::OkStatus();
}

absl::Status Engine::DecodeStep(const SequenceId& seq, LayerId layer, absl::Span<const float> q,
                                absl::Span<const std::byte> k, absl::Span<const std::byte> v,
                                DType dtype, absl::Span<float> o, absl::Span<float> lse,
                                int64_t* layer_length) {
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> s, Find(seq));
  MutexLock lock(&s->mu);
  return DecodeStepLocked(*s, layer.value(), q, k, v, dtype, o, lse, layer_length);
}

absl::Status Engine::DecodeStepBatch(LayerId layer, DType dtype, absl::Span<DecodeItem> items) {
  // Lock order: ascending handle, so that two batches over overlapping sequences cannot deadlock.
  std::vector<size_t> order(items.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return items[a].seq < items[b].seq; });
  for (size_t i = 1; i < order.size(); ++i) {
    if (items[order[i]].seq == items[order[i - 1]].seq) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", items[order[i]].seq.ToHex(), " appears twice in one batch"));
    }
  }
  std::vector<std::shared_ptr<Sequence>> seqs(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    absl::StatusOr<std::shared_ptr<Sequence>> s = Find(items[i].seq);
    items[i].status = s.status();
    if (s.ok()) seqs[i] = *std::move(s);
  }
  std::vector<std::unique_ptr<MutexLock>> locks;
  locks.reserve(items.size());
  for (size_t i : order) {
    if (seqs[i] != nullptr) locks.push_back(std::make_unique<MutexLock>(&seqs[i]->mu));
  }
  for (size_t i = 0; i < items.size(); ++i) {
    if (seqs[i] == nullptr) continue;
    DecodeItem& item = items[i];
    item.status = DecodeStepLocked(*seqs[i], layer.value(), item.q, item.k, item.v, dtype, item.o,
                                   item.lse, &item.layer_length);
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Fork, truncate, stats.

absl::StatusOr<SequenceId> Engine::Fork(const SequenceId& seq) {
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> parent, Find(seq));
  auto child = std::make_shared<Sequence>();
  {
    MutexLock lock(&parent->mu);
    RETURN_IF_ERROR(CheckLive(*parent));
    child->layout_entry = parent->layout_entry;
    child->spec = parent->spec;
    child->placement = parent->placement;
    MutexLock child_lock(&child->mu);
    child->stack = parent->stack->Clone();
    child->wants_stats = parent->wants_stats;
    child->layer_len = parent->layer_len;
    child->step = parent->step;
    std::copy(std::begin(parent->pages_in), std::end(parent->pages_in), child->pages_in);
    child->retained_tokens = parent->retained_tokens;
    child->heads.resize(parent->heads.size());
    for (size_t i = 0; i < parent->heads.size(); ++i) {
      const HeadTable& from = parent->heads[i];
      HeadTable& to = child->heads[i];
      to.arena_tier = from.arena_tier;
      to.meta = from.meta;
      to.phys = from.phys;
      to.tokens = from.tokens;
      to.scores = from.scores;
      for (PhysPage* p : to.phys) p->refs.fetch_add(1, std::memory_order_relaxed);
    }
  }
  return Insert(std::move(child));
}

absl::Status Engine::Truncate(const SequenceId& seq, int64_t new_length) {
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> s, Find(seq));
  MutexLock lock(&s->mu);
  RETURN_IF_ERROR(CheckLive(*s));
  const int64_t length = s->length();
  if (new_length < 0 || new_length > length) {
    return absl::InvalidArgumentError(
        absl::StrCat("new_length ", new_length, " must be in [0, ", length, "]"));
  }
  const int P = s->layout().page_tokens;
  for (HeadTable& t : s->heads) {
    // Positions increase along a head, so the tokens at or past new_length are a suffix.
    size_t keep = 0;
    while (keep < t.meta.size() && t.meta[keep].first_position < new_length) ++keep;
    for (size_t i = keep; i < t.phys.size(); ++i) {
      t.tokens -= t.meta[i].token_count;
      s->retained_tokens -= t.meta[i].token_count;
      s->Track(t.phys[i]->tier, -1);
      Unref(s->pools(), t.phys[i]);
    }
    t.meta.resize(keep);
    t.phys.resize(keep);
    if (!t.scores.empty()) t.scores.resize(keep * P);
    if (keep > 0) {
      PageMeta& last = t.meta.back();
      int count = last.token_count;
      while (count > 0 && last.position(count - 1) >= new_length) --count;
      t.tokens -= last.token_count - count;
      s->retained_tokens -= last.token_count - count;
      if (!last.positions.empty()) last.positions.resize(count);
      last.token_count = count;
    }
  }
  for (int64_t& len : s->layer_len) len = new_length;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int64_t>> Engine::HeldPositions(const SequenceId& seq, LayerId layer,
                                                           HeadId kv_head) {
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> s, Find(seq));
  MutexLock lock(&s->mu);
  RETURN_IF_ERROR(CheckLive(*s));
  const ModelLayout& layout = s->layout();
  if (layer.value() < 0 || layer.value() >= layout.num_layers || kv_head.value() < 0 ||
      kv_head.value() >= layout.num_kv_heads) {
    return absl::InvalidArgumentError(
        absl::StrCat("no layer ", layer.value(), " kv head ", kv_head.value(), " in this layout"));
  }
  const HeadTable& t = s->table(layer.value(), kv_head.value());
  std::vector<int64_t> out;
  out.reserve(t.tokens);
  for (const PageMeta& m : t.meta) {
    for (int r = 0; r < m.token_count; ++r) out.push_back(m.position(r));
  }
  return out;
}

absl::StatusOr<SequenceStats> Engine::GetSequenceStats(const SequenceId& seq, StatsDetail detail) {
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> s, Find(seq));
  MutexLock lock(&s->mu);
  RETURN_IF_ERROR(CheckLive(*s));
  SequenceStats out;
  out.length = s->length();
  out.layer_lengths = s->layer_len;
  out.evicted_pages = s->evicted_pages;
  out.evicted_tokens = s->evicted_tokens;
  out.step = s->step;
  out.device_pages = s->pages_in[static_cast<int>(Tier::kDevice)];
  out.host_pages = s->pages_in[static_cast<int>(Tier::kHost)];
  out.disk_pages = s->pages_in[static_cast<int>(Tier::kDisk)];
  out.retained_tokens = s->retained_tokens;
  if (detail == StatsDetail::kWithSharing) {
    out.shared_pages = 0;
    for (const HeadTable& t : s->heads) {
      for (const PhysPage* p : t.phys) out.shared_pages += p->exclusive() ? 0 : 1;
    }
  }
  const int64_t pb = s->layout().page_bytes();
  out.device_bytes = out.device_pages * pb;
  out.host_bytes = out.host_pages * pb;
  out.disk_bytes = out.disk_pages * pb;
  return out;
}

EngineStats Engine::GetStats() const {
  EngineStats out;
  out.has_disk = disk_ != nullptr;
  out.sequences = num_sequences_.load(std::memory_order_relaxed);
  out.device_pages = live_pages_[0].load(std::memory_order_relaxed);
  out.host_pages = live_pages_[1].load(std::memory_order_relaxed);
  out.disk_pages = live_pages_[2].load(std::memory_order_relaxed);
  out.evicted_pages = evicted_pages_.load(std::memory_order_relaxed);
  out.spilled_pages = spilled_pages_.load(std::memory_order_relaxed);
  out.fetched_pages = fetched_pages_.load(std::memory_order_relaxed);
  out.cow_copies = cow_copies_.load(std::memory_order_relaxed);
  out.disk_delete_failures = disk_delete_failures_.load(std::memory_order_relaxed);
  out.disk_bytes = static_cast<uint64_t>(disk_bytes_.load(std::memory_order_relaxed));
  // The shared budgets know the tiers' true combined peaks; a sum of per-pool peaks would not.
  out.device = TierUsage{device_budget_.used(), device_budget_.peak(), device_budget_.capacity()};
  out.host = TierUsage{host_budget_.used(), host_budget_.peak(), host_budget_.capacity()};
  MutexLock lock(&layouts_mu_);
  for (const auto& [page_bytes, pools] : pool_sets_) {
    out.device_emulated = out.device_emulated || pools->device->emulated();
    const CopyEngineStats c = pools->copier->Stats();
    out.bytes_host_to_device += c.bytes(CopyDirection::kHostToDevice);
    out.bytes_device_to_host += c.bytes(CopyDirection::kDeviceToHost);
    out.bytes_host_to_disk += c.bytes(CopyDirection::kHostToDisk);
    out.bytes_disk_to_host += c.bytes(CopyDirection::kDiskToHost);
    out.stall_ns += c.stall_ns;
    out.overlapped_ns += c.overlapped_ns;
  }
  return out;
}

}  // namespace headwise
