#include "cachesvc/service/step_ledger.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace headwise {

const char* StepKindName(StepKind kind) {
  switch (kind) {
    case StepKind::kAppend:
      return "Append";
    case StepKind::kPrefill:
      return "Prefill";
    case StepKind::kDecode:
      return "DecodeStep";
    case StepKind::kRestored:
      return "restored step";
  }
  return "step";
}

absl::StatusOr<const StepRecord*> StepLedger::FindRetry(int layer, uint64_t step_id, StepKind kind,
                                                        int num_tokens) const {
  if (step_id == 0) return nullptr;
  const StepRecord& record = layers_.at(static_cast<size_t>(layer));
  if (record.step_id != step_id) return nullptr;
  const bool same_kind = record.kind == kind || record.kind == StepKind::kRestored;
  if (!same_kind || record.num_tokens != num_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("step_id ", step_id, " was already used on layer ", layer, " by a ",
                     StepKindName(record.kind), " of ", record.num_tokens, " tokens; this is a ",
                     StepKindName(kind), " of ", num_tokens));
  }
  return &record;
}

void StepLedger::Record(int layer, uint64_t step_id, StepKind kind, int num_tokens,
                        int64_t layer_length, absl::Span<const float> o,
                        absl::Span<const float> lse) {
  StepRecord& record = layers_.at(static_cast<size_t>(layer));
  record.step_id = step_id;
  record.kind = kind;
  record.num_tokens = num_tokens;
  record.layer_length = layer_length;
  const size_t bytes = (o.size() + lse.size()) * sizeof(float);
  record.has_outputs = step_id != 0 && bytes <= kMaxRetainedOutputBytes &&
                       (kind == StepKind::kPrefill || kind == StepKind::kDecode);
  if (record.has_outputs) {
    record.o.assign(o.begin(), o.end());
    record.lse.assign(lse.begin(), lse.end());
  } else {
    record.o.clear();
    record.o.shrink_to_fit();
    record.lse.clear();
    record.lse.shrink_to_fit();
  }
}

void StepLedger::Clear() {
  for (StepRecord& record : layers_) record = StepRecord();
}

}  // namespace headwise
