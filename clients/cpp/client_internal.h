// Internals of the C++ client shared by its source files: the replaceable connection and the
// request/reply tensor helpers. Not part of the client's API.
#ifndef HEADWISE_CLIENTS_CPP_CLIENT_INTERNAL_H_
#define HEADWISE_CLIENTS_CPP_CLIENT_INTERNAL_H_

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "clients/cpp/client.h"
#include "grpcpp/grpcpp.h"
#include "headwise/v1/service.grpc.pb.h"

namespace headwise::client {

namespace v1 = ::headwise::v1;
using Stub = v1::Headwise::Stub;

namespace internal {

// The channel and stub, replaceable after UNAVAILABLE. Shared by the Client, its staging regions
// and its streams.
class Connection {
 public:
  Connection(const ClientOptions& options, std::string target)
      : options_(options), target_(std::move(target)) {
    absl::MutexLock lock(&mu_);
    NewChannelLocked();
  }

  const ClientOptions& options() const { return options_; }

  // The current stub and its generation (for Reset).
  std::pair<std::shared_ptr<Stub>, uint64_t> Current() {
    absl::MutexLock lock(&mu_);
    return {stub_, generation_};
  }

  // Replaces the channel unless another caller already replaced generation `seen`.
  void Reset(uint64_t seen) {
    absl::MutexLock lock(&mu_);
    if (seen == generation_) NewChannelLocked();
  }

  // Token metadata and, when `with_deadline`, the per-call deadline.
  void Prepare(grpc::ClientContext& context, bool with_deadline) const {
    context.AddMetadata("authorization", absl::StrCat("Bearer ", options_.token));
    if (with_deadline) {
      context.set_deadline(std::chrono::system_clock::now() +
                           absl::ToChronoMicroseconds(options_.deadline));
    }
  }

  // Runs `rpc(stub, context)` (a unary call). On UNAVAILABLE the channel is replaced and, when
  // `idempotent`, the call is retried with backoff until options.reconnect_deadline.
  template <typename Rpc>
  absl::Status Call(bool idempotent, Rpc rpc) {
    const absl::Time give_up = absl::Now() + options_.reconnect_deadline;
    absl::Duration backoff = options_.initial_backoff;
    while (true) {
      auto [stub, generation] = Current();
      grpc::ClientContext context;
      Prepare(context, /*with_deadline=*/true);
      const grpc::Status status = rpc(*stub, context);
      if (status.error_code() != grpc::StatusCode::UNAVAILABLE) return FromGrpcStatus(status);
      Reset(generation);
      if (!idempotent || absl::Now() + backoff > give_up) return FromGrpcStatus(status);
      absl::SleepFor(backoff);
      backoff = std::min(2 * backoff, options_.max_backoff);
    }
  }

 private:
  void NewChannelLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(options_.max_message_bytes);
    args.SetMaxSendMessageSize(options_.max_message_bytes);
    // A fresh channel per generation: a distinct arg keeps gRPC from handing back the old
    // subchannel (and its reconnect backoff) from its global pool.
    args.SetInt("headwise.channel_generation", static_cast<int>(generation_ + 1));
    std::shared_ptr<grpc::ChannelCredentials> credentials;
    if (options_.use_tls) {
      grpc::SslCredentialsOptions ssl;
      ssl.pem_root_certs = options_.tls_root_certs_pem;
      credentials = grpc::SslCredentials(ssl);
    } else {
      credentials = grpc::InsecureChannelCredentials();
    }
    std::shared_ptr<grpc::Channel> channel = grpc::CreateCustomChannel(target_, credentials, args);
    stub_ = std::shared_ptr<Stub>(v1::Headwise::NewStub(channel));
    ++generation_;
  }

  const ClientOptions options_;
  const std::string target_;
  absl::Mutex mu_;
  std::shared_ptr<Stub> stub_ ABSL_GUARDED_BY(mu_);
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
};

// NormalizeTarget: "unix://rel", "unix:rel" -> "unix:///abs/rel"; TCP targets unchanged.
std::string NormalizeTarget(const std::string& target);

// Request tensors: inline bytes or a staged range, with dtype and shape.
void SetInline(v1::Tensor* tensor, v1::DTypeProto dtype, std::initializer_list<int64_t> shape,
               const void* data, size_t bytes);
void SetStaged(v1::Tensor* tensor, v1::DTypeProto dtype, std::initializer_list<int64_t> shape,
               const StagingRegion& region, uint64_t offset, uint64_t length);
uint64_t KvBytes(const ModelLayout& layout, int num_tokens);
uint64_t QBytes(const ModelLayout& layout);
void SetQInline(v1::Tensor* tensor, const ModelLayout& layout, absl::Span<const float> q);
void SetKvInline(v1::Tensor* tensor, const ModelLayout& layout, absl::Span<const std::byte> data,
                 int num_tokens);
void SetKvStaged(v1::Tensor* tensor, const ModelLayout& layout, const StagingRegion& region,
                 uint64_t offset, int num_tokens);
void SetOutput(v1::OutputPlacement* output, const StagingRegion& region, uint64_t offset);

// Reply tensors. INTERNAL when the daemon answered with something else (a placed output where
// an inline one was expected, or a size that is not whole floats).
absl::StatusOr<std::vector<float>> InlineFloats(const v1::Tensor& tensor, const char* what);
absl::StatusOr<AttendOutput> InlineOutput(const v1::Tensor& o, const v1::Tensor& lse,
                                          int64_t layer_length);
absl::StatusOr<StagedOutput> StagedOutputOf(const v1::Tensor& o, const v1::Tensor& lse,
                                            int64_t layer_length);

}  // namespace internal

}  // namespace headwise::client

#endif  // HEADWISE_CLIENTS_CPP_CLIENT_INTERNAL_H_
