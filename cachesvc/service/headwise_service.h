// HeadwiseService: the gRPC callback service of proto/headwise/v1/service.proto over an Engine.
//
// Threading: every RPC method runs on a gRPC thread and only authenticates (a constant-time
// token compare) and submits the request to the FairScheduler (scheduler.h: per-tenant
// admission, an interactive and a bulk lane, tenants in turn); a worker does the engine work and
// finishes the reactor (Health, which does no engine work, is answered on the gRPC thread). A
// call the scheduler refuses is RESOURCE_EXHAUSTED; a queued call whose client cancels (or whose
// deadline passes) leaves the queue at once; a running one stops its prefill between chunks.
// DecodeStream runs one step at a time per stream: read, work on the pool, write, read again.
//
// Tenancy: a tenant is authenticated from the `authorization: Bearer <token>` metadata of every
// call. Layout names, sequence handles and staging regions are scoped to their tenant; another
// tenant's handle is NOT_FOUND, exactly like one that never existed. Stats shows a tenant its own
// figures only, unless the tenant is an admin (TenantConfig.admin).
//
// Quotas: an append reserves its worst case (whole pages) in the tenant's TierLedger before any
// work and settles to what the engine holds after it, so concurrent appends cannot together pass
// a quota (tenants.h).
//
// Handles: 32 lowercase hex digits drawn from a 128-bit random source, mapped to the engine's
// SequenceId inside the service (a restored durable sequence keeps its handle but gets a new
// engine id).
//
// Durability: see durable_log.h. Ops on one sequence are serialized by the sequence's lock, so
// the log order is the engine order. A mutation is logged (fsynced) before its engine call and
// removed from the log again when the engine refuses it, so a refused call is never replayed.
//
// A refused call changes nothing: every data RPC validates its inputs, resolves and pins (holds a
// reference to) each staging region it reads or writes, reserves its quota and only then makes ONE
// engine call, which is all-or-nothing (a decode step is Engine::DecodeStep, not Append +
// Attend). Writing the outputs afterwards cannot fail. Client step ids make retries idempotent
// (step_ledger.h, service.proto).
//
// Locks: a sequence's lock is held across its log write and engine call (that is the ordering
// guarantee). The tenant lock (TenantState::mu) is never held across a disk write or an engine
// call: RegisterLayout reserves the name under it, writes outside, and commits under it again.
// Lock order: sequence locks (in handle order when a batch takes several), then a tenant lock,
// then a shard lock; the engine's own locks are inner to all of them. A tenant's ledger lock
// (TierLedger) is a leaf: nothing else is taken under it.
//
// Files: headwise_service.cc (plumbing, sequence lifecycle, gRPC entry points), service_steps.cc
// (Append, Attend, Prefill, DecodeStep), service_bulk.cc (AppendLayers), service_batch.cc
// (DecodeStepBatch), service_restore.cc (Restore), decode_stream.cc (the DecodeStream reactor),
// tensor_io.h (validation and I/O).
#ifndef HEADWISE_CACHESVC_SERVICE_HEADWISE_SERVICE_H_
#define HEADWISE_CACHESVC_SERVICE_HEADWISE_SERVICE_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/functional/function_ref.h"
#include "absl/random/random.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cachesvc/engine.h"
#include "cachesvc/prefix/prefix_cache.h"
#include "cachesvc/prefix/sequence_tokens.h"
#include "cachesvc/service/durable_log.h"
#include "cachesvc/service/metrics.h"
#include "cachesvc/service/scheduler.h"
#include "cachesvc/service/staging.h"
#include "cachesvc/service/step_ledger.h"
#include "cachesvc/service/tenants.h"
#include "cachesvc/service/tensor_io.h"
#include "headwise/v1/service.grpc.pb.h"

namespace headwise {

// absl::Status -> grpc::Status; the codes are the same numbers.
grpc::Status ToGrpcStatus(const absl::Status& status);

// Copies the tenant's own admission limits (TenantQuota.max_calls, max_queued_bytes) into `job`.
void SetTenantLimits(const Tenant& tenant, FairScheduler::Job& job);

// "OK", "NOT_FOUND", ... (the gRPC code names, for metrics and logs).
std::string StatusCodeName(absl::StatusCode code);

// Most items of one DecodeStepBatch call.
inline constexpr int kMaxDecodeBatchItems = 256;

struct HeadwiseServiceOptions {
  // Not owned; must outlive the service. Required.
  Engine* engine = nullptr;
  const TenantRegistry* tenants = nullptr;
  StagingRegistry* staging = nullptr;
  ServiceMetrics* metrics = nullptr;
  // Where durable sequences are logged. nullptr: CreateSequence(durable) is
  // FAILED_PRECONDITION. Default: nullptr.
  DurableLog* durable_log = nullptr;
  // Threads of the worker pool. Default: 4.
  int worker_threads = 4;
  // Admission control in front of the workers (scheduler.h).
  AdmissionLimits admission;
  // Most tokens one Prefill call may carry (its cost is tokens x context). Default: 32768.
  int64_t max_prefill_tokens_per_call = 32768;
  // Most tokens one Append or AppendLayers call may carry. Default: 65536.
  int64_t max_append_tokens_per_call = 65536;
  // Prefix reuse (docs/scale-out.md); not owned. nullptr: token ids are validated and recorded
  // but nothing is cached. Default: nullptr.
  PrefixCache* prefix_cache = nullptr;
  // Pages per prefix block (a block is this many times the layout's page_tokens). Default: 4.
  int prefix_block_pages = 4;
  // tenant name -> the scope its prefix blocks are hashed under (PrefixScopes); a tenant not
  // listed shares only with itself. Default: empty.
  absl::flat_hash_map<std::string, std::string> prefix_scopes;
  // Reported by Health. Default: "0.1.0".
  std::string version = "0.1.0";
};

class HeadwiseService final : public headwise::v1::Headwise::CallbackService {
 public:
  // REQUIRES: every pointer in `options` except durable_log is non-null.
  explicit HeadwiseService(const HeadwiseServiceOptions& options);
  // REQUIRES: the gRPC server has shut down (no call in flight). Joins the workers.
  ~HeadwiseService() override;

  // Re-creates every durable sequence (and registered layout) from the log: same handles, same
  // tenants, ops replayed in order. Call once, before serving. A sequence whose tenant is no
  // longer configured, or whose replay fails, is skipped with an error log (its records stay on
  // disk). Returns the number of sequences restored.
  absl::StatusOr<int> Restore();

  // Live sequences over all tenants.
  int64_t num_sequences() const;

  // The scheduler's queue depths and admission counters (metrics).
  FairScheduler::Counters scheduler_counters() const { return scheduler_->counters(); }

  // Test seam (a sync point): while set, every data RPC that returns outputs (Attend, Prefill,
  // DecodeStep, a DecodeStream step, DecodeStepBatch) calls `hook` with the RPC's name after its
  // engine call and before it writes its outputs, holding no lock. Process-wide; nullptr clears
  // it. Not for production use.
  static void SetBeforeOutputsHookForTesting(std::function<void(std::string_view)> hook);

  // The unary methods of service.proto. Each authenticates, then runs on the worker pool.
  grpc::ServerUnaryReactor* RegisterLayout(grpc::CallbackServerContext* ctx,
                                           const headwise::v1::RegisterLayoutRequest* request,
                                           headwise::v1::RegisterLayoutResponse* response) override;
  grpc::ServerUnaryReactor* CreateSequence(grpc::CallbackServerContext* ctx,
                                           const headwise::v1::CreateSequenceRequest* request,
                                           headwise::v1::CreateSequenceResponse* response) override;
  grpc::ServerUnaryReactor* Fork(grpc::CallbackServerContext* ctx,
                                 const headwise::v1::ForkRequest* request,
                                 headwise::v1::ForkResponse* response) override;
  grpc::ServerUnaryReactor* Append(grpc::CallbackServerContext* ctx,
                                   const headwise::v1::AppendRequest* request,
                                   headwise::v1::AppendResponse* response) override;
  grpc::ServerUnaryReactor* AppendLayers(grpc::CallbackServerContext* ctx,
                                         const headwise::v1::AppendLayersRequest* request,
                                         headwise::v1::AppendLayersResponse* response) override;
  grpc::ServerUnaryReactor* Attend(grpc::CallbackServerContext* ctx,
                                   const headwise::v1::AttendRequest* request,
                                   headwise::v1::AttendResponse* response) override;
  grpc::ServerUnaryReactor* Prefill(grpc::CallbackServerContext* ctx,
                                    const headwise::v1::PrefillRequest* request,
                                    headwise::v1::PrefillResponse* response) override;
  grpc::ServerUnaryReactor* DecodeStep(grpc::CallbackServerContext* ctx,
                                       const headwise::v1::DecodeStepRequest* request,
                                       headwise::v1::DecodeStepResponse* response) override;
  grpc::ServerUnaryReactor* DecodeStepBatch(
      grpc::CallbackServerContext* ctx, const headwise::v1::DecodeStepBatchRequest* request,
      headwise::v1::DecodeStepBatchResponse* response) override;
  grpc::ServerUnaryReactor* Truncate(grpc::CallbackServerContext* ctx,
                                     const headwise::v1::TruncateRequest* request,
                                     headwise::v1::TruncateResponse* response) override;
  grpc::ServerUnaryReactor* Release(grpc::CallbackServerContext* ctx,
                                    const headwise::v1::ReleaseRequest* request,
                                    headwise::v1::ReleaseResponse* response) override;
  grpc::ServerUnaryReactor* GetSequence(grpc::CallbackServerContext* ctx,
                                        const headwise::v1::GetSequenceRequest* request,
                                        headwise::v1::SequenceInfo* response) override;
  grpc::ServerUnaryReactor* ListSequences(grpc::CallbackServerContext* ctx,
                                          const headwise::v1::ListSequencesRequest* request,
                                          headwise::v1::ListSequencesResponse* response) override;
  grpc::ServerUnaryReactor* OpenStaging(grpc::CallbackServerContext* ctx,
                                        const headwise::v1::OpenStagingRequest* request,
                                        headwise::v1::OpenStagingResponse* response) override;
  grpc::ServerUnaryReactor* CloseStaging(grpc::CallbackServerContext* ctx,
                                         const headwise::v1::CloseStagingRequest* request,
                                         headwise::v1::CloseStagingResponse* response) override;
  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* ctx,
                                  const headwise::v1::StatsRequest* request,
                                  headwise::v1::StatsResponse* response) override;
  grpc::ServerUnaryReactor* Health(grpc::CallbackServerContext* ctx,
                                   const headwise::v1::HealthRequest* request,
                                   headwise::v1::HealthResponse* response) override;
  grpc::ServerBidiReactor<headwise::v1::StreamStepRequest, headwise::v1::DecodeStepResponse>*
  DecodeStream(grpc::CallbackServerContext* ctx) override;

 private:
  class DecodeStreamReactor;
  class UnaryCall;

  // One live sequence as the service sees it.
  struct SequenceEntry {
    std::string handle;
    const Tenant* tenant = nullptr;
    std::string layout_name;  // The tenant's name for the layout.
    ModelLayout layout;
    bool durable = false;
    // New pages land in the device tier (DEVICE_ONLY) or the host tier (offload placements);
    // used to check tier quotas before an append.
    Tier append_tier = Tier::kDevice;
    // Serializes every op on the sequence (engine call plus its log write, in that order).
    absl::Mutex mu;
    SequenceId engine_id ABSL_GUARDED_BY(mu);
    bool released ABSL_GUARDED_BY(mu) = false;
    uint32_t next_op ABSL_GUARDED_BY(mu) = 0;
    // Bytes and pages per tier at the end of the last op (what this sequence adds to its
    // tenant's usage).
    std::array<int64_t, 3> tier_bytes ABSL_GUARDED_BY(mu) = {0, 0, 0};
    std::array<int64_t, 3> tier_pages ABSL_GUARDED_BY(mu) = {0, 0, 0};
    // The last client step per layer (idempotent retries).
    StepLedger steps ABSL_GUARDED_BY(mu);
    // Prefix reuse: the token ids the client sent, and the blocks its CreateSequence reused
    // (PrefixCache::Publish's `touched`).
    SequenceTokens tokens ABSL_GUARDED_BY(mu);
    int64_t prefix_touched ABSL_GUARDED_BY(mu) = 0;
  };

  // Per-tenant state.
  struct TenantState {
    explicit TenantState(const Tenant& tenant) : usage(tenant.quota) {}
    absl::Mutex mu;
    absl::flat_hash_map<std::string, ModelLayout> layouts ABSL_GUARDED_BY(mu);
    // Layout names being registered (engine call and log write in progress, outside mu).
    absl::flat_hash_set<std::string> registering ABSL_GUARDED_BY(mu);
    int64_t sequences ABSL_GUARDED_BY(mu) = 0;
    // Sums of tier_bytes and tier_pages over the tenant's live sequences, and the bytes reserved
    // by appends in flight (its own lock; never taken with mu held).
    TierLedger usage;
  };

  static constexpr int kNumShards = 16;
  struct Shard {
    mutable absl::Mutex mu;
    absl::flat_hash_map<std::string, std::shared_ptr<SequenceEntry>> sequences ABSL_GUARDED_BY(mu);
  };

  // The fields of one decode step, from a DecodeStepRequest, a StreamStepRequest or a batch item.
  struct DecodeCall {
    const std::string& handle;
    int layer;
    const headwise::v1::Tensor& q;
    const headwise::v1::Tensor& k;
    const headwise::v1::Tensor& v;
    const headwise::v1::OutputPlacement& output;
    uint64_t step_id;
  };
  // A decode step whose every input is validated and whose staging regions are pinned.
  struct PreparedDecode {
    std::shared_ptr<SequenceEntry> entry;
    int layer = 0;
    uint64_t step_id = 0;
    InputBytes k, v;
    std::vector<float> q;
    std::optional<OutputTarget> out;
    std::vector<float> o, lse;  // Sized for the outputs.
    int64_t layer_length = 0;
  };
  struct BatchSlot;
  class BatchLocks;

  // Authenticates from metadata, then runs `work` on the pool and finishes the reactor with its
  // status; records metrics and logs errors.
  // `lane` is the RPC's lane; a request over kInteractiveBytes is bulk whatever its RPC.
  grpc::ServerUnaryReactor* Dispatch(const char* rpc, grpc::CallbackServerContext* ctx,
                                     const google::protobuf::Message& request, Lane lane,
                                     std::function<absl::Status(const Tenant&)> work);
  absl::StatusOr<const Tenant*> Authenticate(grpc::CallbackServerContext* ctx) const;
  void Record(const char* rpc, const Tenant* tenant, absl::Time start,
              const absl::Status& status) const;

  Shard& ShardFor(const std::string& handle);
  // The tenant's live entry, or NOT_FOUND (unknown, released, malformed, or another tenant's).
  absl::StatusOr<std::shared_ptr<SequenceEntry>> FindSequence(const Tenant& tenant,
                                                              const std::string& handle);
  TenantState& StateOf(const Tenant& tenant);
  std::string NewHandle();
  static std::string EngineLayoutName(const std::string& tenant, const std::string& name);

  absl::StatusOr<InputBytes> Input(const Tenant& tenant, const headwise::v1::Tensor& tensor,
                                   const char* what, DType dtype,
                                   const std::vector<int64_t>& shape) const;
  absl::StatusOr<OutputTarget> Output(const Tenant& tenant,
                                      const headwise::v1::OutputPlacement& placement,
                                      std::vector<int64_t> o_shape,
                                      std::vector<int64_t> lse_shape) const;

  // Reserves, in the tenant's ledger, the most bytes an append of `tokens` tokens to each of
  // `layers` layers of `entry` can take in its append tier (MaxAppendBytes: whole pages).
  // RESOURCE_EXHAUSTED when that would pass the tenant's quota counting the appends in flight.
  // Call it before the work; UpdateUsage(entry, &reservation) afterwards charges what the engine
  // holds instead, in one step.
  absl::StatusOr<TierLedger::Reservation> ReserveAppend(const SequenceEntry& entry, int64_t tokens,
                                                        int layers = 1);
  // Refreshes entry.tier_bytes/tier_pages and the tenant's sums from the engine (one
  // GetSequenceStats at StatsDetail::kUsage: O(layers), no page walk; shared_pages is not
  // filled) and returns the stats (zeroed usage when the sequence is gone); in the same ledger
  // step gives back `reserved` when not null. Every mutating RPC calls it once.
  absl::StatusOr<SequenceStats> UpdateUsage(SequenceEntry& entry,
                                            TierLedger::Reservation* reserved = nullptr)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(entry.mu);
  // NOT_FOUND when the entry was released meanwhile.
  static absl::Status CheckLive(const SequenceEntry& entry) ABSL_EXCLUSIVE_LOCKS_REQUIRED(entry.mu);

  // Runs `apply` (one all-or-nothing engine call that appends k/v to `layer`, given the commit
  // hook to pass to the engine). For a durable sequence the append is logged first and removed
  // from the log again when `apply` fails; when its policy decides from queries, the hook also
  // logs the step's decisions before the engine commits them (restore replays them exactly).
  absl::Status LoggedAppend(SequenceEntry& entry, int layer, int num_tokens, uint64_t step_id,
                            absl::Span<const std::byte> k, absl::Span<const std::byte> v,
                            absl::FunctionRef<absl::Status(const CommitHook*)> apply)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(entry.mu);
  // Removes ops the engine then refused from the log (errors are logged: the next op of the
  // sequence reuses the index and replaces a stale one).
  void ForgetRejectedOps(absl::Span<const std::pair<std::string, uint32_t>> ops);

  static void BeforeOutputsForTesting(std::string_view rpc);

  // Validates a decode step and pins its regions; changes nothing.
  absl::StatusOr<PreparedDecode> PrepareDecode(const Tenant& tenant, const DecodeCall& call);
  // Answers a retried decode step from its record (or, for a restored record without outputs,
  // by attending the same query over the layer): fills step.o, step.lse and step.layer_length.
  // REQUIRES: entry is *step.entry.
  absl::Status AnswerDecodeRetry(SequenceEntry& entry, PreparedDecode& step,
                                 const StepRecord& record) ABSL_EXCLUSIVE_LOCKS_REQUIRED(entry.mu);

  absl::Status DoRegisterLayout(const Tenant& tenant,
                                const headwise::v1::RegisterLayoutRequest& request);
  absl::Status DoCreateSequence(const Tenant& tenant,
                                const headwise::v1::CreateSequenceRequest& request,
                                headwise::v1::CreateSequenceResponse* response);
  absl::Status DoFork(const Tenant& tenant, const headwise::v1::ForkRequest& request,
                      headwise::v1::ForkResponse* response);
  absl::Status DoAppend(const Tenant& tenant, const headwise::v1::AppendRequest& request,
                        headwise::v1::AppendResponse* response);
  // AppendLayers (service_bulk.cc): every layer of one chunk, all or nothing.
  struct BulkLayers;
  absl::Status DoAppendLayers(const Tenant& tenant,
                              const headwise::v1::AppendLayersRequest& request,
                              headwise::v1::AppendLayersResponse* response);
  absl::StatusOr<BulkLayers> BulkInputs(const Tenant& tenant, const ModelLayout& layout,
                                        const headwise::v1::AppendLayersRequest& request) const;
  // Appends every layer in order (one PutAppends for a durable sequence); on a refusal truncates
  // the layers already appended back to `length` and unlogs the ops.
  absl::Status AppendEveryLayer(SequenceEntry& entry, const BulkLayers& in, int64_t length,
                                int64_t evicted_before, uint64_t step_id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(entry.mu);
  absl::Status DoAttend(const Tenant& tenant, const headwise::v1::AttendRequest& request,
                        headwise::v1::AttendResponse* response);
  absl::Status DoPrefill(const Tenant& tenant, const headwise::v1::PrefillRequest& request,
                         headwise::v1::PrefillResponse* response);
  // DecodeStep and each DecodeStream step.
  absl::Status DoDecodeStep(const Tenant& tenant, const DecodeCall& call,
                            headwise::v1::DecodeStepResponse* response);
  absl::Status DoDecodeStepBatch(const Tenant& tenant,
                                 const headwise::v1::DecodeStepBatchRequest& request,
                                 headwise::v1::DecodeStepBatchResponse* response);
  // The batch's phases under its locks (see service_batch.cc).
  void AdmitBatch(const Tenant& tenant, std::vector<BatchSlot>& slots);
  void LogBatch(std::vector<BatchSlot>& slots);
  void RunBatch(int layer, std::vector<BatchSlot>& slots);
  void CommitBatch(std::vector<BatchSlot>& slots);
  // Restores one durable sequence; returns false (logged) when it is skipped.
  bool RestoreSequence(const headwise::v1::DurableSequenceRecord& record);
  absl::Status DoTruncate(const Tenant& tenant, const headwise::v1::TruncateRequest& request);
  absl::Status DoRelease(const Tenant& tenant, const headwise::v1::ReleaseRequest& request);
  absl::Status DoGetSequence(const Tenant& tenant, const std::string& handle,
                             headwise::v1::SequenceInfo* info);
  absl::Status DoListSequences(const Tenant& tenant, headwise::v1::ListSequencesResponse* out);
  absl::Status DoOpenStaging(const Tenant& tenant, const headwise::v1::OpenStagingRequest& request,
                             headwise::v1::OpenStagingResponse* response);
  absl::Status DoStats(const Tenant& tenant, headwise::v1::StatsResponse* response);
  // DoStats' parts: the daemon-wide figures (admin tenants), or the tenant's own.
  void DaemonStats(headwise::v1::StatsResponse* response) const;
  void TenantStats(const Tenant& tenant, bool has_disk, bool emulated,
                   headwise::v1::StatsResponse* response);

  // Prefix reuse (service_prefix.cc). StartSequence makes DoCreateSequence's engine sequence:
  // from the longest cached prefix of request.prefix_token_ids when there is a prefix cache and
  // the sequence is not durable, else a plain one.
  absl::StatusOr<PrefixStart> StartSequence(const Tenant& tenant,
                                            const headwise::v1::CreateSequenceRequest& request,
                                            const ModelLayout& layout);
  std::vector<BlockHash> PrefixHashes(const Tenant& tenant, const std::string& layout_name,
                                      const ModelLayout& layout,
                                      absl::Span<const int32_t> tokens) const;
  // Checks the token ids of a chunk of `num_tokens` tokens appended to `layer` (ids.empty(): OK)
  // and returns the chunk's first position (-1 without ids). Changes nothing.
  absl::StatusOr<int64_t> CheckTokenIds(SequenceEntry& entry, int layer,
                                        absl::Span<const int32_t> ids, int64_t num_tokens)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(entry.mu);
  // Offers a sequence's full blocks to the prefix cache before it is released.
  void PublishPrefix(SequenceEntry& entry) ABSL_EXCLUSIVE_LOCKS_REQUIRED(entry.mu);

  // Inserts a new entry for `engine_id`; REQUIRES the tenant's sequence count was reserved.
  std::shared_ptr<SequenceEntry> InsertSequence(const Tenant& tenant, std::string handle,
                                                SequenceId engine_id, std::string layout_name,
                                                const ModelLayout& layout, bool durable,
                                                Tier append_tier);

  const HeadwiseServiceOptions options_;
  Engine* const engine_;
  absl::flat_hash_map<const Tenant*, std::unique_ptr<TenantState>> tenant_states_;  // Immutable.
  std::array<Shard, kNumShards> shards_;
  absl::Mutex bitgen_mu_;
  absl::BitGen bitgen_ ABSL_GUARDED_BY(bitgen_mu_);
  std::unique_ptr<FairScheduler> scheduler_;
};

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_SERVICE_HEADWISE_SERVICE_H_
