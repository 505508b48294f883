#include "cachesvc/planner/planner.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cachesvc/base/status_macros.h"
#include "cachesvc/planner/byte_size.h"
#include "policies/head_roles.h"

namespace headwise {
namespace {

using headwise::v1::Placement;
using headwise::v1::PolicySpec;

absl::StatusOr<Placement::Mode> PlacementModeFromName(const std::string& name) {
  if (name.empty() || name == "device_only") return Placement::DEVICE_ONLY;
  if (name == "layer_offload") return Placement::LAYER_OFFLOAD;
  if (name == "head_offload") return Placement::HEAD_OFFLOAD;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown placement '", name, "'; expected device_only, layer_offload or head_offload"));
}

// Mirrors cachesvc/placement.h ResolvePlacement (defaults 2 and 1, same validation); the
// planner does not link the engine. Returns the mode's name.
absl::StatusOr<std::string> ResolvePlacementForPlan(const PolicySpec& spec, int* head_groups,
                                                    int* prefetch_depth) {
  const Placement& p = spec.placement();
  *head_groups = p.has_device_head_groups() ? p.device_head_groups() : 2;
  *prefetch_depth = p.has_prefetch_depth() ? p.prefetch_depth() : 1;
  if (*head_groups < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("placement.device_head_groups must be >= 1, got ", *head_groups));
  }
  if (*prefetch_depth < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("placement.prefetch_depth must be >= 0, got ", *prefetch_depth));
  }
  switch (p.mode()) {
    case Placement::MODE_UNSPECIFIED:
    case Placement::DEVICE_ONLY:
      return std::string("device_only");
    case Placement::LAYER_OFFLOAD:
      return std::string("layer_offload");
    case Placement::HEAD_OFFLOAD:
      return std::string("head_offload");
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown placement mode ", p.mode()));
  }
}

// A unit of placement: a whole layer (layer_offload) or one (layer, kv head).
struct Unit {
  int layer = 0;
  int heads = 0;
  int64_t bytes = 0;
  bool resident = false;
};

}  // namespace

absl::StatusOr<PolicySpec> BuildPolicySpec(const PolicyChoice& choice, const ModelLayout& layout) {
  PolicySpec spec;
  const std::string& name = choice.name;
  const bool is_placement =
      name == "device_only" || name == "layer_offload" || name == "head_offload";
  const bool is_eviction = name == "streaming_llm" || name == "duo_attention";
  if (!is_placement && !is_eviction) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown policy '", name,
        "'; expected device_only, layer_offload, head_offload, streaming_llm or duo_attention"));
  }
  if (is_placement && !choice.placement.empty() && choice.placement != name) {
    return absl::InvalidArgumentError(absl::StrCat("policy ", name,
                                                   " is itself a placement; "
                                                   "--placement ",
                                                   choice.placement, " contradicts it"));
  }
  ASSIGN_OR_RETURN(const Placement::Mode mode,
                   PlacementModeFromName(is_placement ? name : choice.placement));
  if (choice.device_head_groups < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("device_head_groups must be >= 1, got ", choice.device_head_groups));
  }
  if (choice.prefetch_depth < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("prefetch_depth must be >= 0, got ", choice.prefetch_depth));
  }
  spec.mutable_placement()->set_mode(mode);
  spec.mutable_placement()->set_device_head_groups(choice.device_head_groups);
  spec.mutable_placement()->set_prefetch_depth(choice.prefetch_depth);
  if (!is_eviction) {
    spec.mutable_eviction()->mutable_none();
    return spec;
  }
  RETURN_IF_ERROR(
      ValidateWindow({.sink_tokens = choice.sink_tokens, .recent_tokens = choice.recent_tokens}));
  headwise::v1::StreamingLlmEviction* window = spec.mutable_eviction()->mutable_streaming_llm();
  window->set_sink_tokens(choice.sink_tokens);
  window->set_recent_tokens(choice.recent_tokens);
  if (name == "streaming_llm") return spec;  // Uniform roles: the window applies to every head.

  if (!(choice.sparsity >= 0 && choice.sparsity <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("sparsity must be in [0, 1], got ", choice.sparsity));
  }
  headwise::v1::DuoAttentionRoles* duo = spec.mutable_head_roles()->mutable_duo_attention();
  duo->set_tie_break_seed(choice.tie_break_seed);
  if (choice.duo_gates.has_value()) {
    headwise::v1::InlineGates* inline_gates = duo->mutable_inline_gates();
    inline_gates->set_num_layers(choice.duo_gates->num_layers);
    inline_gates->set_num_kv_heads(choice.duo_gates->num_kv_heads);
    inline_gates->mutable_gates()->Add(choice.duo_gates->alpha.begin(),
                                       choice.duo_gates->alpha.end());
    duo->set_sparsity(choice.sparsity);
    return spec;
  }
  // Even split: `retrieval` heads in all, spread over the layers as evenly as possible, each
  // layer's first heads. As gates 1 (retrieval) / 0 (streaming) at the achieved sparsity
  // s' = 1 - R/n, the quantile falls strictly between the two groups (h = s'(n-1) lies in
  // [n-R-1, n-R)), so ResolveHeadRoles makes exactly these R heads retrieval heads.
  RETURN_IF_ERROR(ValidateLayout(layout));
  const ModelLayout& valid = layout;
  const int64_t n = int64_t{valid.num_layers} * valid.num_kv_heads;
  const int64_t retrieval = std::llround((1.0 - choice.sparsity) * static_cast<double>(n));
  headwise::v1::InlineGates* gates = duo->mutable_inline_gates();
  gates->set_num_layers(valid.num_layers);
  gates->set_num_kv_heads(valid.num_kv_heads);
  for (int l = 0; l < valid.num_layers; ++l) {
    const int64_t in_layer =
        (l + 1) * retrieval / valid.num_layers - l * retrieval / valid.num_layers;
    for (int h = 0; h < valid.num_kv_heads; ++h) gates->add_gates(h < in_layer ? 1.0 : 0.0);
  }
  duo->set_sparsity(1.0 - static_cast<double>(retrieval) / static_cast<double>(n));
  return spec;
}

absl::StatusOr<Plan> MakePlan(const PlanOptions& options) {
  const ModelLayout& layout = options.layout;
  RETURN_IF_ERROR(ValidateLayout(layout));
  RETURN_IF_ERROR(ValidateDeviceProfile(options.profile));
  if (options.context_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("context must be >= 0 tokens, got ", options.context_tokens));
  }
  if (options.device_budget_bytes < -1 || options.host_budget_bytes < -1) {
    return absl::InvalidArgumentError("budgets must be >= 0 bytes, or -1 for unlimited");
  }
  Plan plan;
  plan.layout = layout;
  plan.context_tokens = options.context_tokens;
  plan.profile = options.profile;
  plan.device_budget_bytes = options.device_budget_bytes;
  plan.host_budget_bytes = options.host_budget_bytes;
  plan.pin_spare = options.pin_spare;
  ASSIGN_OR_RETURN(plan.placement, ResolvePlacementForPlan(options.policy, &plan.device_head_groups,
                                                           &plan.prefetch_depth));
  ASSIGN_OR_RETURN(const HeadRoles roles, ResolveHeadRoles(options.policy.head_roles(), layout));
  ASSIGN_OR_RETURN(plan.eviction, ResolveEvictionSpec(options.policy));
  plan.retrieval_heads = roles.Count(HeadRole::kRetrieval);
  plan.streaming_heads = roles.Count(HeadRole::kStreaming);
  ASSIGN_OR_RETURN(plan.footprint,
                   ComputeKvFootprint(layout, options.context_tokens, roles, plan.eviction));

  const int num_layers = layout.num_layers;
  const int num_heads = layout.num_kv_heads;
  auto head_bytes = [&](int l, int h) {
    return plan.footprint.per_head[static_cast<size_t>(l) * num_heads + h].pages *
           layout.page_bytes();
  };

  // Placement: units, staging buffers, pinning.
  std::vector<Unit> units;
  int staging_slots = 0;
  if (plan.placement == "layer_offload") {
    for (int l = 0; l < num_layers; ++l) {
      Unit unit{.layer = l, .heads = num_heads};
      for (int h = 0; h < num_heads; ++h) unit.bytes += head_bytes(l, h);
      units.push_back(unit);
    }
    staging_slots = 1 + plan.prefetch_depth;
    plan.overlapped = plan.prefetch_depth >= 1;
  } else {
    for (int l = 0; l < num_layers; ++l) {
      for (int h = 0; h < num_heads; ++h) {
        units.push_back({.layer = l, .heads = 1, .bytes = head_bytes(l, h)});
      }
    }
    if (plan.placement == "device_only") {
      for (Unit& unit : units) unit.resident = true;
    } else {
      staging_slots = plan.device_head_groups;
      plan.overlapped = std::min(plan.device_head_groups - 1, plan.prefetch_depth) >= 1;
    }
  }
  auto staging_for = [&](const std::vector<Unit>& all) {
    int64_t largest = 0;
    for (const Unit& unit : all) {
      if (!unit.resident) largest = std::max(largest, unit.bytes);
    }
    return largest;
  };
  if (staging_slots > 0 && options.pin_spare) {
    // Smallest first: the most units for the budget (DuoAttention streaming heads first).
    std::vector<size_t> order(units.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return units[a].bytes < units[b].bytes; });
    int64_t pinned = 0;
    for (size_t i : order) {
      if (options.device_budget_bytes < 0) {
        units[i].resident = true;
        continue;
      }
      units[i].resident = true;
      const int64_t need = pinned + units[i].bytes + staging_slots * staging_for(units);
      if (need > options.device_budget_bytes) {
        units[i].resident = false;
        break;
      }
      pinned += units[i].bytes;
    }
  }
  plan.staging_unit_bytes = staging_slots > 0 ? staging_for(units) : 0;
  plan.staging_buffers = staging_slots;
  plan.device_staging_bytes = staging_slots * plan.staging_unit_bytes;
  int64_t streamed_total = 0;
  plan.layers.assign(num_layers, LayerCost{});
  for (const Unit& unit : units) {
    if (unit.resident) {
      plan.device_resident_bytes += unit.bytes;
      plan.resident_heads += unit.heads;
    } else {
      plan.layers[unit.layer].streamed_bytes += unit.bytes;
      streamed_total += unit.bytes;
      plan.streamed_heads += unit.heads;
    }
  }
  plan.device_bytes = plan.device_resident_bytes + plan.device_staging_bytes;
  plan.host_bytes = streamed_total;
  if (options.host_budget_bytes >= 0 && plan.host_bytes > options.host_budget_bytes) {
    plan.host_bytes = options.host_budget_bytes / layout.page_bytes() * layout.page_bytes();
    plan.disk_bytes = streamed_total - plan.host_bytes;
  }
  const double disk_fraction = streamed_total == 0 ? 0.0
                                                   : static_cast<double>(plan.disk_bytes) /
                                                         static_cast<double>(streamed_total);
  if (options.device_budget_bytes >= 0 && plan.device_bytes > options.device_budget_bytes) {
    plan.fits = false;
    plan.note = absl::StrCat("needs ", FormatBytes(plan.device_bytes), " of device memory, ",
                             FormatBytes(plan.device_bytes - options.device_budget_bytes),
                             " over the budget of ", FormatBytes(options.device_budget_bytes));
    if (plan.placement == "device_only") {
      absl::StrAppend(&plan.note,
                      "; an offload placement (layer_offload, head_offload) or an "
                      "eviction policy would fit in less");
    } else if (staging_slots > 0) {
      absl::StrAppend(&plan.note, "; the ", staging_slots, " staging buffers of ",
                      FormatBytes(plan.staging_unit_bytes), " alone exceed it");
    }
  }

  // Time model (see planner.h).
  const DeviceProfile& profile = options.profile;
  const int g = layout.group_size();
  for (int l = 0; l < num_layers; ++l) {
    LayerCost& cost = plan.layers[l];
    for (int h = 0; h < num_heads; ++h) {
      cost.kv_bytes += head_bytes(l, h);
      cost.attended_tokens +=
          plan.footprint.per_head[static_cast<size_t>(l) * num_heads + h].tokens;
    }
    cost.flops = 4.0 * g * static_cast<double>(cost.attended_tokens) * layout.head_dim;
    cost.disk_bytes = disk_fraction * static_cast<double>(cost.streamed_bytes);
    cost.hbm_seconds = static_cast<double>(cost.kv_bytes) / profile.device_bytes_per_s;
    cost.flop_seconds = cost.flops / profile.flops_per_s;
    cost.link_seconds = static_cast<double>(cost.streamed_bytes) / profile.link_bytes_per_s;
    cost.disk_seconds = cost.disk_bytes / profile.disk_bytes_per_s;
    const double compute = std::max(cost.hbm_seconds, cost.flop_seconds);
    const double transfer = std::max(cost.link_seconds, cost.disk_seconds);
    cost.seconds = plan.overlapped ? std::max(compute, transfer) : compute + transfer;

    plan.flops_per_token += cost.flops;
    plan.link_bytes_per_token += cost.streamed_bytes;
    plan.disk_bytes_per_token += cost.disk_bytes;
    plan.hbm_seconds += cost.hbm_seconds;
    plan.flop_seconds += cost.flop_seconds;
    plan.link_seconds += cost.link_seconds;
    plan.disk_seconds += cost.disk_seconds;
    plan.seconds_per_token += cost.seconds;
  }
  const std::pair<double, const char*> terms[] = {{plan.hbm_seconds, "device memory"},
                                                  {plan.flop_seconds, "compute"},
                                                  {plan.link_seconds, "link"},
                                                  {plan.disk_seconds, "disk"}};
  plan.bound = std::max_element(std::begin(terms), std::end(terms))->second;
  return plan;
}

}  // namespace headwise
