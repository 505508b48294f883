// Policy comparison on a real model: the llama2.c runner generates a greedy reference with the
// full cache, then teacher-forces the same tokens through each policy stack and reports how
// often its next-token argmax agrees with the full cache's, and the KV it held at the end
// (`headwise_llama2 --compare`, docs/llama2.md).
#ifndef HEADWISE_CLIENTS_LLAMA2_POLICY_COMPARE_H_
#define HEADWISE_CLIENTS_LLAMA2_POLICY_COMPARE_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "clients/llama2/checkpoint.h"
#include "clients/llama2/kv_backend.h"
#include "headwise/v1/policy.pb.h"

namespace headwise::llama2 {

struct ComparedPolicy {
  std::string name;  // For the table, e.g. "h2o heavy 32 + recent 32".
  headwise::v1::PolicySpec spec;
};

struct ComparisonRow {
  std::string name;
  int positions = 0;
  int agree = 0;  // Positions whose argmax equals the full cache's.
  double tokens_per_second = 0;
  std::string stats;  // The backend's description of the sequence at the end.
};

// The full cache's greedy run over `steps` positions from BOS, then every policy teacher-forced
// over the same tokens. Errors of the backend or the model are returned as they are.
absl::StatusOr<std::vector<ComparisonRow>> ComparePolicies(
    const Checkpoint& checkpoint, KvBackend& backend, int steps, int page_tokens,
    const std::vector<ComparedPolicy>& policies);

// The default line-up at a budget of `budget` tokens per head: StreamingLLM (4 sinks + the
// rest recent) and H2O (half heavy hitters, half recent), then each again merging what it drops
// (StreamingLLM with the count-biased mean, H2O with D2O).
std::vector<ComparedPolicy> DefaultComparison(int budget);

}  // namespace headwise::llama2

#endif  // HEADWISE_CLIENTS_LLAMA2_POLICY_COMPARE_H_
