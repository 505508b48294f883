// HeadwiseService: authentication, dispatch to the worker pool, metrics, and the gRPC entry
// points of every unary RPC.
#include <string>
#include <utility>

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
    return DoDecodeStep(t,
                        DecodeCall{request->handle(), request->layer(), request->q(), request->k(),
                                   request->v(), request->output(), request->step_id()},
                        response);
  });
}

grpc::ServerUnaryReactor* HeadwiseService::DecodeStepBatch(
    grpc::CallbackServerContext* ctx, const headwise::v1::DecodeStepBatchRequest* request,
    headwise::v1::DecodeStepBatchResponse* response) {
  return Dispatch("DecodeStepBatch", ctx, [this, request, response](const Tenant& t) {
    return DoDecodeStepBatch(t, *request, response);
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
