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
  {
    MutexLock lock(&blocks_mu_);
    for (auto& [id, pinned] : blocks_) ReleasePinned(*pinned);
    blocks_.clear();
  }
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

absl::Status Engine::CheckLive(const Sequence& s) const {
  s.mu.AssertHeld();
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
// Append.

absl::Status Engine::ValidateAppend(const Sequence& s, int layer, int64_t k_bytes, int64_t v_bytes,
                                    int num_tokens, DType dtype) const {
  s.mu.AssertHeld();
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
                            absl::Span<const std::byte> v, int num_tokens, DType dtype,
                            const CommitHook* before_commit) {
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> s, Find(seq));
  MutexLock lock(&s->mu);
  RETURN_IF_ERROR(CheckLive(*s));
  RETURN_IF_ERROR(ValidateAppend(*s, layer.value(), static_cast<int64_t>(k.size()),
                                 static_cast<int64_t>(v.size()), num_tokens, dtype));
  if (k.data() == nullptr || v.data() == nullptr) {
    return absl::InvalidArgumentError("k and v are required");
  }
  return AppendLocked(*s, layer.value(), k.data(), v.data(), num_tokens, before_commit);
}

absl::Status Engine::AppendReplay(const SequenceId& seq, LayerId layer,
                                  absl::Span<const std::byte> k, absl::Span<const std::byte> v,
                                  int num_tokens, DType dtype, const LayerDrops& drops) {
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> s, Find(seq));
  MutexLock lock(&s->mu);
  RETURN_IF_ERROR(CheckLive(*s));
  RETURN_IF_ERROR(ValidateAppend(*s, layer.value(), static_cast<int64_t>(k.size()),
                                 static_cast<int64_t>(v.size()), num_tokens, dtype));
  AppendPlan plan;
  RETURN_IF_ERROR(PlanAppend(*s, layer.value(), num_tokens, plan));
  ApplyAppend(*s, plan, k.data(), v.data());
  std::vector<HeadActions> actions;
  if (absl::Status st = ActionsFor(*s, layer.value(), drops, actions); !st.ok()) {
    UndoAppend(*s, plan);
    return st;
  }
  CommitAppend(*s, plan);
  ApplyActions(*s, layer.value(), actions);
  return absl::OkStatus();
}

absl::StatusOr<bool> Engine::DecisionsDependOnQueries(const SequenceId& seq) {
  ASSIGN_OR_RETURN(std::shared_ptr<Sequence> s, Find(seq));
  MutexLock lock(&s->mu);
  RETURN_IF_ERROR(CheckLive(*s));
  return s->stack->actions().uses_scores() || s->stack->merger() != nullptr;
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
      to.merge_state = from.merge_state;
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
  // Kept stagings stay valid (a page's first rows do not change when its count shrinks; pages
  // that go are no longer listed); only their copies in flight are waited for first.
  for (int l = 0; l < s->layout().num_layers; ++l) SettleLayer(*s, l);
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
      if (!last.bias.empty()) last.bias.resize(count);
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
  out.merged_tokens = s->merged_tokens;
  out.step = s->step;
  out.device_pages = s->pages_in[static_cast<int>(Tier::kDevice)];
  out.host_pages = s->pages_in[static_cast<int>(Tier::kHost)];
  out.disk_pages = s->pages_in[static_cast<int>(Tier::kDisk)];
  out.retained_tokens = s->retained_tokens;
  out.prefetch = s->prefetch;
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
  out.merged_tokens = merged_tokens_.load(std::memory_order_relaxed);
  out.spilled_pages = spilled_pages_.load(std::memory_order_relaxed);
  out.fetched_pages = fetched_pages_.load(std::memory_order_relaxed);
  out.cow_copies = cow_copies_.load(std::memory_order_relaxed);
  out.disk_delete_failures = disk_delete_failures_.load(std::memory_order_relaxed);
  out.disk_bytes = static_cast<uint64_t>(disk_bytes_.load(std::memory_order_relaxed));
  out.prefetch.prefetched_pages = prefetch_counts_[0].load(std::memory_order_relaxed);
  out.prefetch.used_pages = prefetch_counts_[1].load(std::memory_order_relaxed);
  out.prefetch.needed_pages = prefetch_counts_[2].load(std::memory_order_relaxed);
  out.prefetch.late_pages = prefetch_counts_[3].load(std::memory_order_relaxed);
  out.prefetch.late_bytes = prefetch_counts_[4].load(std::memory_order_relaxed);
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
    for (int p = 0; p < kNumCopyPriorities; ++p) out.bytes_by_purpose[p] += c.bytes_by_priority[p];
    out.overlapped_ns += c.overlapped_ns;
  }
  return out;
}

}  // namespace headwise
