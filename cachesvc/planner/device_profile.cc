#include "cachesvc/planner/device_profile.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace headwise {
namespace {

constexpr int64_t kGiB = int64_t{1} << 30;

// Published figures. Link and disk rates are effective rates, below the raw signalling rate:
// PCIe 5.0 x16 is 64 GB/s raw per direction, large pinned copies reach about 55 GB/s; PCIe 4.0
// x16 is 32 GB/s raw, about 25 GB/s effective.
DeviceProfile H100Pcie5() {
  return {.name = "H100-PCIe5",
          .description =
              "H100 SXM5 80GB: HBM3 3.35 TB/s, 989 TFLOP/s dense bf16 (NVIDIA "
              "datasheet); PCIe 5.0 x16 host link ~55 GB/s effective; Gen5 NVMe "
              "~12 GB/s",
          .device_bytes_per_s = 3.35e12,
          .link_bytes_per_s = 55e9,
          .disk_bytes_per_s = 12e9,
          .flops_per_s = 989e12,
          .device_memory_bytes = 80 * kGiB};
}

DeviceProfile A100Pcie4() {
  return {.name = "A100-PCIe4",
          .description =
              "A100 80GB PCIe: HBM2e 1.935 TB/s, 312 TFLOP/s dense bf16 (NVIDIA "
              "datasheet); PCIe 4.0 x16 ~25 GB/s effective; Gen4 NVMe ~7 GB/s",
          .device_bytes_per_s = 1.935e12,
          .link_bytes_per_s = 25e9,
          .disk_bytes_per_s = 7e9,
          .flops_per_s = 312e12,
          .device_memory_bytes = 80 * kGiB};
}

DeviceProfile Rtx4090Pcie4() {
  return {.name = "RTX4090-PCIe4",
          .description =
              "RTX 4090 24GB: GDDR6X 1.008 TB/s, 165 TFLOP/s dense bf16 with fp32 "
              "accumulate (Ada whitepaper); PCIe 4.0 x16 ~25 GB/s effective; Gen4 "
              "NVMe ~7 GB/s",
          .device_bytes_per_s = 1.008e12,
          .link_bytes_per_s = 25e9,
          .disk_bytes_per_s = 7e9,
          .flops_per_s = 165e12,
          .device_memory_bytes = 24 * kGiB};
}

int Threads() { return std::max(1u, std::thread::hardware_concurrency()); }

// Without a GPU the device tier is a host-memory pool (architecture.md "Tiers"), so attention
// reads run at the memory bandwidth and a host -> "device" copy is a memcpy, which reads and
// writes every byte: half the read bandwidth.
DeviceProfile Cpu(bool measure) {
  const double bw = measure ? MeasureMemoryBandwidth() : 0.0;
  const int64_t phys =
      static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<int64_t>(sysconf(_SC_PAGESIZE));
  return {
      .name = "cpu",
      .description = absl::StrCat(
          "this machine: memory read bandwidth measured now (reduction over 256 MiB, ", Threads(),
          " threads); link = bandwidth / 2 (memcpy into the emulated device pool); disk "
          "2 GB/s and FLOP rate threads x 32 GFLOP/s (8-lane f32 FMA at ~2 GHz) are "
          "assumptions, override with --disk-bw and --flops"),
      .device_bytes_per_s = bw,
      .link_bytes_per_s = bw / 2,
      .disk_bytes_per_s = 2e9,
      .flops_per_s = Threads() * 32e9,
      .device_memory_bytes = phys > 0 ? phys : 16 * kGiB,
      .measured = measure};
}

}  // namespace

absl::Status ValidateDeviceProfile(const DeviceProfile& profile) {
  const struct {
    const char* name;
    double value;
  } rates[] = {{"device bandwidth", profile.device_bytes_per_s},
               {"link bandwidth", profile.link_bytes_per_s},
               {"disk bandwidth", profile.disk_bytes_per_s},
               {"FLOP rate", profile.flops_per_s}};
  for (const auto& rate : rates) {
    if (!std::isfinite(rate.value) || rate.value <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("profile ", profile.name, ": ", rate.name,
                                                     " must be positive, got ", rate.value));
    }
  }
  if (profile.device_memory_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("profile ", profile.name, ": device memory must be positive"));
  }
  return absl::OkStatus();
}

std::vector<std::string> DeviceProfileNames() {
  return {"H100-PCIe5", "A100-PCIe4", "RTX4090-PCIe4", "cpu"};
}

absl::StatusOr<DeviceProfile> DeviceProfileByName(std::string_view name, bool measure_cpu) {
  const std::string lower = absl::AsciiStrToLower(std::string(name));
  if (lower == "h100-pcie5") return H100Pcie5();
  if (lower == "a100-pcie4") return A100Pcie4();
  if (lower == "rtx4090-pcie4") return Rtx4090Pcie4();
  if (lower == "cpu") return Cpu(measure_cpu);
  return absl::InvalidArgumentError(
      absl::StrCat("unknown device profile '", std::string(name),
                   "'; presets: ", absl::StrJoin(DeviceProfileNames(), ", ")));
}

double MeasureMemoryBandwidth(int64_t buffer_bytes) {
  const int threads = Threads();
  const size_t words = static_cast<size_t>(std::max<int64_t>(buffer_bytes, 1 << 20)) / 8;
  std::unique_ptr<uint64_t[]> buffer(new uint64_t[words]);
  const size_t chunk = (words + threads - 1) / threads;
  std::vector<uint64_t> sums(threads);
  // Each thread touches (first pass) and later reduces its own slice, so pages sit on the NUMA
  // node of the thread that reads them.
  auto run = [&](bool init) {
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t, init] {
        const size_t begin = std::min(words, t * chunk);
        const size_t end = std::min(words, begin + chunk);
        uint64_t* data = buffer.get();
        if (init) {
          for (size_t i = begin; i < end; ++i) data[i] = i;
          return;
        }
        uint64_t a = 0, b = 0, c = 0, d = 0;
        size_t i = begin;
        for (; i + 4 <= end; i += 4) {
          a += data[i];
          b += data[i + 1];
          c += data[i + 2];
          d += data[i + 3];
        }
        for (; i < end; ++i) a += data[i];
        sums[t] = a + b + c + d;
      });
    }
    for (std::thread& thread : pool) thread.join();
  };
  run(/*init=*/true);
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    run(/*init=*/false);
    const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
    // The sums are consumed so the reduction cannot be optimised away.
    volatile uint64_t sink = 0;
    for (uint64_t s : sums) sink = sink + s;
    best = std::max(best, static_cast<double>(words * 8) / elapsed.count());
  }
  return best;
}

}  // namespace headwise
