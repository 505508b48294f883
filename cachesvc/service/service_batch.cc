// HeadwiseService::DoDecodeStepBatch: one layer's decode step for many sequences of one tenant,
// over Engine::DecodeStepBatch. Phases: validate and pin every item (no lock); lock the items'
// sequences in handle order; admit (live, retry answered from the ledger, quota); log the
// durable items in one write batch; one engine batch per dtype; commit (ledger, usage, next op)
// or unlog the refused ones; unlock; write the outputs. Each item's result is its own: a failing
// item changes nothing of its sequence and does not affect the others.
#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "cachesvc/base/status_macros.h"
#include "cachesvc/service/headwise_service.h"

namespace headwise {

struct HeadwiseService::BatchSlot {
  absl::Status status;  // The item's result so far.
  PreparedDecode step;  // Valid when the item was prepared.
  bool run = false;     // Sent to the engine (admitted, and logged when durable).
  bool logged = false;  // Its append is in the durable log as op `op`.
  uint32_t op = 0;
  TierLedger::Reservation reserved;  // The item's quota while it runs (AdmitBatch).
};

// Holds the locks of every prepared item's sequence, taken in handle order (so two batches, or a
// batch and a single-sequence call, cannot deadlock), released in reverse.
class HeadwiseService::BatchLocks {
 public:
  explicit BatchLocks(std::vector<BatchSlot>& slots) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    for (BatchSlot& slot : slots) {
      if (slot.status.ok()) locked_.push_back(slot.step.entry.get());
    }
    std::sort(locked_.begin(), locked_.end(),
              [](const SequenceEntry* a, const SequenceEntry* b) { return a->handle < b->handle; });
    for (SequenceEntry* entry : locked_) entry->mu.Lock();
  }
  ~BatchLocks() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    for (auto it = locked_.rbegin(); it != locked_.rend(); ++it) (*it)->mu.Unlock();
  }
  BatchLocks(const BatchLocks&) = delete;
  BatchLocks& operator=(const BatchLocks&) = delete;

 private:
  std::vector<SequenceEntry*> locked_;
};

absl::Status HeadwiseService::DoDecodeStepBatch(const Tenant& tenant,
                                                const headwise::v1::DecodeStepBatchRequest& request,
                                                headwise::v1::DecodeStepBatchResponse* response) {
  if (request.items_size() > kMaxDecodeBatchItems) {
    return absl::InvalidArgumentError(absl::StrCat("a batch holds at most ", kMaxDecodeBatchItems,
                                                   " items, got ", request.items_size()));
  }
  absl::flat_hash_set<std::string> handles;
  for (const auto& item : request.items()) {
    if (!handles.insert(item.handle()).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence '", item.handle(), "' appears twice in one batch"));
    }
  }
  std::vector<BatchSlot> slots(static_cast<size_t>(request.items_size()));
  for (int i = 0; i < request.items_size(); ++i) {
    const auto& item = request.items(i);
    absl::StatusOr<PreparedDecode> step =
        PrepareDecode(tenant, DecodeCall{item.handle(), request.layer(), item.q(), item.k(),
                                         item.v(), item.output(), item.step_id()});
    if (step.ok()) {
      slots[i].step = *std::move(step);
    } else {
      slots[i].status = step.status();
    }
  }
  {
    BatchLocks locks(slots);
    AdmitBatch(tenant, slots);
    LogBatch(slots);
    RunBatch(request.layer(), slots);
    CommitBatch(slots);
  }
  BeforeOutputsForTesting("DecodeStepBatch");
  for (BatchSlot& slot : slots) {
    auto* result = response->add_results();
    result->set_code(static_cast<int>(slot.status.code()));
    result->set_message(std::string(slot.status.message()));
    if (!slot.status.ok()) continue;
    slot.step.out->Write(slot.step.o, slot.step.lse, result->mutable_o(), result->mutable_lse());
    result->set_layer_length(slot.step.layer_length);
  }
  return absl::OkStatus();
}

// The dynamic lock set (BatchLocks) is beyond the static analysis; each phase runs while it is
// held.
void HeadwiseService::AdmitBatch(const Tenant& /*tenant*/,
                                 std::vector<BatchSlot>& slots) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  for (BatchSlot& slot : slots) {
    if (!slot.status.ok()) continue;
    PreparedDecode& step = slot.step;
    SequenceEntry& entry = *step.entry;
    slot.status = CheckLive(entry);
    if (!slot.status.ok()) continue;
    absl::StatusOr<const StepRecord*> retry =
        entry.steps.FindRetry(step.layer, step.step_id, StepKind::kDecode, 1);
    if (!retry.ok() || *retry != nullptr) {
      slot.status = retry.ok() ? AnswerDecodeRetry(entry, step, **retry) : retry.status();
      continue;
    }
    absl::StatusOr<TierLedger::Reservation> reserved = ReserveAppend(entry, 1);
    slot.status = reserved.status();
    if (!slot.status.ok()) continue;
    slot.reserved = *std::move(reserved);
    slot.run = true;
  }
}

void HeadwiseService::LogBatch(std::vector<BatchSlot>& slots) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  std::vector<DurableLog::AppendOp> ops;
  std::vector<BatchSlot*> durable;
  for (BatchSlot& slot : slots) {
    SequenceEntry* entry = slot.step.entry.get();
    if (!slot.run || !entry->durable) continue;
    ops.push_back(DurableLog::AppendOp{entry->handle, entry->next_op, slot.step.layer, 1,
                                       slot.step.step_id, slot.step.k.span, slot.step.v.span});
    durable.push_back(&slot);
  }
  if (ops.empty()) return;
  const absl::Status status = options_.durable_log->PutAppends(ops);  // One fsync for all.
  for (size_t i = 0; i < durable.size(); ++i) {
    if (status.ok()) {
      durable[i]->logged = true;
      durable[i]->op = ops[i].op_index;
    } else {
      durable[i]->status = status;
      durable[i]->run = false;
    }
  }
}

void HeadwiseService::RunBatch(int layer,
                               std::vector<BatchSlot>& slots) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  // Engine::DecodeStepBatch takes one dtype: one engine batch per dtype present.
  for (DType dtype : {DType::kF16, DType::kBF16, DType::kF32}) {
    std::vector<Engine::DecodeItem> items;
    std::vector<BatchSlot*> owners;
    // Durable items whose policy decides from queries log their decisions before the engine
    // commits them (as DecodeStep does); one hook per such item, alive through the batch.
    std::vector<CommitHook> hooks;
    hooks.reserve(slots.size());
    for (BatchSlot& slot : slots) {
      PreparedDecode& step = slot.step;
      if (!slot.run || step.entry->layout.dtype != dtype) continue;
      Engine::DecodeItem item;
      absl::StatusOr<bool> query_dependent =
          slot.logged ? engine_->DecisionsDependOnQueries(step.entry->engine_id) : false;
      if (query_dependent.ok() && *query_dependent) {
        const DurableLog::AppendOp record{step.entry->handle, slot.op,     step.layer, 1,
                                          step.step_id,       step.k.span, step.v.span};
        hooks.push_back([this, record](const LayerDrops& drops) {
          DurableLog::AppendOp with = record;
          with.drops = &drops.positions;
          return options_.durable_log->PutAppendDecisions(with);
        });
        item.before_commit = &hooks.back();
      }
      item.seq = step.entry->engine_id;
      item.q = step.q;
      item.k = step.k.span;
      item.v = step.v.span;
      item.o = absl::MakeSpan(step.o);
      item.lse = absl::MakeSpan(step.lse);
      items.push_back(item);
      owners.push_back(&slot);
    }
    if (items.empty()) continue;
    const absl::Status status =
        engine_->DecodeStepBatch(LayerId(layer), dtype, absl::MakeSpan(items));
    for (size_t i = 0; i < items.size(); ++i) {
      owners[i]->status = status.ok() ? items[i].status : status;
      owners[i]->step.layer_length = items[i].layer_length;
    }
  }
}

void HeadwiseService::CommitBatch(std::vector<BatchSlot>& slots) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  std::vector<std::pair<std::string, uint32_t>> rejected;
  for (BatchSlot& slot : slots) {
    if (!slot.run) continue;
    PreparedDecode& step = slot.step;
    SequenceEntry& entry = *step.entry;
    if (!slot.status.ok()) {
      if (slot.logged) rejected.emplace_back(entry.handle, slot.op);
      continue;
    }
    if (slot.logged) ++entry.next_op;
    entry.steps.Record(step.layer, step.step_id, StepKind::kDecode, 1, step.layer_length, step.o,
                       step.lse);
    UpdateUsage(entry, &slot.reserved).IgnoreError();
  }
  ForgetRejectedOps(rejected);
}

}  // namespace headwise
