// Placement: where a sequence's KV pages live, resolved from its PolicySpec, and the pure
// decisions the engine needs to apply it (which tier new pages go to, how many heads to stage on
// the device ahead of the one being computed, which pages to spill when the host tier is full).
// Nothing here touches memory; the engine applies the decisions (architecture.md "Plan, then
// apply").
#ifndef HEADWISE_CACHESVC_PLACEMENT_H_
#define HEADWISE_CACHESVC_PLACEMENT_H_

#include <cstdint>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "cachesvc/base/ids.h"
#include "headwise/v1/policy.pb.h"

namespace headwise {

enum class PlacementMode : uint8_t {
  // Every page lives in the device pool; past the device budget appends fail.
  kDeviceOnly = 0,
  // Pages live in the host pool; attending a layer stages the whole layer on the device.
  kLayerOffload = 1,
  // HeadInfer (policies.md §1): pages live in the host pool; attending a layer stages one KV
  // head at a time, prefetching the following ones while the current one computes.
  kHeadOffload = 2,
};

// "device_only", "layer_offload", "head_offload".
std::string_view PlacementModeName(PlacementMode mode);

struct PlacementSpec {
  // Default: kDeviceOnly.
  PlacementMode mode = PlacementMode::kDeviceOnly;
  // kHeadOffload: KV heads of a layer staged on the device at once (current + prefetched).
  // Valid: >= 1. Default: 2.
  int device_head_groups = 2;
  // Offload modes: units staged ahead of the one being computed. Valid: >= 0. Default: 1.
  int prefetch_depth = 1;

  // The tier a page is written to when it is appended.
  Tier home_tier() const {
    return mode == PlacementMode::kDeviceOnly ? Tier::kDevice : Tier::kHost;
  }
  // kHeadOffload: heads staged ahead of the current one: min(device_head_groups - 1,
  // prefetch_depth). 0 for the other modes.
  int heads_ahead() const;
};

// Resolves spec.placement with defaults. INVALID_ARGUMENT for device_head_groups < 1,
// prefetch_depth < 0 or an unknown mode.
absl::StatusOr<PlacementSpec> ResolvePlacement(const headwise::v1::PolicySpec& spec);

// A page that may be spilled from the host tier to disk.
struct SpillCandidate {
  // Engine-defined handle returned in the decision (e.g. an index into a candidate table).
  int64_t handle = 0;
  // The step at which the page was last written or attended (PageMeta::last_touched_step).
  int64_t last_touched_step = 0;
  // Position of the page's first token; breaks ties (older positions spill first).
  int64_t first_position = 0;
};

// The `count` coldest candidates (smallest last_touched_step, then smallest first_position, then
// smallest handle), or all of them when there are fewer. Pure; deterministic.
std::vector<int64_t> ChooseSpillVictims(std::vector<SpillCandidate> candidates, int64_t count);

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_PLACEMENT_H_
