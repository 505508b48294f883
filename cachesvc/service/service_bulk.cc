// HeadwiseService: AppendLayers, the K/V of every layer of one chunk of tokens in one call
// (service.proto, AppendLayersRequest). The call is one step of the engine's append rule on every
// layer, all or nothing across layers:
//   1. validate everything and pin the staging region (nothing changed yet);
//   2. under the sequence's lock: answer a retried step id from the ledger, else require that no
//      step is in progress (every layer at the same length n) and check the quota for the bytes
//      of all layers;
//   3. a durable sequence logs the L appends in one synced write (DurableLog::PutAppends);
//   4. append layer 0 .. L-1 in order, each one all-or-nothing Engine::Append straight from the
//      request's (or the region's) bytes. When layer j is refused, layers 0 .. j-1 are at n + T and
//      the others at n: Engine::Truncate(n) (n is the sequence length, so the truncation is allowed
//      and removes exactly this call's tokens) rolls them back, and the L log records are removed.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cachesvc/base/status_macros.h"
#include "cachesvc/service/headwise_service.h"
#include "spdlog/spdlog.h"

namespace headwise {

// The validated bytes of every layer of one call and what keeps them mapped.
struct HeadwiseService::BulkLayers {
  int num_tokens = 0;
  std::vector<absl::Span<const std::byte>> k, v;  // One per layer.
  std::shared_ptr<StagingRegion> region;          // Null for inline bytes.
  uint64_t bytes = 0;                             // K and V of every layer.
};

namespace {

absl::Span<const std::byte> AsBytes(const std::string& s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

}  // namespace

grpc::ServerUnaryReactor* HeadwiseService::AppendLayers(
    grpc::CallbackServerContext* ctx, const headwise::v1::AppendLayersRequest* request,
    headwise::v1::AppendLayersResponse* response) {
  return Dispatch(
      "AppendLayers", ctx, *request, Lane::kBulk,
      [this, request, response](const Tenant& t) { return DoAppendLayers(t, *request, response); });
}

absl::StatusOr<HeadwiseService::BulkLayers> HeadwiseService::BulkInputs(
    const Tenant& tenant, const ModelLayout& layout,
    const headwise::v1::AppendLayersRequest& request) const {
  const int64_t tokens = request.num_tokens();
  if (tokens < 1 || tokens > kMaxTokensPerCall) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_tokens ", tokens, " is not in [1, ", kMaxTokensPerCall, "]"));
  }
  const int layers = layout.num_layers;
  RETURN_IF_ERROR(CheckCallTokens("AppendLayers", tokens, options_.max_append_tokens_per_call));
  const uint64_t layer_bytes = static_cast<uint64_t>(tokens) * layout.num_kv_heads *
                               layout.head_dim * DTypeSize(layout.dtype);
  BulkLayers in;
  in.num_tokens = static_cast<int>(tokens);
  in.bytes = 2 * layer_bytes * static_cast<uint64_t>(layers);
  in.k.reserve(layers);
  in.v.reserve(layers);
  if (request.has_staged_layers()) {
    const auto& staged = request.staged_layers();
    ASSIGN_OR_RETURN(in.region, options_.staging->Find(tenant.name, staged.region_id()));
    ASSIGN_OR_RETURN(absl::Span<std::byte> range, in.region->Range(staged.offset(), in.bytes));
    for (int l = 0; l < layers; ++l) {
      in.k.push_back(range.subspan(2 * l * layer_bytes, layer_bytes));
      in.v.push_back(range.subspan((2 * l + 1) * layer_bytes, layer_bytes));
    }
    return in;
  }
  if (!request.has_inline_layers()) {
    return absl::InvalidArgumentError("no payload (inline_layers or staged_layers)");
  }
  const auto& data = request.inline_layers();
  if (data.k_size() != layers || data.v_size() != layers) {
    return absl::InvalidArgumentError(absl::StrCat("inline_layers has ", data.k_size(), " k and ",
                                                   data.v_size(), " v tensors; the layout has ",
                                                   layers, " layers"));
  }
  for (int l = 0; l < layers; ++l) {
    for (const std::string* bytes : {&data.k(l), &data.v(l)}) {
      if (bytes->size() != layer_bytes) {
        return absl::InvalidArgumentError(
            absl::StrCat("layer ", l, ": ", bytes == &data.k(l) ? "k" : "v", " has ", bytes->size(),
                         " bytes; ", tokens, " tokens need ", layer_bytes));
      }
    }
    in.k.push_back(AsBytes(data.k(l)));
    in.v.push_back(AsBytes(data.v(l)));
  }
  return in;
}

absl::Status HeadwiseService::DoAppendLayers(const Tenant& tenant,
                                             const headwise::v1::AppendLayersRequest& request,
                                             headwise::v1::AppendLayersResponse* response) {
  ASSIGN_OR_RETURN(auto entry, FindSequence(tenant, request.handle()));
  const ModelLayout& layout = entry->layout;
  ASSIGN_OR_RETURN(BulkLayers in, BulkInputs(tenant, layout, request));
  const uint64_t step_id = request.step_id();
  absl::MutexLock lock(&entry->mu);
  RETURN_IF_ERROR(CheckLive(*entry));
  // A retry: every layer's last step is this id (an id on only some layers was reused).
  int retried = 0;
  int64_t retried_length = 0;
  for (int l = 0; l < layout.num_layers; ++l) {
    ASSIGN_OR_RETURN(const StepRecord* retry,
                     entry->steps.FindRetry(l, step_id, StepKind::kAppend, in.num_tokens));
    if (retry != nullptr) {
      ++retried;
      retried_length = retry->layer_length;
    }
  }
  if (retried == layout.num_layers) {
    response->set_length(retried_length);
    return absl::OkStatus();
  }
  if (retried > 0) {
    return absl::InvalidArgumentError(absl::StrCat("step_id ", step_id, " is the last step of ",
                                                   retried, " of ", layout.num_layers,
                                                   " layers, not of all: it was reused"));
  }
  ASSIGN_OR_RETURN(SequenceStats before,
                   engine_->GetSequenceStats(entry->engine_id, StatsDetail::kUsage));
  for (int l = 0; l < layout.num_layers; ++l) {
    if (before.layer_lengths[l] != before.length) {
      return absl::FailedPreconditionError(
          absl::StrCat("AppendLayers needs every layer at the same length; layer ", l, " is at ",
                       before.layer_lengths[l], ", the sequence at ", before.length,
                       " (a step is in progress: finish it with Append)"));
    }
  }
  const auto ids = absl::MakeConstSpan(request.token_ids());
  RETURN_IF_ERROR(entry->tokens.Check(before.length, ids, in.num_tokens));
  ASSIGN_OR_RETURN(TierLedger::Reservation reserved,
                   ReserveAppend(*entry, in.num_tokens, layout.num_layers));
  RETURN_IF_ERROR(AppendEveryLayer(*entry, in, before.length, before.evicted_tokens, step_id));
  entry->tokens.Record(before.length, ids);
  ASSIGN_OR_RETURN(SequenceStats after, UpdateUsage(*entry, &reserved));
  for (int l = 0; l < layout.num_layers; ++l) {
    entry->steps.Record(l, step_id, StepKind::kAppend, in.num_tokens, after.layer_lengths[l]);
  }
  response->set_length(after.length);
  return absl::OkStatus();
}

absl::Status HeadwiseService::AppendEveryLayer(SequenceEntry& entry, const BulkLayers& in,
                                               int64_t length, int64_t evicted_before,
                                               uint64_t step_id) {
  const int layers = entry.layout.num_layers;
  const SequenceId id = entry.engine_id;
  const uint32_t first_op = entry.next_op;
  std::vector<DurableLog::AppendOp> ops;
  bool query_dependent = false;
  if (entry.durable) {
    ASSIGN_OR_RETURN(query_dependent, engine_->DecisionsDependOnQueries(id));
    ops.reserve(layers);
    for (int l = 0; l < layers; ++l) {
      ops.push_back(DurableLog::AppendOp{entry.handle, first_op + static_cast<uint32_t>(l), l,
                                         in.num_tokens, step_id, in.k[l], in.v[l]});
    }
    RETURN_IF_ERROR(options_.durable_log->PutAppends(ops));
  }
  absl::Status status;
  int layer = 0;
  for (; layer < layers && status.ok(); ++layer) {
    const CommitHook log_decisions = [&](const LayerDrops& drops) {
      DurableLog::AppendOp with = ops[layer];
      with.drops = &drops.positions;
      return options_.durable_log->PutAppendDecisions(with);
    };
    status = engine_->Append(id, LayerId(layer), in.k[layer], in.v[layer], in.num_tokens,
                             entry.layout.dtype, query_dependent ? &log_decisions : nullptr);
  }
  if (status.ok()) {
    if (entry.durable) entry.next_op += static_cast<uint32_t>(layers);
    return status;
  }
  const int refused = layer - 1;
  std::string note;
  if (refused > 0) {
    const absl::Status undo = engine_->Truncate(id, length);
    absl::StatusOr<SequenceStats> now = UpdateUsage(entry);
    if (!undo.ok()) {
      spdlog::error("AppendLayers: rolling back {} layer(s) of sequence {} failed: {}", refused,
                    entry.handle, std::string(undo.message()));
      note = absl::StrCat("; rolling back the ", refused,
                          " appended layer(s) failed: ", undo.message());
    } else if (now.ok() && now->evicted_tokens != evicted_before) {
      note = absl::StrCat("; the ", refused,
                          " appended layer(s) were rolled back, but tokens their eviction policy "
                          "dropped meanwhile stay dropped");
    }
  }
  if (entry.durable) {
    std::vector<std::pair<std::string, uint32_t>> forget;
    forget.reserve(layers);
    for (const DurableLog::AppendOp& op : ops) forget.emplace_back(op.handle, op.op_index);
    ForgetRejectedOps(forget);
  }
  return absl::Status(status.code(), absl::StrCat("layer ", refused, ": ", status.message(), note));
}

}  // namespace headwise
