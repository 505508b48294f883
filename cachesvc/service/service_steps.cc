// HeadwiseService: the data RPCs of one sequence (Append, Attend, Prefill, DecodeStep and each
// DecodeStream step). Each validates everything and pins its staging regions first, then, under
// the sequence's lock, answers a retried step id from the ledger or makes one all-or-nothing
// engine call (logged first for a durable sequence, unlogged again when refused), then writes
// its outputs, which cannot fail.
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cachesvc/base/status_macros.h"
#include "cachesvc/service/headwise_service.h"
#include "cachesvc/service/test_hook.h"
#include "spdlog/spdlog.h"

namespace headwise {
namespace {

TestHook<void, std::string_view>& BeforeOutputs() {
  static auto* hook = new TestHook<void, std::string_view>();
  return *hook;
}

}  // namespace

void HeadwiseService::SetBeforeOutputsHookForTesting(std::function<void(std::string_view)> hook) {
  BeforeOutputs().Set(std::move(hook));
}

void HeadwiseService::BeforeOutputsForTesting(std::string_view rpc) { BeforeOutputs().Call(rpc); }

void HeadwiseService::ForgetRejectedOps(absl::Span<const std::pair<std::string, uint32_t>> ops) {
  if (ops.empty()) return;
  absl::Status status = ops.size() == 1
                            ? options_.durable_log->DeleteOp(ops[0].first, ops[0].second)
                            : options_.durable_log->DeleteOps(ops);
  if (!status.ok()) {
    // The op stays on disk until the sequence's next op, which reuses its index, replaces it; a
    // restart before that would replay it. Say so loudly.
    spdlog::error("durable log: could not remove {} rejected op(s), first op {} of sequence {}: {}",
                  ops.size(), ops[0].second, ops[0].first, std::string(status.message()));
  }
}

absl::Status HeadwiseService::LoggedAppend(
    SequenceEntry& entry, int layer, int num_tokens, uint64_t step_id,
    absl::Span<const std::byte> k, absl::Span<const std::byte> v,
    absl::FunctionRef<absl::Status(const CommitHook*)> apply) {
  if (!entry.durable) return apply(nullptr);
  const uint32_t op = entry.next_op;
  const DurableLog::AppendOp record{entry.handle, op, layer, num_tokens, step_id, k, v};
  RETURN_IF_ERROR(options_.durable_log->PutAppend(record));
  ASSIGN_OR_RETURN(const bool query_dependent, engine_->DecisionsDependOnQueries(entry.engine_id));
  const CommitHook log_decisions = [&](const LayerDrops& drops) {
    DurableLog::AppendOp with = record;
    with.drops = &drops.positions;
    return options_.durable_log->PutAppendDecisions(with);
  };
  absl::Status status = apply(query_dependent ? &log_decisions : nullptr);
  if (status.ok()) {
    ++entry.next_op;
    return status;
  }
  ForgetRejectedOps({{entry.handle, op}});
  return status;
}

absl::Status HeadwiseService::DoAppend(const Tenant& tenant,
                                       const headwise::v1::AppendRequest& request,
                                       headwise::v1::AppendResponse* response) {
  ASSIGN_OR_RETURN(auto entry, FindSequence(tenant, request.handle()));
  const ModelLayout& layout = entry->layout;
  const int layer = request.layer();
  RETURN_IF_ERROR(CheckLayer(layout, layer));
  ASSIGN_OR_RETURN(int tokens, TokenCount(request.k(), "k"));
  RETURN_IF_ERROR(CheckCallTokens("Append", tokens, options_.max_append_tokens_per_call));
  const std::vector<int64_t> shape = {tokens, layout.num_kv_heads, layout.head_dim};
  ASSIGN_OR_RETURN(InputBytes k, Input(tenant, request.k(), "k", layout.dtype, shape));
  ASSIGN_OR_RETURN(InputBytes v, Input(tenant, request.v(), "v", layout.dtype, shape));
  absl::MutexLock lock(&entry->mu);
  RETURN_IF_ERROR(CheckLive(*entry));
  ASSIGN_OR_RETURN(const StepRecord* retry,
                   entry->steps.FindRetry(layer, request.step_id(), StepKind::kAppend, tokens));
  if (retry != nullptr) {
    response->set_layer_length(retry->layer_length);
    return absl::OkStatus();
  }
  const auto ids = absl::MakeConstSpan(request.token_ids());
  ASSIGN_OR_RETURN(const int64_t ids_start, CheckTokenIds(*entry, layer, ids, tokens));
  ASSIGN_OR_RETURN(TierLedger::Reservation reserved, ReserveAppend(*entry, tokens));
  const SequenceId id = entry->engine_id;
  RETURN_IF_ERROR(LoggedAppend(
      *entry, layer, tokens, request.step_id(), k.span, v.span, [&](const CommitHook* hook) {
        return engine_->Append(id, LayerId(layer), k.span, v.span, tokens, layout.dtype, hook);
      }));
  entry->tokens.Record(ids_start, ids);
  ASSIGN_OR_RETURN(SequenceStats stats, UpdateUsage(*entry, &reserved));
  const int64_t length = stats.layer_lengths.at(layer);
  entry->steps.Record(layer, request.step_id(), StepKind::kAppend, tokens, length);
  response->set_layer_length(length);
  return absl::OkStatus();
}

absl::Status HeadwiseService::DoAttend(const Tenant& tenant,
                                       const headwise::v1::AttendRequest& request,
                                       headwise::v1::AttendResponse* response) {
  ASSIGN_OR_RETURN(auto entry, FindSequence(tenant, request.handle()));
  const ModelLayout& layout = entry->layout;
  RETURN_IF_ERROR(CheckLayer(layout, request.layer()));
  ASSIGN_OR_RETURN(InputBytes q_bytes, Input(tenant, request.q(), "q", DType::kF32,
                                             {layout.num_q_heads, layout.head_dim}));
  ASSIGN_OR_RETURN(OutputTarget out,
                   Output(tenant, request.output(), {layout.num_q_heads, layout.head_dim},
                          {layout.num_q_heads}));
  const std::vector<float> q = CopyFloats(q_bytes.span);
  std::vector<float> o(out.o_floats()), lse(out.lse_floats());
  {
    absl::MutexLock lock(&entry->mu);
    RETURN_IF_ERROR(CheckLive(*entry));
    RETURN_IF_ERROR(engine_->Attend(entry->engine_id, LayerId(request.layer()), q,
                                    absl::MakeSpan(o), absl::MakeSpan(lse)));
    UpdateUsage(*entry).IgnoreError();  // Staging may have moved pages.
  }
  BeforeOutputsForTesting("Attend");
  out.Write(o, lse, response->mutable_o(), response->mutable_lse());
  return absl::OkStatus();
}

absl::Status HeadwiseService::DoPrefill(const Tenant& tenant,
                                        const headwise::v1::PrefillRequest& request,
                                        headwise::v1::PrefillResponse* response) {
  ASSIGN_OR_RETURN(auto entry, FindSequence(tenant, request.handle()));
  const ModelLayout& layout = entry->layout;
  const int layer = request.layer();
  RETURN_IF_ERROR(CheckLayer(layout, layer));
  ASSIGN_OR_RETURN(int tokens, TokenCount(request.k(), "k"));
  RETURN_IF_ERROR(CheckCallTokens("Prefill", tokens, options_.max_prefill_tokens_per_call));
  const std::vector<int64_t> kv_shape = {tokens, layout.num_kv_heads, layout.head_dim};
  ASSIGN_OR_RETURN(InputBytes k, Input(tenant, request.k(), "k", layout.dtype, kv_shape));
  ASSIGN_OR_RETURN(InputBytes v, Input(tenant, request.v(), "v", layout.dtype, kv_shape));
  ASSIGN_OR_RETURN(InputBytes q_bytes, Input(tenant, request.q(), "q", DType::kF32,
                                             {tokens, layout.num_q_heads, layout.head_dim}));
  ASSIGN_OR_RETURN(OutputTarget out,
                   Output(tenant, request.output(), {tokens, layout.num_q_heads, layout.head_dim},
                          {tokens, layout.num_q_heads}));
  const std::vector<float> q = CopyFloats(q_bytes.span);
  std::vector<float> o(out.o_floats()), lse(out.lse_floats());
  {
    absl::MutexLock lock(&entry->mu);
    RETURN_IF_ERROR(CheckLive(*entry));
    ASSIGN_OR_RETURN(const StepRecord* retry,
                     entry->steps.FindRetry(layer, request.step_id(), StepKind::kPrefill, tokens));
    if (retry != nullptr && !retry->has_outputs) {
      return absl::AlreadyExistsError(
          absl::StrCat("step_id ", request.step_id(), " was applied (layer ", layer, " length ",
                       retry->layer_length, "); its outputs were not kept"));
    }
    if (retry != nullptr) {
      o = retry->o;
      lse = retry->lse;
    } else {
      const auto ids = absl::MakeConstSpan(request.token_ids());
      ASSIGN_OR_RETURN(const int64_t ids_start, CheckTokenIds(*entry, layer, ids, tokens));
      ASSIGN_OR_RETURN(TierLedger::Reservation reserved, ReserveAppend(*entry, tokens));
      const SequenceId id = entry->engine_id;
      RETURN_IF_ERROR(LoggedAppend(
          *entry, layer, tokens, request.step_id(), k.span, v.span, [&](const CommitHook* hook) {
            return engine_->Prefill(id, LayerId(layer), q, k.span, v.span, tokens, layout.dtype,
                                    absl::MakeSpan(o), absl::MakeSpan(lse), hook);
          }));
      entry->tokens.Record(ids_start, ids);
      ASSIGN_OR_RETURN(SequenceStats stats, UpdateUsage(*entry, &reserved));
      entry->steps.Record(layer, request.step_id(), StepKind::kPrefill, tokens,
                          stats.layer_lengths.at(layer), o, lse);
    }
  }
  BeforeOutputsForTesting("Prefill");
  out.Write(o, lse, response->mutable_o(), response->mutable_lse());
  return absl::OkStatus();
}

absl::StatusOr<HeadwiseService::PreparedDecode> HeadwiseService::PrepareDecode(
    const Tenant& tenant, const DecodeCall& call) {
  PreparedDecode step;
  ASSIGN_OR_RETURN(step.entry, FindSequence(tenant, call.handle));
  const ModelLayout& layout = step.entry->layout;
  RETURN_IF_ERROR(CheckLayer(layout, call.layer));
  step.layer = call.layer;
  step.step_id = call.step_id;
  const std::vector<int64_t> kv_shape = {1, layout.num_kv_heads, layout.head_dim};
  ASSIGN_OR_RETURN(step.k, Input(tenant, call.k, "k", layout.dtype, kv_shape));
  ASSIGN_OR_RETURN(step.v, Input(tenant, call.v, "v", layout.dtype, kv_shape));
  ASSIGN_OR_RETURN(InputBytes q_bytes,
                   Input(tenant, call.q, "q", DType::kF32, {layout.num_q_heads, layout.head_dim}));
  ASSIGN_OR_RETURN(step.out, Output(tenant, call.output, {layout.num_q_heads, layout.head_dim},
                                    {layout.num_q_heads}));
  step.q = CopyFloats(q_bytes.span);
  step.o.resize(step.out->o_floats());
  step.lse.resize(step.out->lse_floats());
  return step;
}

absl::Status HeadwiseService::AnswerDecodeRetry(SequenceEntry& entry, PreparedDecode& step,
                                                const StepRecord& record) {
  step.layer_length = record.layer_length;
  if (record.has_outputs) {
    step.o = record.o;
    step.lse = record.lse;
    return absl::OkStatus();
  }
  // Outputs not kept (a restored record, or over the cap): a decode step is "append, then
  // attend", and nothing has changed the layer since, so attending the same query again gives
  // the step's outputs.
  return engine_->Attend(entry.engine_id, LayerId(step.layer), step.q, absl::MakeSpan(step.o),
                         absl::MakeSpan(step.lse));
}

absl::Status HeadwiseService::DoDecodeStep(const Tenant& tenant, const DecodeCall& call,
                                           headwise::v1::DecodeStepResponse* response) {
  ASSIGN_OR_RETURN(PreparedDecode step, PrepareDecode(tenant, call));
  SequenceEntry& entry = *step.entry;
  {
    absl::MutexLock lock(&entry.mu);
    RETURN_IF_ERROR(CheckLive(entry));
    ASSIGN_OR_RETURN(const StepRecord* retry,
                     entry.steps.FindRetry(step.layer, step.step_id, StepKind::kDecode, 1));
    if (retry != nullptr) {
      RETURN_IF_ERROR(AnswerDecodeRetry(entry, step, *retry));
    } else {
      ASSIGN_OR_RETURN(TierLedger::Reservation reserved, ReserveAppend(entry, 1));
      const SequenceId id = entry.engine_id;
      RETURN_IF_ERROR(LoggedAppend(entry, step.layer, 1, step.step_id, step.k.span, step.v.span,
                                   [&](const CommitHook* hook) {
                                     return engine_->DecodeStep(
                                         id, LayerId(step.layer), step.q, step.k.span, step.v.span,
                                         entry.layout.dtype, absl::MakeSpan(step.o),
                                         absl::MakeSpan(step.lse), &step.layer_length, hook);
                                   }));
      entry.steps.Record(step.layer, step.step_id, StepKind::kDecode, 1, step.layer_length, step.o,
                         step.lse);
      UpdateUsage(entry, &reserved).IgnoreError();
    }
  }
  BeforeOutputsForTesting("DecodeStep");
  step.out->Write(step.o, step.lse, response->mutable_o(), response->mutable_lse());
  response->set_layer_length(step.layer_length);
  return absl::OkStatus();
}

}  // namespace headwise
