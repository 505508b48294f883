// StepLedger: what makes a client retry of Append, Prefill or DecodeStep idempotent. A request may
// carry a client step id (non-zero); the ledger keeps, per layer of one sequence, the last step
// applied there: its id, kind, token count, the layer length after it and (up to a cap) its
// outputs. A request whose step id equals the last applied step id of its layer is a retry: the
// service answers it from the ledger and changes nothing.
//
// Bounded: one record per layer; outputs are kept only when o and lse together take at most
// kMaxRetainedOutputBytes (a decode step of any common model; a Prefill of a few tokens), so a
// sequence's ledger holds at most num_layers * kMaxRetainedOutputBytes of outputs.
//
// Not thread-safe: the service guards each sequence's ledger with the sequence's lock.
#ifndef HEADWISE_CACHESVC_SERVICE_STEP_LEDGER_H_
#define HEADWISE_CACHESVC_SERVICE_STEP_LEDGER_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace headwise {

enum class StepKind {
  kAppend,
  kPrefill,
  kDecode,
  // Rebuilt from the durable log at restore: the kind and the outputs are not logged.
  kRestored,
};

struct StepRecord {
  uint64_t step_id = 0;  // 0: no record.
  StepKind kind = StepKind::kAppend;
  int num_tokens = 0;
  int64_t layer_length = 0;  // The layer's length right after the step.
  bool has_outputs = false;  // o and lse below are the step's outputs.
  std::vector<float> o;
  std::vector<float> lse;
};

class StepLedger {
 public:
  // Outputs of one step larger than this (o and lse bytes together) are not kept.
  static constexpr size_t kMaxRetainedOutputBytes = size_t{64} << 10;

  StepLedger() = default;
  explicit StepLedger(int num_layers) : layers_(static_cast<size_t>(num_layers)) {}

  // The record of the last step applied on `layer` when its id is `step_id` (a retry), nullptr
  // when `step_id` is 0 or not the last step there. INVALID_ARGUMENT when the id matches but the
  // kind or the token count differ (the id was reused for another request). REQUIRES: layer is
  // in range.
  absl::StatusOr<const StepRecord*> FindRetry(int layer, uint64_t step_id, StepKind kind,
                                              int num_tokens) const;

  // Records the step just applied on `layer` (step_id 0 forgets the layer's record: an earlier
  // id is no longer the last step there). Outputs are copied when they fit the cap.
  void Record(int layer, uint64_t step_id, StepKind kind, int num_tokens, int64_t layer_length,
              absl::Span<const float> o = {}, absl::Span<const float> lse = {});

  // Forgets every record (after a Truncate, whose lengths no record describes).
  void Clear();

 private:
  std::vector<StepRecord> layers_;
};

const char* StepKindName(StepKind kind);

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_SERVICE_STEP_LEDGER_H_
