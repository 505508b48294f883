// The planner: what one sequence's KV cache costs under a PolicySpec, on a device profile.
// For a model layout, a context length and a policy it reports the KV bytes in each tier
// (device, host, disk) and a modelled decode time per token. It is what `headwise plan` prints.
//
// Bytes come from the engine's own accounting (policies/accounting.h ComputeKvFootprint: pages
// retained per (layer, kv head), page-granular), with head roles and eviction resolved from the
// PolicySpec by the same functions the engine uses (ResolveHeadRoles, ResolveEvictionSpec). The
// planner adds placement and a time model on top; it never recounts bytes with a formula of its
// own.
//
// Placement (policy.proto Placement; the same defaults and validation as the engine's
// cachesvc/placement.h ResolvePlacement):
//   DEVICE_ONLY   every retained page is on the device. It fits iff the total <= device budget.
//   LAYER_OFFLOAD every page lives on the host; the device stages whole layers:
//                 1 + prefetch_depth layer buffers, each the size of the largest layer.
//   HEAD_OFFLOAD  HeadInfer (policies.md §1): every page lives on the host; the device stages
//                 device_head_groups (layer, kv head) buffers, each the size of the largest head
//                 (2 = double buffering: compute head i while head i+1 streams in).
// With `pin_spare` (policies.md §1.2, "service extension"; the engine does not do this yet) the
// device budget left after the staging buffers holds units (layers or heads) permanently,
// smallest first, so they need not stream; pinned units are not kept on the host.
// Host bytes above the host budget spill to disk at page granularity (the engine spills the
// coldest pages, i.e. the oldest positions of every head, so the spilled share is taken to be
// the same fraction of every layer).
//
// Decode time model, one new token, batch 1, attention only (no weights, no activations):
//   for each layer l, over its kv heads h with retained pages p_h and tokens t_h:
//     kv_bytes_l  = sum_h p_h * page_bytes               (every retained byte read once)
//     flops_l     = sum_h 2 * 2 * g * t_h * d            (QK^T and PV, 2 FLOPs per MAC, g = Hq/Hkv;
//                                                         = 2*2*Hq*S*d with no eviction)
//     compute_l   = max(kv_bytes_l / device_bw, flops_l / flop_rate)        (roofline)
//     streamed_l  = bytes of layer l's units that are not device-resident (offload modes)
//     transfer_l  = max(streamed_l / link_bw, disk_share_l / disk_bw)       (disk -> host -> device
//                                                                          pipelined)
//     time_l      = max(compute_l, transfer_l) when prefetching overlaps transfers with compute
//                   (prefetch_depth >= 1 and, for HEAD_OFFLOAD, device_head_groups >= 2);
//                   compute_l + transfer_l otherwise
//   seconds_per_token = sum_l time_l.
// Not modelled: weight reads, the D2H write of the new token, per-transfer latency, kernel
// launch overhead, the first head of a layer whose transfer has nothing to overlap with.
#ifndef HEADWISE_CACHESVC_PLANNER_PLANNER_H_
#define HEADWISE_CACHESVC_PLANNER_PLANNER_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cachesvc/base/layout.h"
#include "cachesvc/planner/device_profile.h"
#include "headwise/v1/policy.pb.h"
#include "policies/accounting.h"
#include "policies/eviction.h"
#include "policies/head_roles.h"

namespace headwise {

// The CLI's policy vocabulary, turned into a PolicySpec by BuildPolicySpec.
struct PolicyChoice {
  // "device_only", "layer_offload", "head_offload" (placement, no eviction), "streaming_llm"
  // (every head keeps sinks + recent), "duo_attention" (streaming heads keep sinks + recent).
  // Default: "device_only".
  std::string name = "device_only";
  // Placement for streaming_llm / duo_attention: "device_only", "layer_offload",
  // "head_offload", or empty for device_only. Must be empty or equal to the name for the
  // placement policies. Default: empty.
  std::string placement = "";
  // streaming_llm / duo_attention window. Valid: >= 0. Default: 64 + 256.
  int64_t sink_tokens = 64;
  int64_t recent_tokens = 256;
  // duo_attention: learned gates, e.g. read by the caller with LoadDuoAttentionGates from a
  // full_attention_heads.tsv the user names (`headwise plan --duo-tsv`); they go into the spec as
  // inline gates, since a PolicySpec never carries a path. Unset: an even split instead, in which
  // every layer's first heads are retrieval heads and round((1 - sparsity) * heads) heads in all
  // are (also given as inline gates 1/0, so roles still go through ResolveHeadRoles).
  // Default: unset.
  std::optional<DuoAttentionGates> duo_gates = std::nullopt;
  // duo_attention: fraction of heads that stream. Valid: [0, 1]. Default: 0.5.
  double sparsity = 0.5;
  // duo_attention: seed of the tie-breaking noise. Default: 0.
  uint64_t tie_break_seed = 0;
  // Offload modes (policy.proto Placement). Default: 2 and 1.
  int device_head_groups = 2;
  int prefetch_depth = 1;
};

// The PolicySpec for `choice` on `layout` (the layout is needed only for the even DuoAttention
// split). Reads no file. INVALID_ARGUMENT for an unknown name or placement, a placement that
// contradicts the name, a negative window, a sparsity outside [0, 1], device_head_groups < 1 or
// prefetch_depth < 0.
absl::StatusOr<headwise::v1::PolicySpec> BuildPolicySpec(const PolicyChoice& choice,
                                                         const ModelLayout& layout);

struct PlanOptions {
  // Required; must pass ValidateLayout.
  ModelLayout layout;
  // Tokens in the sequence. Valid: >= 0. Default: 0.
  int64_t context_tokens = 0;
  // Default: DEVICE_ONLY, uniform roles, no eviction.
  headwise::v1::PolicySpec policy;
  // KV bytes the device may hold; -1 = unlimited. Default: -1.
  int64_t device_budget_bytes = -1;
  // KV bytes the host may hold before pages spill to disk; -1 = unlimited. Default: -1.
  int64_t host_budget_bytes = -1;
  // Offload modes: pin units in the device budget left after the staging buffers (see the file
  // comment). Default: false (what the engine does).
  bool pin_spare = false;
  // Required; must pass ValidateDeviceProfile.
  DeviceProfile profile;
};

// The cost of one layer in the decode-time model (see the file comment for the formulas).
struct LayerCost {
  int64_t kv_bytes = 0;         // retained bytes, all read once per token
  int64_t attended_tokens = 0;  // sum over kv heads of retained tokens
  int64_t streamed_bytes = 0;   // bytes brought to the device per token
  double disk_bytes = 0;        // the part of streamed_bytes read from disk first
  double flops = 0;
  double hbm_seconds = 0;
  double flop_seconds = 0;
  double link_seconds = 0;
  double disk_seconds = 0;
  double seconds = 0;  // time_l
};

struct Plan {
  // Inputs, resolved.
  ModelLayout layout;
  int64_t context_tokens = 0;
  DeviceProfile profile;
  std::string placement;  // "device_only", "layer_offload", "head_offload"
  EvictionSpec eviction;
  int retrieval_heads = 0;
  int streaming_heads = 0;
  int device_head_groups = 2;
  int prefetch_depth = 1;
  bool pin_spare = false;
  // Transfers overlap compute (see the file comment).
  bool overlapped = false;

  // The engine's accounting for the sequence.
  KvFootprint footprint;

  // Tiers. In offload modes the device holds staging buffers (copies of host pages) plus pinned
  // units, so device + host can exceed footprint.retained_bytes; device_only has host = 0.
  int64_t device_bytes = 0;           // device_resident_bytes + device_staging_bytes
  int64_t device_resident_bytes = 0;  // pages that live on the device
  int64_t device_staging_bytes = 0;   // staging buffers of the offload modes
  int staging_buffers = 0;            // offload modes: how many staging buffers
  int64_t staging_unit_bytes = 0;     // one staging buffer (largest streamed unit)
  int64_t host_bytes = 0;
  int64_t disk_bytes = 0;
  int64_t device_budget_bytes = -1;  // -1 = unlimited
  int64_t host_budget_bytes = -1;
  // device_bytes <= device budget. When false, `note` says by how much it misses.
  bool fits = true;
  std::string note;
  // (layer, kv head) pairs whose pages live on the device / stream in every token.
  int resident_heads = 0;
  int streamed_heads = 0;

  // Per decode token.
  double flops_per_token = 0;
  int64_t link_bytes_per_token = 0;
  double disk_bytes_per_token = 0;
  double seconds_per_token = 0;
  // Sums over layers of each term (before max/overlap): which one binds.
  double hbm_seconds = 0;
  double flop_seconds = 0;
  double link_seconds = 0;
  double disk_seconds = 0;
  // "device memory", "compute", "link" or "disk": the largest of the four sums.
  std::string bound;
  std::vector<LayerCost> layers;
};

// Plans `options` (see the file comment). Pure: no side effects, and no file is read (gates come
// inline; a policy naming a daemon pattern is FAILED_PRECONDITION, as in a daemon without a
// pattern directory). INVALID_ARGUMENT for an invalid layout, profile, policy (as
// ResolveHeadRoles / ResolveEvictionSpec), context < 0, or a budget < -1. A configuration that
// does not fit its device budget is not an error: Plan::fits is false.
absl::StatusOr<Plan> MakePlan(const PlanOptions& options);

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_PLANNER_PLANNER_H_
