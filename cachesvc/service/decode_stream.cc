// HeadwiseService::DecodeStreamReactor: the DecodeStream bidi reactor. One step at a time per
// stream: read, run the step on the worker pool, write its answer, read the next. The reactor
// never blocks a gRPC thread.
#include <string>
#include <utility>

#include "cachesvc/service/headwise_service.h"

namespace headwise {

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
    FairScheduler::Job job;
    job.tenant = tenant_;
    job.lane = request_.ByteSizeLong() > static_cast<size_t>(kInteractiveBytes)
                   ? Lane::kBulk
                   : Lane::kInteractive;
    job.bytes = static_cast<int64_t>(request_.ByteSizeLong());
    SetTenantLimits(*tenant_, job);
    job.run = [this] { Step(); };
    job.drop = [this](absl::Status status) { Refuse(status); };
    absl::StatusOr<FairScheduler::JobId> id = service_->scheduler_->Submit(std::move(job));
    if (!id.ok()) Refuse(id.status());
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
            : service_->DoDecodeStep(
                  *tenant_,
                  DecodeCall{handle_, request_.layer(), request_.q(), request_.k(), request_.v(),
                             request_.output(), request_.step_id()},
                  &response_);
    service_->Record("DecodeStream", tenant_, start, status);
    if (!status.ok()) {
      Finish(ToGrpcStatus(status));
      return;
    }
    StartWrite(&response_);
  }

  void Refuse(const absl::Status& status) {
    service_->Record("DecodeStream", tenant_, absl::Now(), status);
    Finish(ToGrpcStatus(status));
  }

  HeadwiseService* const service_;
  const Tenant* tenant_ = nullptr;
  std::string handle_;
  headwise::v1::StreamStepRequest request_;
  headwise::v1::DecodeStepResponse response_;
};

grpc::ServerBidiReactor<headwise::v1::StreamStepRequest, headwise::v1::DecodeStepResponse>*
HeadwiseService::DecodeStream(grpc::CallbackServerContext* ctx) {
  return new DecodeStreamReactor(this, Authenticate(ctx));
}

}  // namespace headwise
