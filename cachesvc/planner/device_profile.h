// Device profiles for the planner's decode-time model: the bandwidths and FLOP rate of one
// accelerator and its host link. Presets carry published figures; the `cpu` profile measures
// this machine's memory bandwidth when it is created.
#ifndef HEADWISE_CACHESVC_PLANNER_DEVICE_PROFILE_H_
#define HEADWISE_CACHESVC_PLANNER_DEVICE_PROFILE_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace headwise {

// Rates are in bytes (or FLOPs) per second, decimal units (1 GB/s = 1e9 B/s). Plain value type.
struct DeviceProfile {
  // Preset name ("H100-PCIe5", ...) or "custom".
  std::string name;
  // One line: what the figures are and where they come from.
  std::string description;
  // Device memory (HBM / GDDR) read bandwidth: what attention over resident KV runs at.
  double device_bytes_per_s = 0;
  // Host -> device link bandwidth, effective (what a large pinned cudaMemcpyAsync reaches).
  double link_bytes_per_s = 0;
  // Disk -> host read bandwidth (sequential, large blocks).
  double disk_bytes_per_s = 0;
  // Dense FLOP rate at the KV dtype (bf16/f16 tensor cores on GPUs) for the QK and PV products.
  double flops_per_s = 0;
  // Device memory size; the planner's default device KV budget.
  int64_t device_memory_bytes = 0;
  // True when device_bytes_per_s was measured on this machine rather than taken from a preset.
  bool measured = false;
};

// OK when every rate and the memory size are positive and finite; INVALID_ARGUMENT naming the
// first bad field otherwise.
absl::Status ValidateDeviceProfile(const DeviceProfile& profile);

// Preset names, in display order: "H100-PCIe5", "A100-PCIe4", "RTX4090-PCIe4", "cpu".
std::vector<std::string> DeviceProfileNames();

// The preset `name` (case-insensitive). "cpu" measures memory bandwidth (MeasureMemoryBandwidth;
// about a second) unless `measure_cpu` is false, in which case its bandwidth fields are 0 and
// must be filled in by the caller. INVALID_ARGUMENT for an unknown name, listing the presets.
absl::StatusOr<DeviceProfile> DeviceProfileByName(std::string_view name, bool measure_cpu = true);

// Read bandwidth of this machine's memory in bytes/s: the best of three timed reductions over a
// `buffer_bytes` buffer, split across std::thread::hardware_concurrency() threads.
// REQUIRES: buffer_bytes >= 1 MiB. Thread-safe (allocates its own buffer).
double MeasureMemoryBandwidth(int64_t buffer_bytes = int64_t{256} << 20);

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_PLANNER_DEVICE_PROFILE_H_
