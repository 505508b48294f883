#include "cachesvc/replay/request_replay.h"

#include <algorithm>
#include <cmath>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cachesvc/base/status_macros.h"

namespace headwise {
namespace {

// Nearest-rank percentile q in [0, 1] of `values` (sorted in place). REQUIRES: !values.empty().
int64_t Percentile(std::vector<int64_t>& values, double q) {
  std::sort(values.begin(), values.end());
  const auto rank = static_cast<size_t>(std::ceil(q * static_cast<double>(values.size())));
  return values[std::clamp<size_t>(rank, 1, values.size()) - 1];
}

// Tokens of block `index` of `request`: full blocks, then the rest of the prompt.
int64_t BlockTokens(const TraceRequest& request, size_t index, int64_t block_tokens) {
  const int64_t before = static_cast<int64_t>(index) * block_tokens;
  return std::clamp<int64_t>(request.input_tokens - before, 0, block_tokens);
}

absl::Status ValidateOptions(const RequestReplayOptions& options) {
  if (options.policies.empty()) return absl::InvalidArgumentError("no policy to replay");
  if (options.capacity_fractions.empty() && !options.unlimited) {
    return absl::InvalidArgumentError("no capacity to replay");
  }
  for (const double f : options.capacity_fractions) {
    if (!(f > 0 && f <= 1)) {
      return absl::InvalidArgumentError(absl::StrCat("capacity fraction ", f, " is not in (0, 1]"));
    }
  }
  if (options.token_kv_bytes <= 0) {
    return absl::InvalidArgumentError("KV bytes per token must be positive");
  }
  if (!(options.model_params > 0 && std::isfinite(options.model_params))) {
    return absl::InvalidArgumentError("model parameters must be positive");
  }
  RETURN_IF_ERROR(ValidateDeviceProfile(options.device));
  for (const std::string& name : options.policies) {
    RETURN_IF_ERROR(MakeBlockCache(name, 1).status());
  }
  return absl::OkStatus();
}

// "5%", "12.5%".
std::string FractionLabel(double fraction) { return absl::StrFormat("%g%%", fraction * 100); }

// One policy at one capacity over the whole trace.
absl::StatusOr<PolicyResult> ReplayOne(const RequestTrace& trace,
                                       absl::Span<const BlockId> references,
                                       const std::string& policy, int64_t capacity,
                                       const RequestReplayOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<BlockCache> cache, MakeBlockCache(policy, capacity, references));
  PolicyResult result;
  result.policy = policy;
  result.capacity_blocks = capacity;
  std::vector<BlockId> evicted;
  int64_t inserted_tokens = 0;
  for (const TraceRequest& request : trace.requests) {
    bool in_prefix = true;
    for (size_t i = 0; i < request.blocks.size(); ++i) {
      const BlockId id = request.blocks[i];
      const int64_t tokens = BlockTokens(request, i, trace.block_tokens);
      ++result.references;
      if (cache->Lookup(id)) {
        cache->Touch(id);
        ++result.hits;
        if (in_prefix) {
          ++result.prefix_hits;
          result.prefix_hit_tokens += tokens;
        }
        continue;
      }
      in_prefix = false;
      evicted.clear();
      if (cache->Insert(id, &evicted)) {
        ++result.inserted;
        inserted_tokens += tokens;
      }
      result.evicted += static_cast<int64_t>(evicted.size());
    }
  }
  const double token_bytes = static_cast<double>(options.token_kv_bytes);
  result.hit_bytes = static_cast<double>(result.prefix_hit_tokens) * token_bytes;
  result.inserted_bytes = static_cast<double>(inserted_tokens) * token_bytes;
  result.prefill_saved_s = PrefillSeconds(static_cast<double>(result.prefix_hit_tokens), options);
  result.load_s = result.hit_bytes / options.device.link_bytes_per_s;
  result.mean_ttft_saving_ms =
      1e3 * (result.prefill_saved_s - result.load_s) / static_cast<double>(trace.requests.size());
  return result;
}

}  // namespace

double PrefillSeconds(double tokens, const RequestReplayOptions& options) {
  return tokens * 2 * options.model_params / options.device.flops_per_s;
}

TraceSummary SummarizeTrace(const RequestTrace& trace, const RequestReplayOptions& options) {
  TraceSummary s;
  s.requests = static_cast<int64_t>(trace.requests.size());
  if (trace.requests.empty()) return s;
  std::vector<int64_t> inputs, outputs;
  absl::flat_hash_set<BlockId> unique;
  double first = trace.requests.front().arrival_s, last = first;
  for (const TraceRequest& r : trace.requests) {
    first = std::min(first, r.arrival_s);
    last = std::max(last, r.arrival_s);
    s.input_tokens += r.input_tokens;
    s.output_tokens += r.output_tokens;
    s.max_input_tokens = std::max(s.max_input_tokens, r.input_tokens);
    inputs.push_back(r.input_tokens);
    outputs.push_back(r.output_tokens);
    s.blocks += static_cast<int64_t>(r.blocks.size());
    unique.insert(r.blocks.begin(), r.blocks.end());
  }
  s.duration_s = last - first;
  s.p50_input_tokens = Percentile(inputs, 0.50);
  s.p99_input_tokens = Percentile(inputs, 0.99);
  s.p50_output_tokens = Percentile(outputs, 0.50);
  s.p99_output_tokens = Percentile(outputs, 0.99);
  s.input_kv_bytes =
      static_cast<double>(s.input_tokens) * static_cast<double>(options.token_kv_bytes);
  s.prefill_s = PrefillSeconds(static_cast<double>(s.input_tokens), options);
  s.unique_blocks = static_cast<int64_t>(unique.size());
  s.unlimited_hit_ratio =
      s.blocks == 0 ? 0 : static_cast<double>(s.blocks - s.unique_blocks) / double(s.blocks);
  return s;
}

absl::StatusOr<RequestReplayReport> ReplayRequests(const RequestTrace& trace,
                                                   const RequestReplayOptions& options) {
  RETURN_IF_ERROR(ValidateOptions(options));
  RequestReplayReport report;
  report.source = trace.source;
  report.options = options;
  report.summary = SummarizeTrace(trace, options);
  if (!trace.has_blocks() || report.summary.unique_blocks == 0) return report;

  std::vector<BlockId> references;
  references.reserve(static_cast<size_t>(report.summary.blocks));
  for (const TraceRequest& r : trace.requests) {
    references.insert(references.end(), r.blocks.begin(), r.blocks.end());
  }
  std::vector<std::pair<std::string, int64_t>> capacities;
  const auto unique = static_cast<double>(report.summary.unique_blocks);
  for (const double f : options.capacity_fractions) {
    capacities.emplace_back(FractionLabel(f),
                            std::max<int64_t>(1, std::llround(std::ceil(f * unique - 1e-9))));
  }
  if (options.unlimited) capacities.emplace_back("unlimited", report.summary.unique_blocks);
  for (const auto& [label, blocks] : capacities) {
    for (const std::string& policy : options.policies) {
      ASSIGN_OR_RETURN(PolicyResult result, ReplayOne(trace, references, policy, blocks, options));
      result.capacity_label = label;
      report.results.push_back(std::move(result));
    }
  }
  return report;
}

}  // namespace headwise
