// HeadwiseService: authentication, admission and dispatch to the scheduler's workers,
// cancellation, metrics, and the gRPC entry points of every unary RPC.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <limits>
#include <string>
#include <utility>

#include "cachesvc/base/cancellation.h"
#include "cachesvc/service/headwise_service.h"
#include "spdlog/spdlog.h"

namespace headwise {

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

void SetTenantLimits(const Tenant& tenant, FairScheduler::Job& job) {
  constexpr uint64_t kMaxInt = std::numeric_limits<int>::max();
  constexpr uint64_t kMaxInt64 = std::numeric_limits<int64_t>::max();
  job.max_calls = static_cast<int>(std::min(tenant.quota.max_calls(), kMaxInt));
  job.max_bytes = static_cast<int64_t>(std::min(tenant.quota.max_queued_bytes(), kMaxInt64));
}

// One unary call: queued in the scheduler, then run on a worker. A cancel (the client went away
// or the deadline passed) removes a queued call at once, so it holds neither its payload nor a
// worker; a running call sees the cancel through its flag (CallCancelled) and long engine work
// stops before it changes anything.
class HeadwiseService::UnaryCall final : public grpc::ServerUnaryReactor {
 public:
  UnaryCall(HeadwiseService* service, const char* rpc, grpc::CallbackServerContext* ctx,
            absl::Time start)
      : service_(service), rpc_(rpc), ctx_(ctx), start_(start) {}

  // Queues `work` for `tenant`, or finishes the call when the scheduler refuses it.
  void Submit(const Tenant* tenant, Lane lane, int64_t bytes,
              std::function<absl::Status(const Tenant&)> work) {
    tenant_ = tenant;
    FairScheduler::Job job;
    job.tenant = tenant;
    job.lane = lane;
    job.bytes = bytes;
    SetTenantLimits(*tenant, job);
    job.run = [this, work = std::move(work)] { Run(work); };
    job.drop = [this](absl::Status status) { Done(status); };
    absl::StatusOr<FairScheduler::JobId> id = service_->scheduler_->Submit(std::move(job));
    if (!id.ok()) {
      Done(id.status());
      return;
    }
    bool cancel_now;
    {
      absl::MutexLock lock(&mu_);
      id_ = *id;
      cancel_now = cancel_requested_;
    }
    if (cancel_now) service_->scheduler_->Cancel(*id, CancelStatus());
  }

  void OnCancel() override {
    cancelled_.store(true, std::memory_order_relaxed);
    FairScheduler::JobId id;
    {
      absl::MutexLock lock(&mu_);
      cancel_requested_ = true;
      id = id_;
    }
    if (id != 0) service_->scheduler_->Cancel(id, CancelStatus());
  }

  void OnDone() override { delete this; }

  // Finishes the call with `status` (once).
  void Done(const absl::Status& status) {
    service_->Record(rpc_, tenant_, start_, status);
    Finish(ToGrpcStatus(status));
  }

 private:
  void Run(const std::function<absl::Status(const Tenant&)>& work) {
    if (cancelled_.load(std::memory_order_relaxed) || ctx_->IsCancelled()) {
      Done(CancelStatus());
      return;
    }
    if (ctx_->deadline() < std::chrono::system_clock::now()) {
      Done(absl::DeadlineExceededError("the call's deadline passed while it was queued"));
      return;
    }
    ScopedCancellation scope(&cancelled_);
    Done(work(*tenant_));
  }

  static absl::Status CancelStatus() {
    return absl::CancelledError("the client cancelled the call or its deadline passed");
  }

  HeadwiseService* const service_;
  const char* const rpc_;
  grpc::CallbackServerContext* const ctx_;
  const absl::Time start_;
  const Tenant* tenant_ = nullptr;
  std::atomic<bool> cancelled_{false};
  absl::Mutex mu_;
  FairScheduler::JobId id_ ABSL_GUARDED_BY(mu_) = 0;  // 0: not queued yet.
  bool cancel_requested_ ABSL_GUARDED_BY(mu_) = false;
};

grpc::ServerUnaryReactor* HeadwiseService::Dispatch(
    const char* rpc, grpc::CallbackServerContext* ctx, const google::protobuf::Message& request,
    Lane lane, std::function<absl::Status(const Tenant&)> work) {
  auto* call = new UnaryCall(this, rpc, ctx, absl::Now());
  absl::StatusOr<const Tenant*> tenant = Authenticate(ctx);
  if (!tenant.ok()) {
    call->Done(tenant.status());
    return call;
  }
  const int64_t bytes = static_cast<int64_t>(request.ByteSizeLong());
  if (bytes > kInteractiveBytes) lane = Lane::kBulk;
  call->Submit(*tenant, lane, bytes, std::move(work));
  return call;
}

// ---------------------------------------------------------------------------------------------
// gRPC entry points: authenticate and hand over to the pool.

grpc::ServerUnaryReactor* HeadwiseService::RegisterLayout(
    grpc::CallbackServerContext* ctx, const headwise::v1::RegisterLayoutRequest* request,
    headwise::v1::RegisterLayoutResponse*) {
  return Dispatch("RegisterLayout", ctx, *request, Lane::kInteractive,
                  [this, request](const Tenant& t) { return DoRegisterLayout(t, *request); });
}

grpc::ServerUnaryReactor* HeadwiseService::CreateSequence(
    grpc::CallbackServerContext* ctx, const headwise::v1::CreateSequenceRequest* request,
    headwise::v1::CreateSequenceResponse* response) {
  return Dispatch("CreateSequence", ctx, *request, Lane::kInteractive,
                  [this, request, response](const Tenant& t) {
                    return DoCreateSequence(t, *request, response);
                  });
}

grpc::ServerUnaryReactor* HeadwiseService::Fork(grpc::CallbackServerContext* ctx,
                                                const headwise::v1::ForkRequest* request,
                                                headwise::v1::ForkResponse* response) {
  return Dispatch(
      "Fork", ctx, *request, Lane::kInteractive,
      [this, request, response](const Tenant& t) { return DoFork(t, *request, response); });
}

grpc::ServerUnaryReactor* HeadwiseService::Append(grpc::CallbackServerContext* ctx,
                                                  const headwise::v1::AppendRequest* request,
                                                  headwise::v1::AppendResponse* response) {
  return Dispatch(
      "Append", ctx, *request, Lane::kInteractive,
      [this, request, response](const Tenant& t) { return DoAppend(t, *request, response); });
}

grpc::ServerUnaryReactor* HeadwiseService::Attend(grpc::CallbackServerContext* ctx,
                                                  const headwise::v1::AttendRequest* request,
                                                  headwise::v1::AttendResponse* response) {
  return Dispatch(
      "Attend", ctx, *request, Lane::kInteractive,
      [this, request, response](const Tenant& t) { return DoAttend(t, *request, response); });
}

grpc::ServerUnaryReactor* HeadwiseService::Prefill(grpc::CallbackServerContext* ctx,
                                                   const headwise::v1::PrefillRequest* request,
                                                   headwise::v1::PrefillResponse* response) {
  return Dispatch(
      "Prefill", ctx, *request, Lane::kBulk,
      [this, request, response](const Tenant& t) { return DoPrefill(t, *request, response); });
}

grpc::ServerUnaryReactor* HeadwiseService::DecodeStep(
    grpc::CallbackServerContext* ctx, const headwise::v1::DecodeStepRequest* request,
    headwise::v1::DecodeStepResponse* response) {
  return Dispatch("DecodeStep", ctx, *request, Lane::kInteractive,
                  [this, request, response](const Tenant& t) {
                    return DoDecodeStep(
                        t,
                        DecodeCall{request->handle(), request->layer(), request->q(), request->k(),
                                   request->v(), request->output(), request->step_id()},
                        response);
                  });
}

grpc::ServerUnaryReactor* HeadwiseService::DecodeStepBatch(
    grpc::CallbackServerContext* ctx, const headwise::v1::DecodeStepBatchRequest* request,
    headwise::v1::DecodeStepBatchResponse* response) {
  return Dispatch("DecodeStepBatch", ctx, *request, Lane::kBulk,
                  [this, request, response](const Tenant& t) {
                    return DoDecodeStepBatch(t, *request, response);
                  });
}

grpc::ServerUnaryReactor* HeadwiseService::Truncate(grpc::CallbackServerContext* ctx,
                                                    const headwise::v1::TruncateRequest* request,
                                                    headwise::v1::TruncateResponse*) {
  return Dispatch("Truncate", ctx, *request, Lane::kInteractive,
                  [this, request](const Tenant& t) { return DoTruncate(t, *request); });
}

grpc::ServerUnaryReactor* HeadwiseService::Release(grpc::CallbackServerContext* ctx,
                                                   const headwise::v1::ReleaseRequest* request,
                                                   headwise::v1::ReleaseResponse*) {
  return Dispatch("Release", ctx, *request, Lane::kInteractive,
                  [this, request](const Tenant& t) { return DoRelease(t, *request); });
}

grpc::ServerUnaryReactor* HeadwiseService::GetSequence(
    grpc::CallbackServerContext* ctx, const headwise::v1::GetSequenceRequest* request,
    headwise::v1::SequenceInfo* response) {
  return Dispatch("GetSequence", ctx, *request, Lane::kInteractive,
                  [this, request, response](const Tenant& t) {
                    return DoGetSequence(t, request->handle(), response);
                  });
}

grpc::ServerUnaryReactor* HeadwiseService::ListSequences(
    grpc::CallbackServerContext* ctx, const headwise::v1::ListSequencesRequest* request,
    headwise::v1::ListSequencesResponse* response) {
  return Dispatch("ListSequences", ctx, *request, Lane::kInteractive,
                  [this, response](const Tenant& t) { return DoListSequences(t, response); });
}

grpc::ServerUnaryReactor* HeadwiseService::OpenStaging(
    grpc::CallbackServerContext* ctx, const headwise::v1::OpenStagingRequest* request,
    headwise::v1::OpenStagingResponse* response) {
  return Dispatch(
      "OpenStaging", ctx, *request, Lane::kInteractive,
      [this, request, response](const Tenant& t) { return DoOpenStaging(t, *request, response); });
}

grpc::ServerUnaryReactor* HeadwiseService::CloseStaging(
    grpc::CallbackServerContext* ctx, const headwise::v1::CloseStagingRequest* request,
    headwise::v1::CloseStagingResponse*) {
  return Dispatch("CloseStaging", ctx, *request, Lane::kInteractive,
                  [this, request](const Tenant& t) {
                    return options_.staging->Close(t.name, request->region_id());
                  });
}

grpc::ServerUnaryReactor* HeadwiseService::Stats(grpc::CallbackServerContext* ctx,
                                                 const headwise::v1::StatsRequest* request,
                                                 headwise::v1::StatsResponse* response) {
  return Dispatch("Stats", ctx, *request, Lane::kInteractive,
                  [this, response](const Tenant& t) { return DoStats(t, response); });
}

grpc::ServerUnaryReactor* HeadwiseService::Health(grpc::CallbackServerContext* ctx,
                                                  const headwise::v1::HealthRequest*,
                                                  headwise::v1::HealthResponse* response) {
  // No engine work: answered on the gRPC thread, without the hand-off to the pool (the empty
  // call then costs what gRPC and authentication cost; bench/rpc_bench compares it with a bare
  // gRPC service).
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  const absl::Time start = absl::Now();
  absl::StatusOr<const Tenant*> tenant = Authenticate(ctx);
  if (tenant.ok()) {
    response->set_status("SERVING");
    response->set_version(options_.version);
  }
  const absl::Status status = tenant.status();
  Record("Health", tenant.ok() ? *tenant : nullptr, start, status);
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

}  // namespace headwise
