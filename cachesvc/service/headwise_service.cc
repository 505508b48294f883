// HeadwiseService: plumbing (tables, usage, quotas) and the sequence lifecycle RPCs (layouts,
// create, fork, truncate, release, info, staging, stats). The data RPCs are in service_steps.cc
// and service_batch.cc, the gRPC entry points in service_rpcs.cc.
#include "cachesvc/service/headwise_service.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "cachesvc/base/status_macros.h"
#include "spdlog/spdlog.h"

namespace headwise {
namespace {

absl::Status NoSequence(const std::string& handle) {
  return absl::NotFoundError(absl::StrCat("no sequence '", handle, "'"));
}

absl::Status ReserveSequence(const Tenant& tenant, int64_t& sequences) {
  const uint64_t max = tenant.quota.max_sequences();
  if (max != 0 && static_cast<uint64_t>(sequences) >= max) {
    return absl::ResourceExhaustedError(absl::StrCat("tenant quota: at most ", max, " sequences"));
  }
  ++sequences;
  return absl::OkStatus();
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

std::string StatusCodeName(absl::StatusCode code) { return absl::StatusCodeToString(code); }

HeadwiseService::HeadwiseService(const HeadwiseServiceOptions& options)
    : options_(options),
      engine_(options.engine),
      scheduler_(std::make_unique<FairScheduler>(options.worker_threads, options.admission)) {
  for (const auto& tenant : options_.tenants->tenants()) {
    tenant_states_[tenant.get()] = std::make_unique<TenantState>(*tenant);
  }
}

HeadwiseService::~HeadwiseService() { scheduler_.reset(); }

HeadwiseService::Shard& HeadwiseService::ShardFor(const std::string& handle) {
  return shards_[absl::HashOf(handle) % kNumShards];
}

HeadwiseService::TenantState& HeadwiseService::StateOf(const Tenant& tenant) {
  return *tenant_states_.at(&tenant);
}

std::string HeadwiseService::NewHandle() {
  absl::MutexLock lock(&bitgen_mu_);
  return SequenceId::Random(bitgen_).ToHex();
}

std::string HeadwiseService::EngineLayoutName(const std::string& tenant, const std::string& name) {
  // Length-prefixed, so no pair of (tenant, name) can collide with another.
  return absl::StrCat(tenant.size(), ":", tenant, "/", name);
}

absl::StatusOr<std::shared_ptr<HeadwiseService::SequenceEntry>> HeadwiseService::FindSequence(
    const Tenant& tenant, const std::string& handle) {
  Shard& shard = ShardFor(handle);
  absl::MutexLock lock(&shard.mu);
  auto it = shard.sequences.find(handle);
  if (it == shard.sequences.end() || it->second->tenant != &tenant) return NoSequence(handle);
  return it->second;
}

absl::Status HeadwiseService::CheckLive(const SequenceEntry& entry) {
  return entry.released ? NoSequence(entry.handle) : absl::OkStatus();
}

int64_t HeadwiseService::num_sequences() const {
  int64_t n = 0;
  for (const Shard& shard : shards_) {
    absl::MutexLock lock(&shard.mu);
    n += static_cast<int64_t>(shard.sequences.size());
  }
  return n;
}

std::shared_ptr<HeadwiseService::SequenceEntry> HeadwiseService::InsertSequence(
    const Tenant& tenant, std::string handle, SequenceId engine_id, std::string layout_name,
    const ModelLayout& layout, bool durable, Tier append_tier) {
  auto entry = std::make_shared<SequenceEntry>();
  entry->handle = std::move(handle);
  entry->tenant = &tenant;
  entry->layout_name = std::move(layout_name);
  entry->layout = layout;
  entry->durable = durable;
  entry->append_tier = append_tier;
  {
    absl::MutexLock lock(&entry->mu);
    entry->engine_id = engine_id;
    entry->steps = StepLedger(layout.num_layers);
    UpdateUsage(*entry).IgnoreError();  // A fresh or forked sequence: its stats exist.
  }
  Shard& shard = ShardFor(entry->handle);
  absl::MutexLock lock(&shard.mu);
  shard.sequences[entry->handle] = entry;
  return entry;
}

absl::StatusOr<SequenceStats> HeadwiseService::UpdateUsage(SequenceEntry& entry,
                                                           TierLedger::Reservation* reserved) {
  absl::StatusOr<SequenceStats> stats =
      entry.released ? absl::StatusOr<SequenceStats>(NoSequence(entry.handle))
                     : engine_->GetSequenceStats(entry.engine_id, StatsDetail::kUsage);
  TierLedger::PerTier bytes = {0, 0, 0}, pages = {0, 0, 0};
  if (stats.ok()) {
    bytes = {stats->device_bytes, stats->host_bytes, stats->disk_bytes};
    pages = {stats->device_pages, stats->host_pages, stats->disk_pages};
  }
  TierLedger::PerTier bytes_delta, pages_delta;
  for (int t = 0; t < TierLedger::kTiers; ++t) {
    bytes_delta[t] = bytes[t] - entry.tier_bytes[t];
    pages_delta[t] = pages[t] - entry.tier_pages[t];
  }
  entry.tier_bytes = bytes;
  entry.tier_pages = pages;
  StateOf(*entry.tenant).usage.Settle(bytes_delta, pages_delta, reserved);
  return stats;
}

absl::StatusOr<TierLedger::Reservation> HeadwiseService::ReserveAppend(const SequenceEntry& entry,
                                                                       int64_t tokens, int layers) {
  return StateOf(*entry.tenant)
      .usage.Reserve(entry.append_tier,
                     static_cast<uint64_t>(layers) * MaxAppendBytes(entry.layout, tokens));
}

absl::StatusOr<InputBytes> HeadwiseService::Input(const Tenant& tenant,
                                                  const headwise::v1::Tensor& tensor,
                                                  const char* what, DType dtype,
                                                  const std::vector<int64_t>& shape) const {
  return TensorBytes(*options_.staging, tenant.name, tensor, what, dtype, shape);
}

absl::StatusOr<OutputTarget> HeadwiseService::Output(const Tenant& tenant,
                                                     const headwise::v1::OutputPlacement& placement,
                                                     std::vector<int64_t> o_shape,
                                                     std::vector<int64_t> lse_shape) const {
  return OutputTarget::Resolve(*options_.staging, tenant.name, placement, std::move(o_shape),
                               std::move(lse_shape));
}

// ---------------------------------------------------------------------------------------------
// Layouts and the sequence lifecycle

absl::Status HeadwiseService::DoRegisterLayout(const Tenant& tenant,
                                               const headwise::v1::RegisterLayoutRequest& request) {
  if (request.name().empty()) return absl::InvalidArgumentError("layout name is empty");
  ASSIGN_OR_RETURN(ModelLayout layout, LayoutFromProto(request.layout()));
  TenantState& state = StateOf(tenant);
  const std::string& name = request.name();
  {
    // Reserve the name: a second registration of it waits here (the wait releases mu).
    absl::MutexLock lock(&state.mu);
    auto not_registering = [&state, &name]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(state.mu) {
      return !state.registering.contains(name);
    };
    state.mu.Await(absl::Condition(&not_registering));
    auto it = state.layouts.find(name);
    if (it != state.layouts.end()) {
      if (SameLayout(it->second, layout)) return absl::OkStatus();
      return absl::AlreadyExistsError(
          absl::StrCat("layout '", name, "' is registered with another shape"));
    }
    state.registering.insert(name);
  }
  // The engine call and the fsynced log write run without the tenant lock, which every data
  // RPC of the tenant takes (usage, quotas).
  absl::Status status = engine_->RegisterLayout(EngineLayoutName(tenant.name, name), layout);
  if (status.ok() && options_.durable_log != nullptr) {
    headwise::v1::DurableLayoutRecord record;
    record.set_tenant(tenant.name);
    record.set_name(name);
    *record.mutable_layout() = request.layout();
    status = options_.durable_log->PutLayout(record);
  }
  absl::MutexLock lock(&state.mu);
  state.registering.erase(name);
  if (status.ok()) state.layouts[name] = layout;  // Visible only once logged.
  return status;
}

absl::Status HeadwiseService::DoCreateSequence(const Tenant& tenant,
                                               const headwise::v1::CreateSequenceRequest& request,
                                               headwise::v1::CreateSequenceResponse* response) {
  if (request.durable() && options_.durable_log == nullptr) {
    return absl::FailedPreconditionError("durable sequences need a data_dir (disk tier)");
  }
  if (request.durable() &&
      request.policy().merge().method_case() != headwise::v1::Merge::METHOD_NOT_SET &&
      !request.policy().merge().has_none()) {
    return absl::FailedPreconditionError(
        "merge policies are not durable yet: their merges rewrite K/V the durable log does not "
        "record; create the sequence without durable or without policy.merge");
  }
  TenantState& state = StateOf(tenant);
  ModelLayout layout;
  {
    absl::MutexLock lock(&state.mu);
    auto it = state.layouts.find(request.layout_name());
    if (it == state.layouts.end()) {
      return absl::NotFoundError(absl::StrCat("no layout '", request.layout_name(), "'"));
    }
    layout = it->second;
    RETURN_IF_ERROR(ReserveSequence(tenant, state.sequences));  // Given back below on failure.
  }
  auto unreserve = [&state] {
    absl::MutexLock lock(&state.mu);
    --state.sequences;
  };
  absl::StatusOr<PrefixStart> start = StartSequence(tenant, request, layout);
  if (!start.ok()) {
    unreserve();
    return start.status();
  }
  const SequenceId* id = &start->id;
  std::string handle = NewHandle();
  if (request.durable()) {
    headwise::v1::DurableSequenceRecord record;
    record.set_handle(handle);
    record.set_tenant(tenant.name);
    record.set_layout_name(request.layout_name());
    *record.mutable_layout() = LayoutToProto(layout);
    *record.mutable_policy() = request.policy();
    absl::Status status = options_.durable_log->PutSequence(record);
    if (!status.ok()) {
      engine_->Release(*id).IgnoreError();
      unreserve();
      return status;
    }
  }
  auto entry = InsertSequence(tenant, handle, *id, request.layout_name(), layout, request.durable(),
                              AppendTier(request.policy()));
  if (start->cached_tokens > 0) {
    absl::MutexLock lock(&entry->mu);
    entry->tokens.Record(0, absl::MakeConstSpan(request.prefix_token_ids())
                                .subspan(0, static_cast<size_t>(start->cached_tokens)));
    entry->prefix_touched = start->hit_blocks;
    UpdateUsage(*entry).IgnoreError();  // The reused pages count for the tenant, as a fork's.
  }
  response->set_handle(handle);
  response->set_cached_tokens(start->cached_tokens);
  return absl::OkStatus();
}

absl::Status HeadwiseService::DoFork(const Tenant& tenant, const headwise::v1::ForkRequest& request,
                                     headwise::v1::ForkResponse* response) {
  ASSIGN_OR_RETURN(auto parent, FindSequence(tenant, request.handle()));
  TenantState& state = StateOf(tenant);
  {
    absl::MutexLock lock(&state.mu);
    RETURN_IF_ERROR(ReserveSequence(tenant, state.sequences));
  }
  absl::StatusOr<SequenceId> child;
  {
    absl::MutexLock lock(&parent->mu);
    child = parent->released ? absl::StatusOr<SequenceId>(NoSequence(request.handle()))
                             : engine_->Fork(parent->engine_id);
  }
  if (!child.ok()) {
    absl::MutexLock lock(&state.mu);
    --state.sequences;
    return child.status();
  }
  std::string handle = NewHandle();
  // A fork is a cache sequence even when its parent is durable (docs/daemon.md). Its step
  // ledger starts empty: a retry names the sequence it was sent to.
  InsertSequence(tenant, handle, *child, parent->layout_name, parent->layout, /*durable=*/false,
                 parent->append_tier);
  response->set_handle(handle);
  return absl::OkStatus();
}

absl::Status HeadwiseService::DoTruncate(const Tenant& tenant,
                                         const headwise::v1::TruncateRequest& request) {
  ASSIGN_OR_RETURN(auto entry, FindSequence(tenant, request.handle()));
  absl::MutexLock lock(&entry->mu);
  RETURN_IF_ERROR(CheckLive(*entry));
  ASSIGN_OR_RETURN(SequenceStats stats,
                   engine_->GetSequenceStats(entry->engine_id, StatsDetail::kUsage));
  if (request.length() < 0 || request.length() > stats.length) {
    return absl::InvalidArgumentError(
        absl::StrCat("truncate length ", request.length(), " is not in [0, ", stats.length, "]"));
  }
  const uint32_t op = entry->next_op;
  if (entry->durable) {
    RETURN_IF_ERROR(options_.durable_log->PutTruncate(entry->handle, op, request.length()));
  }
  absl::Status status = engine_->Truncate(entry->engine_id, request.length());
  if (entry->durable) {
    if (status.ok()) {
      ++entry->next_op;
    } else {
      ForgetRejectedOps({{entry->handle, op}});
    }
  }
  RETURN_IF_ERROR(status);
  entry->steps.Clear();  // No recorded step describes the lengths any more.
  entry->tokens.Truncate(request.length());
  entry->prefix_touched = std::min<int64_t>(
      entry->prefix_touched,
      request.length() / (int64_t{options_.prefix_block_pages} * entry->layout.page_tokens));
  UpdateUsage(*entry).IgnoreError();
  return absl::OkStatus();
}

absl::Status HeadwiseService::DoRelease(const Tenant& tenant,
                                        const headwise::v1::ReleaseRequest& request) {
  ASSIGN_OR_RETURN(auto entry, FindSequence(tenant, request.handle()));
  {
    absl::MutexLock lock(&entry->mu);
    RETURN_IF_ERROR(CheckLive(*entry));
    // The log goes first: once Release is acknowledged the sequence never comes back.
    if (entry->durable) RETURN_IF_ERROR(options_.durable_log->DeleteSequence(entry->handle));
    entry->released = true;
    PublishPrefix(*entry);
    absl::Status status = engine_->Release(entry->engine_id);
    if (!status.ok()) {
      spdlog::error("sequence={}: engine release failed: {}", entry->handle,
                    std::string(status.message()));
    }
    UpdateUsage(*entry).IgnoreError();  // Released: drops its bytes from the tenant's usage.
  }
  {
    Shard& shard = ShardFor(entry->handle);
    absl::MutexLock lock(&shard.mu);
    shard.sequences.erase(entry->handle);
  }
  TenantState& state = StateOf(tenant);
  absl::MutexLock lock(&state.mu);
  --state.sequences;
  return absl::OkStatus();
}

absl::Status HeadwiseService::DoGetSequence(const Tenant& tenant, const std::string& handle,
                                            headwise::v1::SequenceInfo* info) {
  ASSIGN_OR_RETURN(auto entry, FindSequence(tenant, handle));
  absl::MutexLock lock(&entry->mu);
  RETURN_IF_ERROR(CheckLive(*entry));
  ASSIGN_OR_RETURN(SequenceStats stats, engine_->GetSequenceStats(entry->engine_id));
  info->set_handle(entry->handle);
  info->set_layout_name(entry->layout_name);
  info->set_durable(entry->durable);
  for (int64_t n : stats.layer_lengths) info->add_layer_lengths(n);
  info->set_device_bytes(stats.device_bytes);
  info->set_host_bytes(stats.host_bytes);
  info->set_disk_bytes(stats.disk_bytes);
  info->set_pages(stats.device_pages + stats.host_pages + stats.disk_pages);
  info->set_shared_pages(stats.shared_pages);
  info->set_evicted_pages(stats.evicted_pages);
  headwise::v1::PrefetchStats* prefetch = info->mutable_prefetch();
  prefetch->set_prefetched_pages(stats.prefetch.prefetched_pages);
  prefetch->set_used_pages(stats.prefetch.used_pages);
  prefetch->set_needed_pages(stats.prefetch.needed_pages);
  prefetch->set_late_pages(stats.prefetch.late_pages);
  prefetch->set_late_bytes(stats.prefetch.late_bytes);
  return absl::OkStatus();
}

absl::Status HeadwiseService::DoListSequences(const Tenant& tenant,
                                              headwise::v1::ListSequencesResponse* out) {
  std::vector<std::string> handles;
  for (Shard& shard : shards_) {
    absl::MutexLock lock(&shard.mu);
    for (const auto& [handle, entry] : shard.sequences) {
      if (entry->tenant == &tenant) handles.push_back(handle);
    }
  }
  std::sort(handles.begin(), handles.end());
  for (const auto& handle : handles) {
    headwise::v1::SequenceInfo info;
    absl::Status status = DoGetSequence(tenant, handle, &info);
    if (status.ok()) {
      *out->add_sequences() = std::move(info);
    } else if (!absl::IsNotFound(status)) {
      return status;
    }  // Released meanwhile: not listed.
  }
  return absl::OkStatus();
}

absl::Status HeadwiseService::DoOpenStaging(const Tenant& tenant,
                                            const headwise::v1::OpenStagingRequest& request,
                                            headwise::v1::OpenStagingResponse* response) {
  ASSIGN_OR_RETURN(auto region, options_.staging->Open(tenant.name, request.size(),
                                                       tenant.quota.max_staging_regions(),
                                                       tenant.quota.max_staging_bytes()));
  response->set_region_id(region->id());
  response->set_shm_name(region->shm_name());
  response->set_size(region->size());
  return absl::OkStatus();
}

absl::Status HeadwiseService::DoStats(const Tenant& tenant, headwise::v1::StatsResponse* response) {
  if (tenant.admin) {
    DaemonStats(response);
  } else {
    const EngineStats engine = engine_->GetStats();  // Only whether tiers exist is used.
    TenantStats(tenant, engine.has_disk, engine.device_emulated, response);
  }
  TenantState& state = StateOf(tenant);
  const TierLedger::Snapshot usage = state.usage.snapshot();
  response->set_tenant_bytes(usage.bytes[0] + usage.bytes[1] + usage.bytes[2]);
  absl::MutexLock lock(&state.mu);
  response->set_tenant_sequences(state.sequences);
  return absl::OkStatus();
}

void HeadwiseService::DaemonStats(headwise::v1::StatsResponse* response) const {
  const EngineStats stats = engine_->GetStats();
  auto add_tier = [response](const char* name, const TierUsage& usage, bool emulated) {
    auto* tier = response->add_tiers();
    tier->set_tier(name);
    tier->set_used_bytes(usage.used_bytes);
    tier->set_peak_bytes(usage.peak_bytes);
    tier->set_budget_bytes(usage.budget_bytes);
    tier->set_emulated(emulated);
  };
  add_tier("device", stats.device, stats.device_emulated);
  add_tier("host", stats.host, false);
  if (stats.has_disk) {
    TierUsage disk;
    disk.used_bytes = stats.disk_bytes;
    add_tier("disk", disk, false);
  }
  response->set_sequences(stats.sequences);
  response->set_pages(stats.device_pages + stats.host_pages + stats.disk_pages);
  response->set_evicted_pages(stats.evicted_pages);
  response->set_bytes_device_to_host(stats.bytes_device_to_host);
  response->set_bytes_host_to_device(stats.bytes_host_to_device);
  response->set_bytes_host_to_disk(stats.bytes_host_to_disk);
  response->set_bytes_disk_to_host(stats.bytes_disk_to_host);
  response->set_stall_seconds(static_cast<double>(stats.stall_ns) * 1e-9);
  response->set_overlapped_seconds(static_cast<double>(stats.overlapped_ns) * 1e-9);
}

void HeadwiseService::TenantStats(const Tenant& tenant, bool has_disk, bool emulated,
                                  headwise::v1::StatsResponse* response) {
  TenantState& state = StateOf(tenant);
  const TierLedger::Snapshot usage = state.usage.snapshot();
  static constexpr const char* kNames[TierLedger::kTiers] = {"device", "host", "disk"};
  for (int t = 0; t < (has_disk ? 3 : 2); ++t) {
    auto* tier = response->add_tiers();
    tier->set_tier(kNames[t]);
    tier->set_used_bytes(static_cast<uint64_t>(std::max<int64_t>(usage.bytes[t], 0)));
    tier->set_peak_bytes(static_cast<uint64_t>(std::max<int64_t>(usage.peak[t], 0)));
    tier->set_budget_bytes(state.usage.quota(static_cast<Tier>(t)));
    tier->set_emulated(t == 0 && emulated);
  }
  response->set_pages(static_cast<uint64_t>(usage.pages[0] + usage.pages[1] + usage.pages[2]));
  absl::MutexLock lock(&state.mu);
  response->set_sequences(state.sequences);
  // Evictions, bytes moved and copy time are daemon-wide: an admin tenant's (left 0 here).
}

}  // namespace headwise
