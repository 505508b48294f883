#include "clients/llama2/policy_compare.h"

#include <algorithm>
#include <chrono>
#include <memory>

#include "absl/strings/str_cat.h"
#include "clients/llama2/transformer.h"

namespace headwise::llama2 {
namespace {

constexpr int kBos = 1;  // llama2.c's BOS token.

int Argmax(absl::Span<const float> logits) {
  return static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

// Feeds `inputs` one position at a time; returns the argmax after each.
absl::StatusOr<std::vector<int>> Run(Transformer& t, const std::vector<int>& inputs) {
  std::vector<int> argmax;
  argmax.reserve(inputs.size());
  for (int token : inputs) {
    absl::StatusOr<absl::Span<float>> logits = t.Forward(token);
    if (!logits.ok()) return logits.status();
    argmax.push_back(Argmax(*logits));
  }
  return argmax;
}

}  // namespace

std::vector<ComparedPolicy> DefaultComparison(int budget) {
  std::vector<ComparedPolicy> out;
  ComparedPolicy streaming{absl::StrCat("streaming_llm sink 4 + recent ", budget - 4),
                           StreamingLlmPolicy(4, budget - 4)};
  out.push_back(streaming);
  ComparedPolicy h2o;
  h2o.name = absl::StrCat("h2o heavy ", budget / 2, " + recent ", budget - budget / 2);
  h2o.spec.mutable_eviction()->mutable_h2o()->set_heavy_tokens(budget / 2);
  h2o.spec.mutable_eviction()->mutable_h2o()->set_recent_tokens(budget - budget / 2);
  out.push_back(h2o);
  // The same evictions, merging what they drop instead of losing it (policies.md §6).
  ComparedPolicy mean = streaming;
  mean.name = "streaming_llm + merge mean";
  mean.spec.mutable_merge()->mutable_mean();
  out.push_back(mean);
  ComparedPolicy d2o = h2o;
  d2o.name = "h2o + merge d2o";
  d2o.spec.mutable_merge()->mutable_d2o();
  out.push_back(d2o);
  return out;
}

absl::StatusOr<std::vector<ComparisonRow>> ComparePolicies(
    const Checkpoint& checkpoint, KvBackend& backend, int steps, int page_tokens,
    const std::vector<ComparedPolicy>& policies) {
  steps = std::min(steps, checkpoint.config.seq_len);
  std::vector<ComparisonRow> rows;
  // The reference: greedy with the full cache; the inputs are BOS then each argmax.
  std::vector<int> inputs = {kBos};
  std::vector<int> reference;
  {
    TransformerOptions options;
    options.page_tokens = page_tokens;
    absl::StatusOr<std::unique_ptr<Transformer>> t =
        Transformer::Create(&checkpoint, &backend, options);
    if (!t.ok()) return t.status();
    const auto start = std::chrono::steady_clock::now();
    for (int pos = 0; pos < steps; ++pos) {
      absl::StatusOr<absl::Span<float>> logits = (*t)->Forward(inputs.back());
      if (!logits.ok()) return logits.status();
      reference.push_back(Argmax(*logits));
      if (pos + 1 < steps) inputs.push_back(reference.back());
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    absl::StatusOr<std::string> stats = backend.DescribeStats((*t)->sequence());
    if (!stats.ok()) return stats.status();
    rows.push_back(ComparisonRow{"full cache", steps, steps, steps / seconds, *stats});
  }
  for (const ComparedPolicy& policy : policies) {
    TransformerOptions options;
    options.page_tokens = page_tokens;
    options.policy = policy.spec;
    absl::StatusOr<std::unique_ptr<Transformer>> t =
        Transformer::Create(&checkpoint, &backend, options);
    if (!t.ok()) return t.status();
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<std::vector<int>> argmax = Run(**t, inputs);
    if (!argmax.ok()) return argmax.status();
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    ComparisonRow row{policy.name, steps, 0, steps / seconds, ""};
    for (int pos = 0; pos < steps; ++pos) row.agree += (*argmax)[pos] == reference[pos];
    absl::StatusOr<std::string> stats = backend.DescribeStats((*t)->sequence());
    if (!stats.ok()) return stats.status();
    row.stats = *stats;
    rows.push_back(std::move(row));
  }
  return rows;
}

}  // namespace headwise::llama2
