// Request-level replay: a request trace with prefix block ids (Mooncake) through a prefix cache
// of each eviction policy (block_cache.h) at several capacities, and what each would save.
//
// Semantics. Requests are replayed in file order; each looks up its block ids in prompt order.
// Every id is one reference to the cache: resident = a hit (Touch), absent = a miss (Insert,
// evicting as the policy says). Two hit counts come out:
//   hits         every resident reference (the classic paging count, over the flat reference
//                string of all requests' ids). This is what Belady's MIN maximizes, so for it the
//                offline policy is a ceiling no online policy passes at the same capacity.
//   prefix hits  the resident references before the request's first miss: the blocks a prefix
//                cache can actually serve, since a block's KV depends on every token before it
//                and the blocks after a miss are recomputed anyway (vLLM, SGLang and LMCache
//                reuse only the longest cached prefix). The blocks after the first miss are
//                still referenced (touched or inserted), as a serving engine stores them.
// With unlimited capacity and chained ids (an id always follows the same predecessor, as in
// Mooncake's traces) the two are equal: the Mooncake conversation trace's 0.366 of all blocks.
//
// Cost model (kept simple on purpose; docs/replay.md):
//   block bytes      the block's tokens x the layout's KV bytes per token (K and V, every layer
//                    and KV head). A block holds block_tokens tokens except a prompt's last,
//                    which holds the rest of input_length.
//   prefill saved    2 x model_params FLOPs per prefix-hit token at the profile's peak FLOP rate
//                    (the dense matmul term only; attention's quadratic term and kernel
//                    efficiency are left out, so this is a lower bound of the compute saved).
//   load time        prefix-hit bytes over the profile's host->device link (the cache tier is
//                    host memory).
//   TTFT saving      (prefill saved - load time) per request, mean over all requests.
#ifndef HEADWISE_CACHESVC_REPLAY_REQUEST_REPLAY_H_
#define HEADWISE_CACHESVC_REPLAY_REQUEST_REPLAY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cachesvc/planner/device_profile.h"
#include "cachesvc/replay/request_trace.h"

namespace headwise {

// Token and byte volume of a trace; for traces without block ids (Azure) the block fields are 0.
struct TraceSummary {
  int64_t requests = 0;
  // Last arrival minus first, seconds.
  double duration_s = 0;
  int64_t input_tokens = 0;
  int64_t output_tokens = 0;
  int64_t max_input_tokens = 0;
  // Median and 99th percentile (nearest rank) of input_tokens and output_tokens per request.
  int64_t p50_input_tokens = 0, p99_input_tokens = 0;
  int64_t p50_output_tokens = 0, p99_output_tokens = 0;
  // KV bytes of every prompt token at the layout (what prefill writes with no reuse).
  double input_kv_bytes = 0;
  // Modelled prefill time of every prompt token on the device, seconds (no reuse).
  double prefill_s = 0;
  // Block references, distinct ids, and the hit ratio of an unlimited cache
  // ((blocks - unique_blocks) / blocks).
  int64_t blocks = 0;
  int64_t unique_blocks = 0;
  double unlimited_hit_ratio = 0;
};

struct RequestReplayOptions {
  // Policy names (block_cache.h). Default: all registered, in display order.
  std::vector<std::string> policies = BlockCachePolicyNames();
  // Capacities as fractions of the trace's unique blocks, each in (0, 1]; rounded up to whole
  // blocks. Default: 5%, 10%, 25%.
  std::vector<double> capacity_fractions = {0.05, 0.10, 0.25};
  // Whether an unlimited capacity (every unique block fits) is replayed too. Default: true.
  bool unlimited = true;
  // KV bytes per token (ModelLayout::token_bytes()). Default: Llama-3-8B's, 131,072 B.
  int64_t token_kv_bytes = 131072;
  // Parameters of the model, for the prefill FLOPs. Default: Llama-3-8B's, 8.03e9.
  double model_params = 8.03e9;
  // Device figures (flops_per_s and link_bytes_per_s are used); must pass ValidateDeviceProfile.
  // Default: empty, which fails (take one from DeviceProfileByName).
  DeviceProfile device;
};

// One policy at one capacity.
struct PolicyResult {
  std::string policy;
  // "5%", "10%", "25%", "unlimited".
  std::string capacity_label;
  int64_t capacity_blocks = 0;
  int64_t references = 0;
  int64_t hits = 0;
  int64_t prefix_hits = 0;
  // Blocks inserted and kept (misses the policy admitted), and blocks evicted.
  int64_t inserted = 0;
  int64_t evicted = 0;
  // prefix-hit tokens and their KV bytes (read from the cache tier instead of recomputed); the
  // bytes of every inserted block (written to the cache tier).
  int64_t prefix_hit_tokens = 0;
  double hit_bytes = 0;
  double inserted_bytes = 0;
  // The cost model above; totals in seconds, the TTFT saving per request in ms.
  double prefill_saved_s = 0;
  double load_s = 0;
  double mean_ttft_saving_ms = 0;

  double hit_ratio() const { return references == 0 ? 0 : double(hits) / double(references); }
  double prefix_hit_ratio() const {
    return references == 0 ? 0 : double(prefix_hits) / double(references);
  }
};

struct RequestReplayReport {
  std::string source;
  TraceSummary summary;
  RequestReplayOptions options;
  // Capacity-major (every policy at the first capacity, then the next), in option order, the
  // unlimited capacity last. Empty for traces without block ids.
  std::vector<PolicyResult> results;
};

// Token and byte volume of `trace` under `options` (token_kv_bytes, model_params, device).
TraceSummary SummarizeTrace(const RequestTrace& trace, const RequestReplayOptions& options);

// Replays `trace` through every policy at every capacity. For a trace without block ids only the
// summary is filled (no reuse can be computed). INVALID_ARGUMENT for an unknown policy, a
// fraction outside (0, 1], no policy or capacity, a non-positive token_kv_bytes or
// model_params, or a device profile that fails ValidateDeviceProfile.
absl::StatusOr<RequestReplayReport> ReplayRequests(const RequestTrace& trace,
                                                   const RequestReplayOptions& options);

// The prefill time of `tokens` prompt tokens under `options`, seconds.
double PrefillSeconds(double tokens, const RequestReplayOptions& options);

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_REPLAY_REQUEST_REPLAY_H_
