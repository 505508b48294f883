#include "cachesvc/service/headwise_service.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "cachesvc/base/status_macros.h"
#include "spdlog/spdlog.h"

namespace headwise {
namespace {

// Removes a logged op the engine then rejected, so a restart does not replay it. If that fails
// too, the sequence's replay will stop at this op on restart: say so loudly.
void ForgetRejectedOp(DurableLog& log, const std::string& handle, uint32_t op) {
  if (absl::Status status = log.DeleteOp(handle, op); !status.ok()) {
    spdlog::error("durable log: could not remove rejected op {} of sequence {}: {}", op, handle,
                  std::string(status.message()));
  }
}

using headwise::v1::DTypeProto;
using headwise::v1::Tensor;

constexpr int64_t kMaxTokensPerCall = int64_t{1} << 20;

absl::StatusOr<DType> DTypeFromProto(int dtype) {
  switch (dtype) {
    case headwise::v1::DTYPE_UNSPECIFIED:
    case headwise::v1::DTYPE_F16:
      return DType::kF16;
    case headwise::v1::DTYPE_F32:
      return DType::kF32;
    case headwise::v1::DTYPE_BF16:
      return DType::kBF16;
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown dtype ", dtype));
  }
}

absl::StatusOr<ModelLayout> LayoutFromProto(const headwise::v1::ModelLayoutProto& proto) {
  ModelLayout layout;
  layout.num_layers = proto.num_layers();
  layout.num_q_heads = proto.num_q_heads();
  layout.num_kv_heads = proto.num_kv_heads();
  layout.head_dim = proto.head_dim();
  ASSIGN_OR_RETURN(layout.dtype, DTypeFromProto(proto.dtype()));
  if (proto.has_page_tokens()) layout.page_tokens = proto.page_tokens();
  RETURN_IF_ERROR(ValidateLayout(layout));
  return layout;
}

bool SameLayout(const ModelLayout& a, const ModelLayout& b) {
  return a.num_layers == b.num_layers && a.num_q_heads == b.num_q_heads &&
         a.num_kv_heads == b.num_kv_heads && a.head_dim == b.head_dim && a.dtype == b.dtype &&
         a.page_tokens == b.page_tokens;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ","), "]");
}

Tier AppendTier(const headwise::v1::PolicySpec& policy) {
  const auto mode = policy.placement().mode();
  return mode == headwise::v1::Placement::LAYER_OFFLOAD ||
                 mode == headwise::v1::Placement::HEAD_OFFLOAD
             ? Tier::kHost
             : Tier::kDevice;
}

absl::Status CheckLayer(const ModelLayout& layout, int layer) {
  if (layer < 0 || layer >= layout.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " is not in [0, ", layout.num_layers, ")"));
  }
  return absl::OkStatus();
}

// The token count T of a [T][heads][head_dim] tensor, checked for rank and range.
absl::StatusOr<int> TokenCount(const Tensor& tensor, const char* what) {
  if (tensor.shape_size() != 3 || tensor.shape(0) < 1 || tensor.shape(0) > kMaxTokensPerCall) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": shape must be [T][heads][head_dim] with 1 <= T <= ", kMaxTokensPerCall, ", got ",
        ShapeString({tensor.shape().begin(), tensor.shape().end()})));
  }
  return static_cast<int>(tensor.shape(0));
}

std::vector<float> CopyFloats(absl::Span<const std::byte> bytes) {
  std::vector<float> out(bytes.size() / sizeof(float));
  if (!bytes.empty()) std::memcpy(out.data(), bytes.data(), out.size() * sizeof(float));
  return out;
}

int64_t Product(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

std::string StatusCodeName(absl::StatusCode code) { return absl::StatusCodeToString(code); }

// ---------------------------------------------------------------------------------------------
// DecodeStream: read one step, run it on the pool, write its answer, read the next.

class HeadwiseService::DecodeStreamReactor
    : public grpc::ServerBidiReactor<headwise::v1::StreamStepRequest,
                                     headwise::v1::DecodeStepResponse> {
 public:
  DecodeStreamReactor(HeadwiseService* service, absl::StatusOr<const Tenant*> tenant)
      : service_(service) {
    if (!tenant.ok()) {
      service_->Record("DecodeStream", nullptr, absl::Now(), tenant.status());
      Finish(ToGrpcStatus(tenant.status()));
      return;
    }
    tenant_ = *tenant;
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // The client closed its side (or the call is cancelled): done.
      Finish(grpc::Status::OK);
      return;
    }
    service_->workers_->Schedule([this] { Step(); });
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "stream write failed"));
      return;
    }
    StartRead(&request_);
  }

  void OnDone() override { delete this; }

 private:
  void Step() {
    const absl::Time start = absl::Now();
    if (!request_.handle().empty()) handle_ = request_.handle();
    response_.Clear();
    absl::Status status =
        handle_.empty()
            ? absl::InvalidArgumentError("the first stream message must name the sequence")
            : service_->DoDecodeStep(*tenant_, handle_, request_.layer(), request_.q(),
                                     request_.k(), request_.v(), request_.output(), &response_);
    service_->Record("DecodeStream", tenant_, start, status);
    if (!status.ok()) {
      Finish(ToGrpcStatus(status));
      return;
    }
    StartWrite(&response_);
  }

  HeadwiseService* const service_;
  const Tenant* tenant_ = nullptr;
  std::string handle_;
  headwise::v1::StreamStepRequest request_;
  headwise::v1::DecodeStepResponse response_;
};

// ---------------------------------------------------------------------------------------------
// Plumbing

HeadwiseService::HeadwiseService(const HeadwiseServiceOptions& options)
    : options_(options),
      engine_(options.engine),
      workers_(std::make_unique<WorkerPool>(options.worker_threads)) {
  for (const auto& tenant : options_.tenants->tenants()) {
    tenant_states_[tenant.get()] = std::make_unique<TenantState>();
  }
}

HeadwiseService::~HeadwiseService() { workers_.reset(); }

absl::StatusOr<const Tenant*> HeadwiseService::Authenticate(
    grpc::CallbackServerContext* ctx) const {
  const auto& metadata = ctx->client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return absl::UnauthenticatedError("missing bearer token (metadata 'authorization')");
  }
  return options_.tenants->Authenticate(std::string(it->second.data(), it->second.size()));
}

void HeadwiseService::Record(const char* rpc, const Tenant* tenant, absl::Time start,
                             const absl::Status& status) const {
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  options_.metrics->RecordRequest(rpc, StatusCodeName(status.code()), seconds);
  if (!status.ok()) {
    spdlog::warn("rpc={} tenant={} code={} error=\"{}\"", rpc,
                 tenant == nullptr ? "-" : tenant->name, StatusCodeName(status.code()),
                 std::string(status.message()));
  }
}

grpc::ServerUnaryReactor* HeadwiseService::Dispatch(
    const char* rpc, grpc::CallbackServerContext* ctx,
    std::function<absl::Status(const Tenant&)> work) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  const absl::Time start = absl::Now();
  absl::StatusOr<const Tenant*> tenant = Authenticate(ctx);
  if (!tenant.ok()) {
    Record(rpc, nullptr, start, tenant.status());
    reactor->Finish(ToGrpcStatus(tenant.status()));
    return reactor;
  }
  workers_->Schedule([this, rpc, reactor, start, tenant = *tenant, work = std::move(work)] {
    absl::Status status = work(*tenant);
    Record(rpc, tenant, start, status);
    reactor->Finish(ToGrpcStatus(status));
  });
  return reactor;
}

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
  if (it == shard.sequences.end() || it->second->tenant != &tenant) {
    return absl::NotFoundError(absl::StrCat("no sequence '", handle, "'"));
  }
  return it->second;
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
    UpdateUsage(*entry);
  }
  Shard& shard = ShardFor(entry->handle);
  absl::MutexLock lock(&shard.mu);
  shard.sequences[entry->handle] = entry;
  return entry;
}

void HeadwiseService::UpdateUsage(SequenceEntry& entry) {
  absl::StatusOr<SequenceStats> stats = engine_->GetSequenceStats(entry.engine_id);
  std::array<int64_t, 3> now = {0, 0, 0};
  if (stats.ok() && !entry.released) {
    now = {stats->device_bytes, stats->host_bytes, stats->disk_bytes};
  }
  TenantState& state = StateOf(*entry.tenant);
  absl::MutexLock lock(&state.mu);
  for (int t = 0; t < 3; ++t) {
    state.tier_bytes[t] += now[t] - entry.tier_bytes[t];
    entry.tier_bytes[t] = now[t];
  }
}

absl::Status HeadwiseService::CheckTierQuota(const Tenant& tenant, const SequenceEntry& entry,
                                             uint64_t bytes) {
  const uint64_t quota[3] = {tenant.quota.max_device_bytes(), tenant.quota.max_host_bytes(),
                             tenant.quota.max_disk_bytes()};
  static constexpr const char* kTierNames[3] = {"device", "host", "disk"};
  TenantState& state = StateOf(tenant);
  absl::MutexLock lock(&state.mu);
  for (int t = 0; t < 3; ++t) {
    if (quota[t] == 0) continue;
    const uint64_t used = static_cast<uint64_t>(state.tier_bytes[t]);
    const uint64_t adding = t == static_cast<int>(entry.append_tier) ? bytes : 0;
    if (used + adding > quota[t]) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "tenant quota: ", kTierNames[t], " bytes would be ", used + adding, " > ", quota[t]));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<HeadwiseService::Bytes> HeadwiseService::TensorBytes(
    const Tenant& tenant, const Tensor& tensor, const char* what, DType dtype,
    const std::vector<int64_t>& shape) {
  ASSIGN_OR_RETURN(DType got, DTypeFromProto(tensor.dtype()));
  if (got != dtype) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": dtype ", std::string(DTypeName(got)),
                                                   " does not match the expected ",
                                                   std::string(DTypeName(dtype))));
  }
  const std::vector<int64_t> got_shape(tensor.shape().begin(), tensor.shape().end());
  if (got_shape != shape) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": shape ", ShapeString(got_shape), " is not ", ShapeString(shape)));
  }
  const uint64_t expected = static_cast<uint64_t>(Product(shape)) * DTypeSize(dtype);
  Bytes bytes;
  switch (tensor.payload_case()) {
    case Tensor::kData:
      if (tensor.data().size() != expected) {
        return absl::InvalidArgumentError(absl::StrCat(what, ": payload has ", tensor.data().size(),
                                                       " bytes, shape ", ShapeString(shape),
                                                       " needs ", expected));
      }
      bytes.span = absl::Span<const std::byte>(
          reinterpret_cast<const std::byte*>(tensor.data().data()), tensor.data().size());
      return bytes;
    case Tensor::kStaged: {
      const auto& staged = tensor.staged();
      if (staged.length() != expected) {
        return absl::InvalidArgumentError(absl::StrCat(what, ": staged length ", staged.length(),
                                                       ", shape ", ShapeString(shape), " needs ",
                                                       expected));
      }
      ASSIGN_OR_RETURN(bytes.region, options_.staging->Find(tenant.name, staged.region_id()));
      ASSIGN_OR_RETURN(absl::Span<std::byte> range,
                       bytes.region->Range(staged.offset(), staged.length()));
      bytes.span = range;
      return bytes;
    }
    case Tensor::PAYLOAD_NOT_SET:
      break;
  }
  return absl::InvalidArgumentError(absl::StrCat(what, ": no payload (data or staged)"));
}

absl::Status HeadwiseService::CheckPlacement(const Tenant& tenant,
                                             const headwise::v1::OutputPlacement& placement,
                                             uint64_t bytes) {
  if (placement.region_id().empty()) return absl::OkStatus();
  ASSIGN_OR_RETURN(auto region, options_.staging->Find(tenant.name, placement.region_id()));
  return region->Range(placement.offset(), bytes).status();
}

absl::Status HeadwiseService::PutOutputs(const Tenant& tenant,
                                         const headwise::v1::OutputPlacement& placement,
                                         const std::vector<float>& o, std::vector<int64_t> o_shape,
                                         const std::vector<float>& lse,
                                         std::vector<int64_t> lse_shape, Tensor* o_out,
                                         Tensor* lse_out) {
  const uint64_t o_bytes = o.size() * sizeof(float);
  const uint64_t lse_bytes = lse.size() * sizeof(float);
  o_out->set_dtype(headwise::v1::DTYPE_F32);
  lse_out->set_dtype(headwise::v1::DTYPE_F32);
  for (int64_t d : o_shape) o_out->add_shape(d);
  for (int64_t d : lse_shape) lse_out->add_shape(d);
  if (placement.region_id().empty()) {
    o_out->set_data(reinterpret_cast<const char*>(o.data()), o_bytes);
    lse_out->set_data(reinterpret_cast<const char*>(lse.data()), lse_bytes);
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(auto region, options_.staging->Find(tenant.name, placement.region_id()));
  ASSIGN_OR_RETURN(absl::Span<std::byte> range,
                   region->Range(placement.offset(), o_bytes + lse_bytes));
  std::memcpy(range.data(), o.data(), o_bytes);
  std::memcpy(range.data() + o_bytes, lse.data(), lse_bytes);
  auto* o_staged = o_out->mutable_staged();
  o_staged->set_region_id(placement.region_id());
  o_staged->set_offset(placement.offset());
  o_staged->set_length(o_bytes);
  auto* lse_staged = lse_out->mutable_staged();
  lse_staged->set_region_id(placement.region_id());
  lse_staged->set_offset(placement.offset() + o_bytes);
  lse_staged->set_length(lse_bytes);
  return absl::OkStatus();
}

absl::Status HeadwiseService::AppendLocked(SequenceEntry& entry, int layer, const Bytes& k,
                                           const Bytes& v, int num_tokens) {
  if (!entry.durable) {
    return engine_->Append(entry.engine_id, LayerId(layer), k.span, v.span, num_tokens,
                           entry.layout.dtype);
  }
  const uint32_t op = entry.next_op;
  RETURN_IF_ERROR(
      options_.durable_log->PutAppend(entry.handle, op, layer, num_tokens, k.span, v.span));
  absl::Status status = engine_->Append(entry.engine_id, LayerId(layer), k.span, v.span, num_tokens,
                                        entry.layout.dtype);
  if (!status.ok()) {
    absl::Status undo = options_.durable_log->DeleteOp(entry.handle, op);
    if (!undo.ok()) {
      spdlog::error("sequence={} op={}: cannot remove a rejected append from the log: {}",
                    entry.handle, op, std::string(undo.message()));
    }
    return status;
  }
  ++entry.next_op;
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// The RPCs

absl::Status HeadwiseService::DoRegisterLayout(const Tenant& tenant,
                                               const headwise::v1::RegisterLayoutRequest& request) {
  if (request.name().empty()) return absl::InvalidArgumentError("layout name is empty");
  ASSIGN_OR_RETURN(ModelLayout layout, LayoutFromProto(request.layout()));
  TenantState& state = StateOf(tenant);
  absl::MutexLock lock(&state.mu);  // Held across the engine call: registrations are rare.
  auto it = state.layouts.find(request.name());
  if (it != state.layouts.end()) {
    if (SameLayout(it->second, layout)) return absl::OkStatus();
    return absl::AlreadyExistsError(
        absl::StrCat("layout '", request.name(), "' is registered with another shape"));
  }
  RETURN_IF_ERROR(engine_->RegisterLayout(EngineLayoutName(tenant.name, request.name()), layout));
  if (options_.durable_log != nullptr) {
    headwise::v1::DurableLayoutRecord record;
    record.set_tenant(tenant.name);
    record.set_name(request.name());
    *record.mutable_layout() = request.layout();
    RETURN_IF_ERROR(options_.durable_log->PutLayout(record));
  }
  state.layouts[request.name()] = layout;
  return absl::OkStatus();
}

absl::Status HeadwiseService::DoCreateSequence(const Tenant& tenant,
                                               const headwise::v1::CreateSequenceRequest& request,
                                               headwise::v1::CreateSequenceResponse* response) {
  if (request.durable() && options_.durable_log == nullptr) {
    return absl::FailedPreconditionError("durable sequences need a data_dir (disk tier)");
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
    const uint64_t max = tenant.quota.max_sequences();
    if (max != 0 && static_cast<uint64_t>(state.sequences) >= max) {
      return absl::ResourceExhaustedError(
          absl::StrCat("tenant quota: at most ", max, " sequences"));
    }
    ++state.sequences;  // Reserved; given back below on failure.
  }
  auto unreserve = [&state] {
    absl::MutexLock lock(&state.mu);
    --state.sequences;
  };
  absl::StatusOr<SequenceId> id = engine_->CreateSequence(
      EngineLayoutName(tenant.name, request.layout_name()), request.policy());
  if (!id.ok()) {
    unreserve();
    return id.status();
  }
  std::string handle = NewHandle();
  if (request.durable()) {
    headwise::v1::DurableSequenceRecord record;
    record.set_handle(handle);
    record.set_tenant(tenant.name);
    record.set_layout_name(request.layout_name());
    auto* proto = record.mutable_layout();
    proto->set_num_layers(layout.num_layers);
    proto->set_num_q_heads(layout.num_q_heads);
    proto->set_num_kv_heads(layout.num_kv_heads);
    proto->set_head_dim(layout.head_dim);
    proto->set_dtype(layout.dtype == DType::kF32    ? headwise::v1::DTYPE_F32
                     : layout.dtype == DType::kBF16 ? headwise::v1::DTYPE_BF16
                                                    : headwise::v1::DTYPE_F16);
    proto->set_page_tokens(layout.page_tokens);
    *record.mutable_policy() = request.policy();
    absl::Status status = options_.durable_log->PutSequence(record);
    if (!status.ok()) {
      engine_->Release(*id).IgnoreError();
      unreserve();
      return status;
    }
  }
  InsertSequence(tenant, handle, *id, request.layout_name(), layout, request.durable(),
                 AppendTier(request.policy()));
  response->set_handle(handle);
  return absl::OkStatus();
}

absl::Status HeadwiseService::DoFork(const Tenant& tenant, const headwise::v1::ForkRequest& request,
                                     headwise::v1::ForkResponse* response) {
  ASSIGN_OR_RETURN(auto parent, FindSequence(tenant, request.handle()));
  TenantState& state = StateOf(tenant);
  {
    absl::MutexLock lock(&state.mu);
    const uint64_t max = tenant.quota.max_sequences();
    if (max != 0 && static_cast<uint64_t>(state.sequences) >= max) {
      return absl::ResourceExhaustedError(
          absl::StrCat("tenant quota: at most ", max, " sequences"));
    }
    ++state.sequences;
  }
  absl::StatusOr<SequenceId> child;
  {
    absl::MutexLock lock(&parent->mu);
    child = parent->released
                ? absl::NotFoundError(absl::StrCat("no sequence '", request.handle(), "'"))
                : engine_->Fork(parent->engine_id);
  }
  if (!child.ok()) {
    absl::MutexLock lock(&state.mu);
    --state.sequences;
    return child.status();
  }
  std::string handle = NewHandle();
  // A fork is a cache sequence even when its parent is durable (docs/daemon.md).
  InsertSequence(tenant, handle, *child, parent->layout_name, parent->layout, /*durable=*/false,
                 parent->append_tier);
  response->set_handle(handle);
  return absl::OkStatus();
}

absl::Status HeadwiseService::DoAppend(const Tenant& tenant,
                                       const headwise::v1::AppendRequest& request,
                                       headwise::v1::AppendResponse* response) {
  ASSIGN_OR_RETURN(auto entry, FindSequence(tenant, request.handle()));
  const ModelLayout& layout = entry->layout;
  RETURN_IF_ERROR(CheckLayer(layout, request.layer()));
  ASSIGN_OR_RETURN(int tokens, TokenCount(request.k(), "k"));
  const std::vector<int64_t> shape = {tokens, layout.num_kv_heads, layout.head_dim};
  ASSIGN_OR_RETURN(Bytes k, TensorBytes(tenant, request.k(), "k", layout.dtype, shape));
  ASSIGN_OR_RETURN(Bytes v, TensorBytes(tenant, request.v(), "v", layout.dtype, shape));
  RETURN_IF_ERROR(CheckTierQuota(tenant, *entry, k.span.size() + v.span.size()));
  absl::MutexLock lock(&entry->mu);
  if (entry->released)
    return absl::NotFoundError(absl::StrCat("no sequence '", entry->handle, "'"));
  RETURN_IF_ERROR(AppendLocked(*entry, request.layer(), k, v, tokens));
  UpdateUsage(*entry);
  ASSIGN_OR_RETURN(SequenceStats stats, engine_->GetSequenceStats(entry->engine_id));
  response->set_layer_length(stats.layer_lengths.at(request.layer()));
  return absl::OkStatus();
}

absl::Status HeadwiseService::DoAttend(const Tenant& tenant,
                                       const headwise::v1::AttendRequest& request,
                                       headwise::v1::AttendResponse* response) {
  ASSIGN_OR_RETURN(auto entry, FindSequence(tenant, request.handle()));
  const ModelLayout& layout = entry->layout;
  RETURN_IF_ERROR(CheckLayer(layout, request.layer()));
  ASSIGN_OR_RETURN(Bytes q_bytes, TensorBytes(tenant, request.q(), "q", DType::kF32,
                                              {layout.num_q_heads, layout.head_dim}));
  const size_t o_size = static_cast<size_t>(layout.num_q_heads) * layout.head_dim;
  RETURN_IF_ERROR(
      CheckPlacement(tenant, request.output(), (o_size + layout.num_q_heads) * sizeof(float)));
  const std::vector<float> q = CopyFloats(q_bytes.span);
  std::vector<float> o(o_size), lse(layout.num_q_heads);
  {
    absl::MutexLock lock(&entry->mu);
    if (entry->released) {
      return absl::NotFoundError(absl::StrCat("no sequence '", entry->handle, "'"));
    }
    RETURN_IF_ERROR(engine_->Attend(entry->engine_id, LayerId(request.layer()), q,
                                    absl::MakeSpan(o), absl::MakeSpan(lse)));
    UpdateUsage(*entry);  // Staging may have moved pages.
  }
  return PutOutputs(tenant, request.output(), o, {layout.num_q_heads, layout.head_dim}, lse,
                    {layout.num_q_heads}, response->mutable_o(), response->mutable_lse());
}

absl::Status HeadwiseService::DoPrefill(const Tenant& tenant,
                                        const headwise::v1::PrefillRequest& request,
                                        headwise::v1::PrefillResponse* response) {
  ASSIGN_OR_RETURN(auto entry, FindSequence(tenant, request.handle()));
  const ModelLayout& layout = entry->layout;
  RETURN_IF_ERROR(CheckLayer(layout, request.layer()));
  ASSIGN_OR_RETURN(int tokens, TokenCount(request.k(), "k"));
  const std::vector<int64_t> kv_shape = {tokens, layout.num_kv_heads, layout.head_dim};
  ASSIGN_OR_RETURN(Bytes k, TensorBytes(tenant, request.k(), "k", layout.dtype, kv_shape));
  ASSIGN_OR_RETURN(Bytes v, TensorBytes(tenant, request.v(), "v", layout.dtype, kv_shape));
  ASSIGN_OR_RETURN(Bytes q_bytes, TensorBytes(tenant, request.q(), "q", DType::kF32,
                                              {tokens, layout.num_q_heads, layout.head_dim}));
  const size_t o_size = static_cast<size_t>(tokens) * layout.num_q_heads * layout.head_dim;
  const size_t lse_size = static_cast<size_t>(tokens) * layout.num_q_heads;
  RETURN_IF_ERROR(CheckPlacement(tenant, request.output(), (o_size + lse_size) * sizeof(float)));
  RETURN_IF_ERROR(CheckTierQuota(tenant, *entry, k.span.size() + v.span.size()));
  const std::vector<float> q = CopyFloats(q_bytes.span);
  std::vector<float> o(o_size), lse(lse_size);
  {
    absl::MutexLock lock(&entry->mu);
    if (entry->released) {
      return absl::NotFoundError(absl::StrCat("no sequence '", entry->handle, "'"));
    }
    uint32_t op = 0;
    if (entry->durable) {
      op = entry->next_op;
      RETURN_IF_ERROR(options_.durable_log->PutAppend(entry->handle, op, request.layer(), tokens,
                                                      k.span, v.span));
    }
    absl::Status status =
        engine_->Prefill(entry->engine_id, LayerId(request.layer()), q, k.span, v.span, tokens,
                         layout.dtype, absl::MakeSpan(o), absl::MakeSpan(lse));
    if (entry->durable) {
      if (status.ok()) {
        ++entry->next_op;
      } else {
        ForgetRejectedOp(*options_.durable_log, entry->handle, op);
      }
    }
    RETURN_IF_ERROR(status);
    UpdateUsage(*entry);
  }
  return PutOutputs(tenant, request.output(), o, {tokens, layout.num_q_heads, layout.head_dim}, lse,
                    {tokens, layout.num_q_heads}, response->mutable_o(), response->mutable_lse());
}

absl::Status HeadwiseService::DoDecodeStep(const Tenant& tenant, const std::string& handle,
                                           int layer, const Tensor& q_tensor,
                                           const Tensor& k_tensor, const Tensor& v_tensor,
                                           const headwise::v1::OutputPlacement& output,
                                           headwise::v1::DecodeStepResponse* response) {
  ASSIGN_OR_RETURN(auto entry, FindSequence(tenant, handle));
  const ModelLayout& layout = entry->layout;
  RETURN_IF_ERROR(CheckLayer(layout, layer));
  const std::vector<int64_t> kv_shape = {1, layout.num_kv_heads, layout.head_dim};
  ASSIGN_OR_RETURN(Bytes k, TensorBytes(tenant, k_tensor, "k", layout.dtype, kv_shape));
  ASSIGN_OR_RETURN(Bytes v, TensorBytes(tenant, v_tensor, "v", layout.dtype, kv_shape));
  ASSIGN_OR_RETURN(Bytes q_bytes, TensorBytes(tenant, q_tensor, "q", DType::kF32,
                                              {layout.num_q_heads, layout.head_dim}));
  const size_t o_size = static_cast<size_t>(layout.num_q_heads) * layout.head_dim;
  RETURN_IF_ERROR(CheckPlacement(tenant, output, (o_size + layout.num_q_heads) * sizeof(float)));
  RETURN_IF_ERROR(CheckTierQuota(tenant, *entry, k.span.size() + v.span.size()));
  const std::vector<float> q = CopyFloats(q_bytes.span);
  std::vector<float> o(o_size), lse(layout.num_q_heads);
  {
    absl::MutexLock lock(&entry->mu);
    if (entry->released) {
      return absl::NotFoundError(absl::StrCat("no sequence '", entry->handle, "'"));
    }
    RETURN_IF_ERROR(AppendLocked(*entry, layer, k, v, /*num_tokens=*/1));
    RETURN_IF_ERROR(engine_->Attend(entry->engine_id, LayerId(layer), q, absl::MakeSpan(o),
                                    absl::MakeSpan(lse)));
    UpdateUsage(*entry);
    ASSIGN_OR_RETURN(SequenceStats stats, engine_->GetSequenceStats(entry->engine_id));
    response->set_layer_length(stats.layer_lengths.at(layer));
  }
  return PutOutputs(tenant, output, o, {layout.num_q_heads, layout.head_dim}, lse,
                    {layout.num_q_heads}, response->mutable_o(), response->mutable_lse());
}

absl::Status HeadwiseService::DoTruncate(const Tenant& tenant,
                                         const headwise::v1::TruncateRequest& request) {
  ASSIGN_OR_RETURN(auto entry, FindSequence(tenant, request.handle()));
  absl::MutexLock lock(&entry->mu);
  if (entry->released)
    return absl::NotFoundError(absl::StrCat("no sequence '", entry->handle, "'"));
  ASSIGN_OR_RETURN(SequenceStats stats, engine_->GetSequenceStats(entry->engine_id));
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
      ForgetRejectedOp(*options_.durable_log, entry->handle, op);
    }
  }
  RETURN_IF_ERROR(status);
  UpdateUsage(*entry);
  return absl::OkStatus();
}

absl::Status HeadwiseService::DoRelease(const Tenant& tenant,
                                        const headwise::v1::ReleaseRequest& request) {
  ASSIGN_OR_RETURN(auto entry, FindSequence(tenant, request.handle()));
  {
    absl::MutexLock lock(&entry->mu);
    if (entry->released) {
      return absl::NotFoundError(absl::StrCat("no sequence '", entry->handle, "'"));
    }
    // The log goes first: once Release is acknowledged the sequence never comes back.
    if (entry->durable) RETURN_IF_ERROR(options_.durable_log->DeleteSequence(entry->handle));
    entry->released = true;
    absl::Status status = engine_->Release(entry->engine_id);
    if (!status.ok()) {
      spdlog::error("sequence={}: engine release failed: {}", entry->handle,
                    std::string(status.message()));
    }
    UpdateUsage(*entry);  // Released: drops its bytes from the tenant's usage.
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
  if (entry->released) return absl::NotFoundError(absl::StrCat("no sequence '", handle, "'"));
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
  TenantState& state = StateOf(tenant);
  absl::MutexLock lock(&state.mu);
  response->set_tenant_sequences(state.sequences);
  response->set_tenant_bytes(state.tier_bytes[0] + state.tier_bytes[1] + state.tier_bytes[2]);
  return absl::OkStatus();
}

absl::StatusOr<int> HeadwiseService::Restore() {
  DurableLog* log = options_.durable_log;
  if (log == nullptr) return 0;
  ASSIGN_OR_RETURN(auto layouts, log->LoadLayouts());
  for (const auto& record : layouts) {
    const Tenant* tenant = options_.tenants->Find(record.tenant());
    if (tenant == nullptr) {
      spdlog::warn("restore: layout '{}' of unknown tenant '{}' skipped", record.name(),
                   record.tenant());
      continue;
    }
    headwise::v1::RegisterLayoutRequest request;
    request.set_name(record.name());
    *request.mutable_layout() = record.layout();
    absl::Status status = DoRegisterLayout(*tenant, request);
    if (!status.ok()) {
      spdlog::error("restore: layout '{}' of tenant '{}': {}", record.name(), record.tenant(),
                    std::string(status.message()));
    }
  }
  ASSIGN_OR_RETURN(auto sequences, log->LoadSequences());
  int restored = 0;
  for (const auto& record : sequences) {
    const absl::Time start = absl::Now();
    const Tenant* tenant = options_.tenants->Find(record.tenant());
    if (tenant == nullptr) {
      spdlog::error("restore: sequence {} of unknown tenant '{}' skipped (kept on disk)",
                    record.handle(), record.tenant());
      continue;
    }
    absl::StatusOr<ModelLayout> layout = LayoutFromProto(record.layout());
    std::optional<SequenceId> id;
    int64_t tokens = 0;
    uint32_t next_op = 0;
    size_t num_ops = 0;
    auto replay = [&]() -> absl::Status {
      RETURN_IF_ERROR(layout.status());
      const std::string engine_layout = EngineLayoutName(tenant->name, record.layout_name());
      RETURN_IF_ERROR(engine_->RegisterLayout(engine_layout, *layout));
      ASSIGN_OR_RETURN(id, engine_->CreateSequence(engine_layout, record.policy()));
      ASSIGN_OR_RETURN(std::vector<DurableLog::Op> ops, log->LoadOps(record.handle()));
      num_ops = ops.size();
      std::vector<std::byte> k, v;
      for (const DurableLog::Op& op : ops) {
        absl::Status status;
        if (op.record.kind() == headwise::v1::DurableOpRecord::APPEND) {
          status = log->ReadAppend(record.handle(), op, &k, &v);
          if (status.ok()) {
            status = engine_->Append(*id, LayerId(op.record.layer()), k, v, op.record.num_tokens(),
                                     layout->dtype);
          }
          tokens += op.record.num_tokens();
        } else if (op.record.kind() == headwise::v1::DurableOpRecord::TRUNCATE) {
          status = engine_->Truncate(*id, op.record.truncate_length());
        } else {
          status = absl::DataLossError("unknown op kind");
        }
        if (!status.ok()) {
          return absl::Status(status.code(),
                              absl::StrCat("op ", op.index, ": ", std::string(status.message())));
        }
        next_op = op.index + 1;
      }
      return absl::OkStatus();
    };
    absl::Status status = replay();
    if (!status.ok()) {
      if (id.has_value()) engine_->Release(*id).IgnoreError();
      spdlog::error("restore: sequence {} of tenant '{}' not restored (kept on disk): {}",
                    record.handle(), tenant->name, std::string(status.message()));
      continue;
    }
    {
      TenantState& state = StateOf(*tenant);
      absl::MutexLock lock(&state.mu);
      ++state.sequences;
      state.layouts.try_emplace(record.layout_name(), *layout);
    }
    auto entry = InsertSequence(*tenant, record.handle(), *id, record.layout_name(), *layout,
                                /*durable=*/true, AppendTier(record.policy()));
    {
      absl::MutexLock lock(&entry->mu);
      entry->next_op = next_op;
    }
    ++restored;
    spdlog::info("restore: sequence {} tenant={} ops={} appended_tokens={} in {}", record.handle(),
                 tenant->name, num_ops, tokens, absl::FormatDuration(absl::Now() - start));
  }
  return restored;
}

// ---------------------------------------------------------------------------------------------
// gRPC entry points: authenticate and hand over to the pool.

grpc::ServerUnaryReactor* HeadwiseService::RegisterLayout(
    grpc::CallbackServerContext* ctx, const headwise::v1::RegisterLayoutRequest* request,
    headwise::v1::RegisterLayoutResponse*) {
  return Dispatch("RegisterLayout", ctx,
                  [this, request](const Tenant& t) { return DoRegisterLayout(t, *request); });
}

grpc::ServerUnaryReactor* HeadwiseService::CreateSequence(
    grpc::CallbackServerContext* ctx, const headwise::v1::CreateSequenceRequest* request,
    headwise::v1::CreateSequenceResponse* response) {
  return Dispatch("CreateSequence", ctx, [this, request, response](const Tenant& t) {
    return DoCreateSequence(t, *request, response);
  });
}

grpc::ServerUnaryReactor* HeadwiseService::Fork(grpc::CallbackServerContext* ctx,
                                                const headwise::v1::ForkRequest* request,
                                                headwise::v1::ForkResponse* response) {
  return Dispatch("Fork", ctx, [this, request, response](const Tenant& t) {
    return DoFork(t, *request, response);
  });
}

grpc::ServerUnaryReactor* HeadwiseService::Append(grpc::CallbackServerContext* ctx,
                                                  const headwise::v1::AppendRequest* request,
                                                  headwise::v1::AppendResponse* response) {
  return Dispatch("Append", ctx, [this, request, response](const Tenant& t) {
    return DoAppend(t, *request, response);
  });
}

grpc::ServerUnaryReactor* HeadwiseService::Attend(grpc::CallbackServerContext* ctx,
                                                  const headwise::v1::AttendRequest* request,
                                                  headwise::v1::AttendResponse* response) {
  return Dispatch("Attend", ctx, [this, request, response](const Tenant& t) {
    return DoAttend(t, *request, response);
  });
}

grpc::ServerUnaryReactor* HeadwiseService::Prefill(grpc::CallbackServerContext* ctx,
                                                   const headwise::v1::PrefillRequest* request,
                                                   headwise::v1::PrefillResponse* response) {
  return Dispatch("Prefill", ctx, [this, request, response](const Tenant& t) {
    return DoPrefill(t, *request, response);
  });
}

grpc::ServerUnaryReactor* HeadwiseService::DecodeStep(
    grpc::CallbackServerContext* ctx, const headwise::v1::DecodeStepRequest* request,
    headwise::v1::DecodeStepResponse* response) {
  return Dispatch("DecodeStep", ctx, [this, request, response](const Tenant& t) {
    return DoDecodeStep(t, request->handle(), request->layer(), request->q(), request->k(),
                        request->v(), request->output(), response);
  });
}

grpc::ServerUnaryReactor* HeadwiseService::Truncate(grpc::CallbackServerContext* ctx,
                                                    const headwise::v1::TruncateRequest* request,
                                                    headwise::v1::TruncateResponse*) {
  return Dispatch("Truncate", ctx,
                  [this, request](const Tenant& t) { return DoTruncate(t, *request); });
}

grpc::ServerUnaryReactor* HeadwiseService::Release(grpc::CallbackServerContext* ctx,
                                                   const headwise::v1::ReleaseRequest* request,
                                                   headwise::v1::ReleaseResponse*) {
  return Dispatch("Release", ctx,
                  [this, request](const Tenant& t) { return DoRelease(t, *request); });
}

grpc::ServerUnaryReactor* HeadwiseService::GetSequence(
    grpc::CallbackServerContext* ctx, const headwise::v1::GetSequenceRequest* request,
    headwise::v1::SequenceInfo* response) {
  return Dispatch("GetSequence", ctx, [this, request, response](const Tenant& t) {
    return DoGetSequence(t, request->handle(), response);
  });
}

grpc::ServerUnaryReactor* HeadwiseService::ListSequences(
    grpc::CallbackServerContext* ctx, const headwise::v1::ListSequencesRequest*,
    headwise::v1::ListSequencesResponse* response) {
  return Dispatch("ListSequences", ctx,
                  [this, response](const Tenant& t) { return DoListSequences(t, response); });
}

grpc::ServerUnaryReactor* HeadwiseService::OpenStaging(
    grpc::CallbackServerContext* ctx, const headwise::v1::OpenStagingRequest* request,
    headwise::v1::OpenStagingResponse* response) {
  return Dispatch("OpenStaging", ctx, [this, request, response](const Tenant& t) {
    return DoOpenStaging(t, *request, response);
  });
}

grpc::ServerUnaryReactor* HeadwiseService::CloseStaging(
    grpc::CallbackServerContext* ctx, const headwise::v1::CloseStagingRequest* request,
    headwise::v1::CloseStagingResponse*) {
  return Dispatch("CloseStaging", ctx, [this, request](const Tenant& t) {
    return options_.staging->Close(t.name, request->region_id());
  });
}

grpc::ServerUnaryReactor* HeadwiseService::Stats(grpc::CallbackServerContext* ctx,
                                                 const headwise::v1::StatsRequest*,
                                                 headwise::v1::StatsResponse* response) {
  return Dispatch("Stats", ctx, [this, response](const Tenant& t) { return DoStats(t, response); });
}

grpc::ServerUnaryReactor* HeadwiseService::Health(grpc::CallbackServerContext* ctx,
                                                  const headwise::v1::HealthRequest*,
                                                  headwise::v1::HealthResponse* response) {
  return Dispatch("Health", ctx, [this, response](const Tenant&) {
    response->set_status("SERVING");
    response->set_version(options_.version);
    return absl::OkStatus();
  });
}

grpc::ServerBidiReactor<headwise::v1::StreamStepRequest, headwise::v1::DecodeStepResponse>*
HeadwiseService::DecodeStream(grpc::CallbackServerContext* ctx) {
  return new DecodeStreamReactor(this, Authenticate(ctx));
}

}  // namespace headwise
