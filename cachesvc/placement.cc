#include "cachesvc/placement.h"

#include <algorithm>
#include <tuple>

#include "absl/strings/str_cat.h"

namespace headwise {

std::string_view PlacementModeName(PlacementMode mode) {
  switch (mode) {
    case PlacementMode::kDeviceOnly:
      return "device_only";
    case PlacementMode::kLayerOffload:
      return "layer_offload";
    case PlacementMode::kHeadOffload:
      return "head_offload";
  }
  return "unknown";
}

int PlacementSpec::heads_ahead() const {
  if (mode != PlacementMode::kHeadOffload) return 0;
  return std::min(device_head_groups - 1, prefetch_depth);
}

absl::StatusOr<PlacementSpec> ResolvePlacement(const headwise::v1::PolicySpec& spec) {
  PlacementSpec out;
  const headwise::v1::Placement& p = spec.placement();
  switch (p.mode()) {
    case headwise::v1::Placement::MODE_UNSPECIFIED:
    case headwise::v1::Placement::DEVICE_ONLY:
      out.mode = PlacementMode::kDeviceOnly;
      break;
    case headwise::v1::Placement::LAYER_OFFLOAD:
      out.mode = PlacementMode::kLayerOffload;
      break;
    case headwise::v1::Placement::HEAD_OFFLOAD:
      out.mode = PlacementMode::kHeadOffload;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown placement mode ", p.mode()));
  }
  if (p.has_device_head_groups()) {
    if (p.device_head_groups() < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement.device_head_groups must be >= 1, got ", p.device_head_groups()));
    }
    out.device_head_groups = p.device_head_groups();
  }
  if (p.has_prefetch_depth()) {
    if (p.prefetch_depth() < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("placement.prefetch_depth must be >= 0, got ", p.prefetch_depth()));
    }
    out.prefetch_depth = p.prefetch_depth();
  }
  return out;
}

std::vector<int64_t> ChooseSpillVictims(std::vector<SpillCandidate> candidates, int64_t count) {
  const auto colder = [](const SpillCandidate& a, const SpillCandidate& b) {
    return std::tie(a.last_touched_step, a.first_position, a.handle) <
           std::tie(b.last_touched_step, b.first_position, b.handle);
  };
  count = std::clamp<int64_t>(count, 0, static_cast<int64_t>(candidates.size()));
  std::partial_sort(candidates.begin(), candidates.begin() + count, candidates.end(), colder);
  std::vector<int64_t> out;
  out.reserve(count);
  for (int64_t i = 0; i < count; ++i) out.push_back(candidates[i].handle);
  return out;
}

}  // namespace headwise
