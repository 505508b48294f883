// headwise::client: a typed C++ API over the Headwise gRPC service (proto/headwise/v1/
// service.proto), as served by `headwised`. Every call returns absl::Status or absl::StatusOr;
// the daemon's grpc::Status maps onto absl::Status code for code, message unchanged (the two
// code enums have the same values). docs/client.md walks through it with the example program
// clients/cpp/examples/quickstart.cc.
//
//   ASSIGN_OR_RETURN(std::unique_ptr<Client> client, Client::Connect({.target = "unix:///..."}));
//   RETURN_IF_ERROR(client->RegisterLayout("llama3-8b", layout));
//   ASSIGN_OR_RETURN(Sequence seq, client->CreateSequence("llama3-8b", PolicySpec(), false));
//   RETURN_IF_ERROR(client->Append(seq, 0, k_bytes, v_bytes, num_tokens));
//   ASSIGN_OR_RETURN(AttendOutput out, client->Attend(seq, 0, q));
//
// Payloads. Inline overloads copy tensors into the protobuf request. For large tensors, open a
// StagingRegion (POSIX shared memory the daemon creates and the client maps), write the tensor
// into it and pass offsets instead: the request then carries only (region, offset, length).
//
// Reconnect. When a call fails with UNAVAILABLE (daemon restarting, socket gone), the client
// replaces its channel (so gRPC's own reconnect backoff, up to two minutes, does not apply) and
// retries the call with exponential backoff until ClientOptions::reconnect_deadline, but only
// for calls that are safe to repeat: Health, Stats, GetSequence, ListSequences, Attend (inline
// or staged with output inline), and Append, Prefill, DecodeStep and DecodeStepBatch when they
// carry a step id. A step id (ClientOptions::step_ids, on by default, or one the caller passes)
// makes the daemon answer a retry of a step it already applied with the first answer instead of
// appending again (proto/headwise/v1/service.proto, "Step ids"). Calls without one, and Create,
// Fork, Truncate, Release, RegisterLayout and staging, are sent once: on UNAVAILABLE the caller
// cannot know whether the daemon applied them, and must decide (GetSequence tells the lengths).
// The channel is replaced for them too, so the next call goes to a fresh connection.
//
// Thread-safety: Client is thread-safe; any number of threads may share one Client (each call
// is an independent RPC). A StagingRegion's memory is plain shared memory: the caller orders its
// own writes before the call that reads them and must not let two in-flight calls write the same
// output range. A DecodeStream is used by one thread at a time.
#ifndef HEADWISE_CLIENTS_CPP_CLIENT_H_
#define HEADWISE_CLIENTS_CPP_CLIENT_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "cachesvc/base/dtype.h"
#include "cachesvc/base/layout.h"
#include "headwise/v1/policy.pb.h"
#include "headwise/v1/service.pb.h"

namespace grpc {
class Status;
}  // namespace grpc

namespace headwise::client {

// The same code and message. grpc::StatusCode and absl::StatusCode share their values.
absl::Status FromGrpcStatus(const grpc::Status& status);

// Default target: the daemon's default socket, relative to the working directory.
inline constexpr char kDefaultTarget[] = "unix://./var/headwised.sock";
// Default token: the daemon's embedded development tenant.
inline constexpr char kDefaultToken[] = "dev-token";

struct ClientOptions {
  // Where the daemon listens: "unix:///abs/path.sock", "unix://rel/path.sock" or
  // "unix:rel/path.sock" (relative paths are resolved against the working directory at Connect),
  // or "host:port" for TCP. Default: kDefaultTarget.
  std::string target = kDefaultTarget;
  // Bearer token sent as `authorization: Bearer <token>` on every call. Default: kDefaultToken.
  std::string token = kDefaultToken;
  // TLS for TCP targets. False: plaintext (the unix socket, or a loopback port). Default: false.
  bool use_tls = false;
  // PEM root certificates for TLS; empty: the system's roots. Default: empty.
  std::string tls_root_certs_pem;
  // Deadline of each unary call (each attempt of a retried one), and of Connect's first Health
  // call. Default: 30 s.
  absl::Duration deadline = absl::Seconds(30);
  // Largest message sent or received. Inline tensors must fit; stage larger ones. Default: 64 MiB.
  int max_message_bytes = 64 << 20;
  // Total time an idempotent call keeps retrying on UNAVAILABLE (0: no retry). Default: 10 s.
  absl::Duration reconnect_deadline = absl::Seconds(10);
  // First retry delay; doubles up to max_backoff. Default: 20 ms and 1 s.
  absl::Duration initial_backoff = absl::Milliseconds(20);
  absl::Duration max_backoff = absl::Seconds(1);
  // Connect calls Health (with the reconnect retries) and fails when it fails. Default: true.
  bool check_health = true;
  // Append, Prefill, DecodeStep and DecodeStepBatch items the caller passes no step id (0) for
  // get a fresh one from the client (unique per client), and are retried on UNAVAILABLE like
  // the read-only calls. False: no id is sent for them and they are sent once. Default: true.
  bool step_ids = true;
};

// The bytes of one layer's K (or V) of `num_tokens` tokens, and of a staged AppendLayers payload
// (K and V of every layer).
inline uint64_t LayerKvBytes(const ModelLayout& layout, int num_tokens) {
  return static_cast<uint64_t>(num_tokens) * layout.num_kv_heads * layout.head_dim *
         DTypeSize(layout.dtype);
}
inline uint64_t StagedLayersBytes(const ModelLayout& layout, int num_tokens) {
  return 2 * static_cast<uint64_t>(layout.num_layers) * LayerKvBytes(layout, num_tokens);
}

// A sequence handle: the daemon's 32-hex-digit handle plus the layout it was created with (the
// client needs the layout to describe tensor shapes). A small value type; copying it does not
// copy the sequence (use Client::Fork for that). A handle obtained elsewhere (another process,
// ListSequences) is wrapped with the constructor.
class Sequence {
 public:
  Sequence() = default;
  Sequence(std::string handle, const ModelLayout& layout)
      : handle_(std::move(handle)), layout_(layout) {}
  const std::string& handle() const { return handle_; }
  const ModelLayout& layout() const { return layout_; }
  friend bool operator==(const Sequence& a, const Sequence& b) { return a.handle_ == b.handle_; }

 private:
  std::string handle_;
  ModelLayout layout_;
};

// Outputs of Attend / Prefill / DecodeStep, inline: o is [rows][num_q_heads][head_dim] and lse
// [rows][num_q_heads] (rows = 1 for Attend and DecodeStep, T for Prefill), f32, natural log.
struct AttendOutput {
  std::vector<float> o;
  std::vector<float> lse;
  // DecodeStep only: tokens held by the layer after the step's append.
  int64_t layer_length = 0;
};

// Outputs written into a staging region: byte offsets of o and lse (o first, lse right after).
struct StagedOutput {
  uint64_t o_offset = 0;
  uint64_t lse_offset = 0;
  // DecodeStep only: tokens held by the layer after the step's append.
  int64_t layer_length = 0;
};

namespace internal {
class Connection;
}  // namespace internal

class Client;

// A shared-memory staging region opened by the daemon (OpenStaging) and mapped read-write into
// this process. Destroying it unmaps it and closes it on the daemon (best effort; the daemon
// also closes a tenant's regions it no longer needs, see docs/daemon.md). Move-only. It keeps
// the connection alive, so it may outlive the Client that opened it.
class StagingRegion {
 public:
  StagingRegion(StagingRegion&& other) noexcept;
  StagingRegion& operator=(StagingRegion&& other) noexcept;
  StagingRegion(const StagingRegion&) = delete;
  StagingRegion& operator=(const StagingRegion&) = delete;
  ~StagingRegion();

  // The daemon's region id (what requests name) and its /dev/shm name.
  const std::string& id() const { return id_; }
  const std::string& shm_name() const { return shm_name_; }
  // The mapped bytes. Valid until Close() or destruction.
  std::byte* data() const { return data_; }
  uint64_t size() const { return size_; }
  absl::Span<std::byte> bytes() const { return absl::Span<std::byte>(data_, size_); }
  // A typed view of `count` elements at byte `offset` (which the caller keeps aligned to T).
  // REQUIRES: offset + count * sizeof(T) <= size().
  template <typename T>
  absl::Span<T> As(uint64_t offset, size_t count) const {
    return absl::Span<T>(reinterpret_cast<T*>(data_ + offset), count);
  }

  // Unmaps and calls CloseStaging. Idempotent; returns CloseStaging's status the first time.
  absl::Status Close();

 private:
  friend class Client;
  StagingRegion(std::shared_ptr<internal::Connection> connection, std::string id,
                std::string shm_name, std::byte* data, uint64_t size);

  std::shared_ptr<internal::Connection> connection_;
  std::string id_;
  std::string shm_name_;
  std::byte* data_ = nullptr;
  uint64_t size_ = 0;
};

// A bidirectional DecodeStream: one Step per layer of one sequence, each answered before the
// next is sent (synchronous). The first error ends the stream; every later Step returns it.
// Destroying an unfinished stream cancels it. One thread at a time.
class DecodeStream {
 public:
  ~DecodeStream();
  DecodeStream(const DecodeStream&) = delete;
  DecodeStream& operator=(const DecodeStream&) = delete;

  // Appends the token's k, v ([1][num_kv_heads][head_dim], layout dtype) to `layer` and attends
  // q ([num_q_heads][head_dim] f32) over the layer, like Client::DecodeStep.
  absl::StatusOr<AttendOutput> Step(int layer, absl::Span<const float> q,
                                    absl::Span<const std::byte> k, absl::Span<const std::byte> v);
  // The same with q, k, v read from `region` at the given offsets and o, lse written at
  // out_offset.
  absl::StatusOr<StagedOutput> Step(int layer, const StagingRegion& region, uint64_t q_offset,
                                    uint64_t k_offset, uint64_t v_offset, uint64_t out_offset);
  // Half-closes the stream and returns its final status (OK when every step succeeded).
  absl::Status Finish();

 private:
  friend class Client;
  struct State;
  explicit DecodeStream(std::unique_ptr<State> state);
  absl::StatusOr<headwise::v1::DecodeStepResponse> RoundTrip(headwise::v1::StreamStepRequest&);
  std::unique_ptr<State> state_;
};

class Client {
 public:
  // Creates the channel and, when options.check_health, calls Health. INVALID_ARGUMENT for an
  // empty target or token, a max_message_bytes < 1 KiB; otherwise Health's status.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(const ClientOptions& options);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  const ClientOptions& options() const { return options_; }

  // Layouts (per tenant). Re-registering the same layout is OK; a different one under the same
  // name is ALREADY_EXISTS. The client remembers the layouts it registered so CreateSequence can
  // attach them to the Sequence; FAILED_PRECONDITION from CreateSequence for a layout name this
  // client did not register (use the overload taking the layout).
  absl::Status RegisterLayout(const std::string& name, const ModelLayout& layout);

  // A new empty sequence. `durable`: acknowledged appends survive a daemon crash.
  absl::StatusOr<Sequence> CreateSequence(const std::string& layout_name,
                                          const headwise::v1::PolicySpec& policy, bool durable);
  absl::StatusOr<Sequence> CreateSequence(const std::string& layout_name, const ModelLayout& layout,
                                          const headwise::v1::PolicySpec& policy, bool durable);

  // Appends `num_tokens` tokens to `layer`: k, v are [num_tokens][num_kv_heads][head_dim] in the
  // layout's dtype. Returns the layer's length after the append. The daemon validates sizes and
  // the append rule (docs: cachesvc/engine.h); nothing is checked here.
  //
  // `step_id` (here and in Prefill, DecodeStep, DecodeStepBatch): the client step id of the call;
  // 0 lets the client pick one (ClientOptions::step_ids). Reusing an id on purpose resends a step
  // whose answer was lost: the daemon answers it without appending again.
  absl::StatusOr<int64_t> Append(const Sequence& seq, int layer, absl::Span<const std::byte> k,
                                 absl::Span<const std::byte> v, int num_tokens,
                                 uint64_t step_id = 0);
  // The same with k and v already written into `region` at k_offset and v_offset.
  absl::StatusOr<int64_t> Append(const Sequence& seq, int layer, const StagingRegion& region,
                                 uint64_t k_offset, uint64_t v_offset, int num_tokens,
                                 uint64_t step_id = 0);

  // Appends `num_tokens` tokens to EVERY layer in one call (AppendLayers in service.proto):
  // k[l], v[l] are layer l's [num_tokens][num_kv_heads][head_dim] bytes in the layout dtype
  // (exactly num_layers of each). One step of the append rule on every layer, all or nothing
  // across layers: a refusal leaves every layer as it was. FAILED_PRECONDITION while a step is in
  // progress (layers at different lengths). Returns the sequence length after the call.
  absl::StatusOr<int64_t> AppendLayers(const Sequence& seq,
                                       absl::Span<const absl::Span<const std::byte>> k,
                                       absl::Span<const absl::Span<const std::byte>> v,
                                       int num_tokens, uint64_t step_id = 0);
  // The same with every layer's K and V already written into `region` from `offset`,
  // layer-major: K of layer 0, V of layer 0, K of layer 1, ... (StagedLayersBytes in all; layer
  // l's K at offset + 2 * l * KvBytes and its V right after it).
  absl::StatusOr<int64_t> AppendLayers(const Sequence& seq, const StagingRegion& region,
                                       uint64_t offset, int num_tokens, uint64_t step_id = 0);

  // Decode attention of q ([num_q_heads][head_dim] f32) over the layer's cached tokens.
  absl::StatusOr<AttendOutput> Attend(const Sequence& seq, int layer, absl::Span<const float> q);
  // The same with q read from `region` at q_offset and o, lse written at out_offset.
  absl::StatusOr<StagedOutput> Attend(const Sequence& seq, int layer, const StagingRegion& region,
                                      uint64_t q_offset, uint64_t out_offset);

  // Chunked causal prefill of num_tokens tokens: q [T][num_q_heads][head_dim] f32, k, v
  // [T][num_kv_heads][head_dim]; o [T][num_q_heads][head_dim], lse [T][num_q_heads]. A retry
  // whose outputs the daemon did not keep (over 64 KiB, or after a restart) is ALREADY_EXISTS:
  // the chunk was applied.
  absl::StatusOr<AttendOutput> Prefill(const Sequence& seq, int layer, absl::Span<const float> q,
                                       absl::Span<const std::byte> k, absl::Span<const std::byte> v,
                                       int num_tokens, uint64_t step_id = 0);

  // One fused decode step of one layer: append the token's k, v ([1][num_kv_heads][head_dim]),
  // then attend q over the layer including it. All-or-nothing: refused, it changes nothing.
  absl::StatusOr<AttendOutput> DecodeStep(const Sequence& seq, int layer, absl::Span<const float> q,
                                          absl::Span<const std::byte> k,
                                          absl::Span<const std::byte> v, uint64_t step_id = 0);
  absl::StatusOr<StagedOutput> DecodeStep(const Sequence& seq, int layer,
                                          const StagingRegion& region, uint64_t q_offset,
                                          uint64_t k_offset, uint64_t v_offset, uint64_t out_offset,
                                          uint64_t step_id = 0);

  // One layer's decode step for many sequences of this tenant in one RPC (at most
  // kMaxDecodeBatchItems; distinct sequences). Each item is an independent DecodeStep: the
  // outer status is the RPC's (INVALID_ARGUMENT for too many items or a repeated sequence,
  // nothing done), the inner one each item's (e.g. NOT_FOUND for a sequence not of this
  // tenant), and the results equal one DecodeStep per item. Inputs and outputs inline.
  struct DecodeBatchItem {
    Sequence seq;
    absl::Span<const float> q;      // [num_q_heads][head_dim] f32
    absl::Span<const std::byte> k;  // [1][num_kv_heads][head_dim], layout dtype
    absl::Span<const std::byte> v;
    uint64_t step_id = 0;  // 0: the client picks one (ClientOptions::step_ids).
  };
  static constexpr int kMaxDecodeBatchItems = 256;
  absl::StatusOr<std::vector<absl::StatusOr<AttendOutput>>> DecodeStepBatch(
      int layer, absl::Span<const DecodeBatchItem> items);

  // Opens a DecodeStream for `seq`. The stream has no deadline.
  absl::StatusOr<std::unique_ptr<DecodeStream>> OpenDecodeStream(const Sequence& seq);

  // Copy-on-write fork; truncate to `length` tokens; release (the handle is NOT_FOUND after).
  absl::StatusOr<Sequence> Fork(const Sequence& seq);
  absl::Status Truncate(const Sequence& seq, int64_t length);
  absl::Status Release(const Sequence& seq);

  absl::StatusOr<headwise::v1::SequenceInfo> GetSequence(const Sequence& seq);
  // Every sequence of the caller's tenant.
  absl::StatusOr<std::vector<headwise::v1::SequenceInfo>> ListSequences();

  // A shared-memory region of `size` bytes, mapped. INTERNAL when the mapping fails (the
  // daemon must run on this host).
  absl::StatusOr<StagingRegion> OpenStaging(uint64_t size);

  absl::StatusOr<headwise::v1::StatsResponse> Stats();
  absl::StatusOr<headwise::v1::HealthResponse> Health();

 private:
  Client(const ClientOptions& options, std::shared_ptr<internal::Connection> connection);
  // `requested` when non-zero; else a fresh id when options_.step_ids; else 0 (none).
  uint64_t StepId(uint64_t requested);
  // Sets the step id and sends one AppendLayers request.
  absl::StatusOr<int64_t> SendAppendLayers(headwise::v1::AppendLayersRequest& request,
                                           uint64_t step_id);

  const ClientOptions options_;
  std::atomic<uint64_t> next_step_id_;
  std::shared_ptr<internal::Connection> connection_;
  struct Layouts;
  std::unique_ptr<Layouts> layouts_;
};

// Converts between the layout struct and its wire form.
headwise::v1::ModelLayoutProto ToProto(const ModelLayout& layout);
headwise::v1::DTypeProto ToProto(DType dtype);

}  // namespace headwise::client

#endif  // HEADWISE_CLIENTS_CPP_CLIENT_H_
