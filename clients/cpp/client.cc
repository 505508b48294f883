#include "clients/cpp/client.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/random/random.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "cachesvc/base/status_macros.h"
#include "clients/cpp/client_internal.h"
#include "grpcpp/grpcpp.h"
#include "headwise/v1/service.grpc.pb.h"

namespace headwise::client {

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

v1::DTypeProto ToProto(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return v1::DTYPE_F32;
    case DType::kF16:
      return v1::DTYPE_F16;
    case DType::kBF16:
      return v1::DTYPE_BF16;
  }
  return v1::DTYPE_UNSPECIFIED;
}

v1::ModelLayoutProto ToProto(const ModelLayout& layout) {
  v1::ModelLayoutProto proto;
  proto.set_num_layers(layout.num_layers);
  proto.set_num_q_heads(layout.num_q_heads);
  proto.set_num_kv_heads(layout.num_kv_heads);
  proto.set_head_dim(layout.head_dim);
  proto.set_dtype(ToProto(layout.dtype));
  proto.set_page_tokens(layout.page_tokens);
  return proto;
}

using internal::InlineOutput;
using internal::KvBytes;
using internal::NormalizeTarget;
using internal::QBytes;
using internal::SetInline;
using internal::SetKvInline;
using internal::SetKvStaged;
using internal::SetOutput;
using internal::SetQInline;
using internal::SetStaged;
using internal::StagedOutputOf;

// ---------------------------------------------------------------------------------------------
// StagingRegion

StagingRegion::StagingRegion(std::shared_ptr<internal::Connection> connection, std::string id,
                             std::string shm_name, std::byte* data, uint64_t size)
    : connection_(std::move(connection)),
      id_(std::move(id)),
      shm_name_(std::move(shm_name)),
      data_(data),
      size_(size) {}

StagingRegion::StagingRegion(StagingRegion&& other) noexcept
    : connection_(std::move(other.connection_)),
      id_(std::move(other.id_)),
      shm_name_(std::move(other.shm_name_)),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)) {}

StagingRegion& StagingRegion::operator=(StagingRegion&& other) noexcept {
  if (this != &other) {
    Close().IgnoreError();
    connection_ = std::move(other.connection_);
    id_ = std::move(other.id_);
    shm_name_ = std::move(other.shm_name_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

StagingRegion::~StagingRegion() { Close().IgnoreError(); }

absl::Status StagingRegion::Close() {
  if (connection_ == nullptr) return absl::OkStatus();
  if (data_ != nullptr) munmap(data_, size_);
  data_ = nullptr;
  size_ = 0;
  v1::CloseStagingRequest request;
  request.set_region_id(id_);
  v1::CloseStagingResponse response;
  absl::Status status =
      connection_->Call(/*idempotent=*/false, [&](Stub& stub, grpc::ClientContext& context) {
        return stub.CloseStaging(&context, request, &response);
      });
  connection_.reset();
  return status;
}

// ---------------------------------------------------------------------------------------------
// DecodeStream

struct DecodeStream::State {
  std::shared_ptr<internal::Connection> connection;
  std::shared_ptr<Stub> stub;  // Keeps the channel of this stream alive.
  Sequence seq;
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReaderWriter<v1::StreamStepRequest, v1::DecodeStepResponse>> stream;
  bool sent_handle = false;
  bool finished = false;
  absl::Status final_status;
};

DecodeStream::DecodeStream(std::unique_ptr<State> state) : state_(std::move(state)) {}

DecodeStream::~DecodeStream() {
  if (state_ != nullptr && !state_->finished) {
    state_->context.TryCancel();
    state_->stream->Finish().error_code();
  }
}

absl::StatusOr<v1::DecodeStepResponse> DecodeStream::RoundTrip(v1::StreamStepRequest& request) {
  State& s = *state_;
  if (s.finished) {
    return s.final_status.ok() ? absl::FailedPreconditionError("DecodeStream already finished")
                               : s.final_status;
  }
  if (!s.sent_handle) request.set_handle(s.seq.handle());
  v1::DecodeStepResponse response;
  if (s.stream->Write(request) && s.stream->Read(&response)) {
    s.sent_handle = true;
    return response;
  }
  // The stream ended: its status says why.
  s.finished = true;
  s.final_status = FromGrpcStatus(s.stream->Finish());
  if (s.final_status.ok()) {
    s.final_status = absl::InternalError("DecodeStream ended without a reply");
  }
  return s.final_status;
}

absl::StatusOr<AttendOutput> DecodeStream::Step(int layer, absl::Span<const float> q,
                                                absl::Span<const std::byte> k,
                                                absl::Span<const std::byte> v) {
  const ModelLayout& layout = state_->seq.layout();
  v1::StreamStepRequest request;
  request.set_layer(layer);
  SetQInline(request.mutable_q(), layout, q);
  SetKvInline(request.mutable_k(), layout, k, 1);
  SetKvInline(request.mutable_v(), layout, v, 1);
  ASSIGN_OR_RETURN(v1::DecodeStepResponse response, RoundTrip(request));
  return InlineOutput(response.o(), response.lse(), response.layer_length());
}

absl::StatusOr<StagedOutput> DecodeStream::Step(int layer, const StagingRegion& region,
                                                uint64_t q_offset, uint64_t k_offset,
                                                uint64_t v_offset, uint64_t out_offset) {
  const ModelLayout& layout = state_->seq.layout();
  v1::StreamStepRequest request;
  request.set_layer(layer);
  SetStaged(request.mutable_q(), v1::DTYPE_F32, {layout.num_q_heads, layout.head_dim}, region,
            q_offset, QBytes(layout));
  SetKvStaged(request.mutable_k(), layout, region, k_offset, 1);
  SetKvStaged(request.mutable_v(), layout, region, v_offset, 1);
  SetOutput(request.mutable_output(), region, out_offset);
  ASSIGN_OR_RETURN(v1::DecodeStepResponse response, RoundTrip(request));
  return StagedOutputOf(response.o(), response.lse(), response.layer_length());
}

absl::Status DecodeStream::Finish() {
  State& s = *state_;
  if (s.finished) return s.final_status;
  s.finished = true;
  s.stream->WritesDone();
  s.final_status = FromGrpcStatus(s.stream->Finish());
  return s.final_status;
}

// ---------------------------------------------------------------------------------------------
// Client

struct Client::Layouts {
  absl::Mutex mu;
  absl::flat_hash_map<std::string, ModelLayout> by_name ABSL_GUARDED_BY(mu);
};

namespace {

// A random start, so that two clients of one tenant do not hand out the same ids.
uint64_t RandomStepIdBase() {
  absl::BitGen bitgen;
  return absl::Uniform<uint64_t>(bitgen) | 1;
}

}  // namespace

Client::Client(const ClientOptions& options, std::shared_ptr<internal::Connection> connection)
    : options_(options),
      next_step_id_(RandomStepIdBase()),
      connection_(std::move(connection)),
      layouts_(new Layouts) {}

uint64_t Client::StepId(uint64_t requested) {
  if (requested != 0 || !options_.step_ids) return requested;
  uint64_t id = next_step_id_.fetch_add(1, std::memory_order_relaxed);
  if (id == 0) id = next_step_id_.fetch_add(1, std::memory_order_relaxed);  // 0 means none.
  return id;
}

Client::~Client() = default;

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(const ClientOptions& options) {
  if (options.target.empty()) return absl::InvalidArgumentError("ClientOptions.target is empty");
  if (options.token.empty()) return absl::InvalidArgumentError("ClientOptions.token is empty");
  if (options.max_message_bytes < 1024) {
    return absl::InvalidArgumentError("ClientOptions.max_message_bytes must be >= 1024");
  }
  auto connection =
      std::make_shared<internal::Connection>(options, NormalizeTarget(options.target));
  std::unique_ptr<Client> client(new Client(options, std::move(connection)));
  if (options.check_health) RETURN_IF_ERROR(client->Health().status());
  return client;
}

absl::Status Client::RegisterLayout(const std::string& name, const ModelLayout& layout) {
  v1::RegisterLayoutRequest request;
  request.set_name(name);
  *request.mutable_layout() = ToProto(layout);
  v1::RegisterLayoutResponse response;
  RETURN_IF_ERROR(connection_->Call(false, [&](Stub& stub, grpc::ClientContext& context) {
    return stub.RegisterLayout(&context, request, &response);
  }));
  absl::MutexLock lock(&layouts_->mu);
  layouts_->by_name[name] = layout;
  return absl::OkStatus();
}

absl::StatusOr<Sequence> Client::CreateSequence(const std::string& layout_name,
                                                const v1::PolicySpec& policy, bool durable) {
  ModelLayout layout;
  {
    absl::MutexLock lock(&layouts_->mu);
    auto it = layouts_->by_name.find(layout_name);
    if (it == layouts_->by_name.end()) {
      return absl::FailedPreconditionError(
          absl::StrCat("layout '", layout_name,
                       "' was not registered by this client; pass the layout explicitly"));
    }
    layout = it->second;
  }
  return CreateSequence(layout_name, layout, policy, durable);
}

absl::StatusOr<Sequence> Client::CreateSequence(const std::string& layout_name,
                                                const ModelLayout& layout,
                                                const v1::PolicySpec& policy, bool durable) {
  v1::CreateSequenceRequest request;
  request.set_layout_name(layout_name);
  *request.mutable_policy() = policy;
  request.set_durable(durable);
  v1::CreateSequenceResponse response;
  RETURN_IF_ERROR(connection_->Call(false, [&](Stub& stub, grpc::ClientContext& context) {
    return stub.CreateSequence(&context, request, &response);
  }));
  return Sequence(response.handle(), layout);
}

absl::StatusOr<int64_t> Client::Append(const Sequence& seq, int layer,
                                       absl::Span<const std::byte> k, absl::Span<const std::byte> v,
                                       int num_tokens, uint64_t step_id) {
  v1::AppendRequest request;
  request.set_handle(seq.handle());
  request.set_layer(layer);
  SetKvInline(request.mutable_k(), seq.layout(), k, num_tokens);
  SetKvInline(request.mutable_v(), seq.layout(), v, num_tokens);
  request.set_step_id(StepId(step_id));
  v1::AppendResponse response;
  const bool retry = request.step_id() != 0;
  RETURN_IF_ERROR(connection_->Call(retry, [&](Stub& stub, grpc::ClientContext& context) {
    return stub.Append(&context, request, &response);
  }));
  return response.layer_length();
}

absl::StatusOr<int64_t> Client::Append(const Sequence& seq, int layer, const StagingRegion& region,
                                       uint64_t k_offset, uint64_t v_offset, int num_tokens,
                                       uint64_t step_id) {
  v1::AppendRequest request;
  request.set_handle(seq.handle());
  request.set_layer(layer);
  SetKvStaged(request.mutable_k(), seq.layout(), region, k_offset, num_tokens);
  SetKvStaged(request.mutable_v(), seq.layout(), region, v_offset, num_tokens);
  request.set_step_id(StepId(step_id));
  v1::AppendResponse response;
  const bool retry = request.step_id() != 0;
  RETURN_IF_ERROR(connection_->Call(retry, [&](Stub& stub, grpc::ClientContext& context) {
    return stub.Append(&context, request, &response);
  }));
  return response.layer_length();
}

absl::StatusOr<int64_t> Client::AppendLayers(const Sequence& seq,
                                             absl::Span<const absl::Span<const std::byte>> k,
                                             absl::Span<const absl::Span<const std::byte>> v,
                                             int num_tokens, uint64_t step_id) {
  v1::AppendLayersRequest request;
  request.set_handle(seq.handle());
  request.set_num_tokens(num_tokens);
  auto* layers = request.mutable_inline_layers();
  for (absl::Span<const std::byte> bytes : k) {
    layers->add_k(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  }
  for (absl::Span<const std::byte> bytes : v) {
    layers->add_v(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  }
  return SendAppendLayers(request, step_id);
}

absl::StatusOr<int64_t> Client::AppendLayers(const Sequence& seq, const StagingRegion& region,
                                             uint64_t offset, int num_tokens, uint64_t step_id) {
  v1::AppendLayersRequest request;
  request.set_handle(seq.handle());
  request.set_num_tokens(num_tokens);
  request.mutable_staged_layers()->set_region_id(region.id());
  request.mutable_staged_layers()->set_offset(offset);
  return SendAppendLayers(request, step_id);
}

absl::StatusOr<int64_t> Client::SendAppendLayers(v1::AppendLayersRequest& request,
                                                 uint64_t step_id) {
  request.set_step_id(StepId(step_id));
  v1::AppendLayersResponse response;
  const bool retry = request.step_id() != 0;
  RETURN_IF_ERROR(connection_->Call(retry, [&](Stub& stub, grpc::ClientContext& context) {
    return stub.AppendLayers(&context, request, &response);
  }));
  return response.length();
}

absl::StatusOr<AttendOutput> Client::Attend(const Sequence& seq, int layer,
                                            absl::Span<const float> q) {
  v1::AttendRequest request;
  request.set_handle(seq.handle());
  request.set_layer(layer);
  SetQInline(request.mutable_q(), seq.layout(), q);
  v1::AttendResponse response;
  RETURN_IF_ERROR(connection_->Call(true, [&](Stub& stub, grpc::ClientContext& context) {
    return stub.Attend(&context, request, &response);
  }));
  return InlineOutput(response.o(), response.lse(), 0);
}

absl::StatusOr<StagedOutput> Client::Attend(const Sequence& seq, int layer,
                                            const StagingRegion& region, uint64_t q_offset,
                                            uint64_t out_offset) {
  const ModelLayout& layout = seq.layout();
  v1::AttendRequest request;
  request.set_handle(seq.handle());
  request.set_layer(layer);
  SetStaged(request.mutable_q(), v1::DTYPE_F32, {layout.num_q_heads, layout.head_dim}, region,
            q_offset, QBytes(layout));
  SetOutput(request.mutable_output(), region, out_offset);
  v1::AttendResponse response;
  // Not retried: after a daemon restart the region id is gone anyway.
  RETURN_IF_ERROR(connection_->Call(false, [&](Stub& stub, grpc::ClientContext& context) {
    return stub.Attend(&context, request, &response);
  }));
  return StagedOutputOf(response.o(), response.lse(), 0);
}

absl::StatusOr<AttendOutput> Client::Prefill(const Sequence& seq, int layer,
                                             absl::Span<const float> q,
                                             absl::Span<const std::byte> k,
                                             absl::Span<const std::byte> v, int num_tokens,
                                             uint64_t step_id) {
  const ModelLayout& layout = seq.layout();
  v1::PrefillRequest request;
  request.set_handle(seq.handle());
  request.set_layer(layer);
  SetInline(request.mutable_q(), v1::DTYPE_F32, {num_tokens, layout.num_q_heads, layout.head_dim},
            q.data(), q.size() * sizeof(float));
  SetKvInline(request.mutable_k(), layout, k, num_tokens);
  SetKvInline(request.mutable_v(), layout, v, num_tokens);
  request.set_step_id(StepId(step_id));
  v1::PrefillResponse response;
  const bool retry = request.step_id() != 0;
  RETURN_IF_ERROR(connection_->Call(retry, [&](Stub& stub, grpc::ClientContext& context) {
    return stub.Prefill(&context, request, &response);
  }));
  return InlineOutput(response.o(), response.lse(), 0);
}

absl::StatusOr<AttendOutput> Client::DecodeStep(const Sequence& seq, int layer,
                                                absl::Span<const float> q,
                                                absl::Span<const std::byte> k,
                                                absl::Span<const std::byte> v, uint64_t step_id) {
  v1::DecodeStepRequest request;
  request.set_handle(seq.handle());
  request.set_layer(layer);
  SetQInline(request.mutable_q(), seq.layout(), q);
  SetKvInline(request.mutable_k(), seq.layout(), k, 1);
  SetKvInline(request.mutable_v(), seq.layout(), v, 1);
  request.set_step_id(StepId(step_id));
  v1::DecodeStepResponse response;
  const bool retry = request.step_id() != 0;
  RETURN_IF_ERROR(connection_->Call(retry, [&](Stub& stub, grpc::ClientContext& context) {
    return stub.DecodeStep(&context, request, &response);
  }));
  return InlineOutput(response.o(), response.lse(), response.layer_length());
}

absl::StatusOr<StagedOutput> Client::DecodeStep(const Sequence& seq, int layer,
                                                const StagingRegion& region, uint64_t q_offset,
                                                uint64_t k_offset, uint64_t v_offset,
                                                uint64_t out_offset, uint64_t step_id) {
  const ModelLayout& layout = seq.layout();
  v1::DecodeStepRequest request;
  request.set_handle(seq.handle());
  request.set_layer(layer);
  SetStaged(request.mutable_q(), v1::DTYPE_F32, {layout.num_q_heads, layout.head_dim}, region,
            q_offset, QBytes(layout));
  SetKvStaged(request.mutable_k(), layout, region, k_offset, 1);
  SetKvStaged(request.mutable_v(), layout, region, v_offset, 1);
  SetOutput(request.mutable_output(), region, out_offset);
  request.set_step_id(StepId(step_id));
  v1::DecodeStepResponse response;
  const bool retry = request.step_id() != 0;
  RETURN_IF_ERROR(connection_->Call(retry, [&](Stub& stub, grpc::ClientContext& context) {
    return stub.DecodeStep(&context, request, &response);
  }));
  return StagedOutputOf(response.o(), response.lse(), response.layer_length());
}

absl::StatusOr<std::vector<absl::StatusOr<AttendOutput>>> Client::DecodeStepBatch(
    int layer, absl::Span<const DecodeBatchItem> items) {
  v1::DecodeStepBatchRequest request;
  request.set_layer(layer);
  bool retry = true;  // Only when every item carries an id.
  for (const DecodeBatchItem& item : items) {
    v1::DecodeStepBatchItem* proto = request.add_items();
    proto->set_handle(item.seq.handle());
    SetQInline(proto->mutable_q(), item.seq.layout(), item.q);
    SetKvInline(proto->mutable_k(), item.seq.layout(), item.k, 1);
    SetKvInline(proto->mutable_v(), item.seq.layout(), item.v, 1);
    proto->set_step_id(StepId(item.step_id));
    retry = retry && proto->step_id() != 0;
  }
  v1::DecodeStepBatchResponse response;
  RETURN_IF_ERROR(connection_->Call(retry, [&](Stub& stub, grpc::ClientContext& context) {
    return stub.DecodeStepBatch(&context, request, &response);
  }));
  if (response.results_size() != request.items_size()) {
    return absl::InternalError(absl::StrCat("DecodeStepBatch: ", response.results_size(),
                                            " results for ", request.items_size(), " items"));
  }
  std::vector<absl::StatusOr<AttendOutput>> out;
  out.reserve(items.size());
  for (const v1::DecodeStepBatchResult& result : response.results()) {
    if (result.code() != 0) {
      out.push_back(absl::Status(static_cast<absl::StatusCode>(result.code()), result.message()));
    } else {
      out.push_back(InlineOutput(result.o(), result.lse(), result.layer_length()));
    }
  }
  return out;
}

absl::StatusOr<std::unique_ptr<DecodeStream>> Client::OpenDecodeStream(const Sequence& seq) {
  auto state = std::make_unique<DecodeStream::State>();
  state->connection = connection_;
  state->stub = connection_->Current().first;
  state->seq = seq;
  connection_->Prepare(state->context, /*with_deadline=*/false);
  state->stream = state->stub->DecodeStream(&state->context);
  if (state->stream == nullptr) return absl::InternalError("DecodeStream could not be opened");
  return std::unique_ptr<DecodeStream>(new DecodeStream(std::move(state)));
}

absl::StatusOr<Sequence> Client::Fork(const Sequence& seq) {
  v1::ForkRequest request;
  request.set_handle(seq.handle());
  v1::ForkResponse response;
  RETURN_IF_ERROR(connection_->Call(false, [&](Stub& stub, grpc::ClientContext& context) {
    return stub.Fork(&context, request, &response);
  }));
  return Sequence(response.handle(), seq.layout());
}

absl::Status Client::Truncate(const Sequence& seq, int64_t length) {
  v1::TruncateRequest request;
  request.set_handle(seq.handle());
  request.set_length(length);
  v1::TruncateResponse response;
  return connection_->Call(false, [&](Stub& stub, grpc::ClientContext& context) {
    return stub.Truncate(&context, request, &response);
  });
}

absl::Status Client::Release(const Sequence& seq) {
  v1::ReleaseRequest request;
  request.set_handle(seq.handle());
  v1::ReleaseResponse response;
  return connection_->Call(false, [&](Stub& stub, grpc::ClientContext& context) {
    return stub.Release(&context, request, &response);
  });
}

absl::StatusOr<v1::SequenceInfo> Client::GetSequence(const Sequence& seq) {
  v1::GetSequenceRequest request;
  request.set_handle(seq.handle());
  v1::SequenceInfo response;
  RETURN_IF_ERROR(connection_->Call(true, [&](Stub& stub, grpc::ClientContext& context) {
    return stub.GetSequence(&context, request, &response);
  }));
  return response;
}

absl::StatusOr<std::vector<v1::SequenceInfo>> Client::ListSequences() {
  v1::ListSequencesRequest request;
  v1::ListSequencesResponse response;
  RETURN_IF_ERROR(connection_->Call(true, [&](Stub& stub, grpc::ClientContext& context) {
    return stub.ListSequences(&context, request, &response);
  }));
  return std::vector<v1::SequenceInfo>(response.sequences().begin(), response.sequences().end());
}

absl::StatusOr<StagingRegion> Client::OpenStaging(uint64_t size) {
  v1::OpenStagingRequest request;
  request.set_size(size);
  v1::OpenStagingResponse response;
  RETURN_IF_ERROR(connection_->Call(false, [&](Stub& stub, grpc::ClientContext& context) {
    return stub.OpenStaging(&context, request, &response);
  }));
  // From here on, every failure closes the region on the daemon (the StagingRegion does it).
  StagingRegion region(connection_, response.region_id(), response.shm_name(), nullptr, 0);
  const std::string name =
      absl::StrCat(absl::StartsWith(response.shm_name(), "/") ? "" : "/", response.shm_name());
  const int fd = shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat("shm_open(", name, "): ", std::strerror(errno),
                                            " (staging needs the daemon on this host)"));
  }
  void* data = mmap(nullptr, response.size(), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int mmap_errno = errno;
  close(fd);
  if (data == MAP_FAILED) {
    return absl::InternalError(
        absl::StrCat("mmap(", name, ", ", response.size(), "): ", std::strerror(mmap_errno)));
  }
  region.data_ = static_cast<std::byte*>(data);
  region.size_ = response.size();
  return region;
}

absl::StatusOr<v1::StatsResponse> Client::Stats() {
  v1::StatsRequest request;
  v1::StatsResponse response;
  RETURN_IF_ERROR(connection_->Call(true, [&](Stub& stub, grpc::ClientContext& context) {
    return stub.Stats(&context, request, &response);
  }));
  return response;
}

absl::StatusOr<v1::HealthResponse> Client::Health() {
  v1::HealthRequest request;
  v1::HealthResponse response;
  RETURN_IF_ERROR(connection_->Call(true, [&](Stub& stub, grpc::ClientContext& context) {
    return stub.Health(&context, request, &response);
  }));
  return response;
}

}  // namespace headwise::client
