// DevicePool: the device tier. With a CUDA build and a GPU present, slots are device memory
// from one cudaMalloc; otherwise (this build, or no GPU) an emulated arena of host memory with
// the same budget and accounting stands in, and emulated() / Stats().emulated say so.
//
// The CUDA path is a seam in device_pool.cc (AllocateCudaArena), compiled only with
// HEADWISE_HAVE_CUDA; it is not implemented yet, so every pool is emulated today.
#ifndef HEADWISE_OFFLOAD_DEVICE_POOL_H_
#define HEADWISE_OFFLOAD_DEVICE_POOL_H_

#include <functional>
#include <memory>

#include "absl/status/statusor.h"
#include "offload/page_pool.h"

namespace headwise {

struct DevicePoolOptions {
  PagePoolOptions pool;
  // CUDA device ordinal for a real device pool. Default: 0.
  int device_ordinal = 0;
  // Fall back to an emulated host arena when no GPU can be used. When false and no GPU can be
  // used, Create returns FAILED_PRECONDITION. Default: true.
  bool allow_emulation = true;
};

// Thread-safety: as PagePool.
class DevicePool : public PagePool {
 public:
  // INVALID_ARGUMENT for bad options; FAILED_PRECONDITION when no GPU and !allow_emulation;
  // RESOURCE_EXHAUSTED / INTERNAL when the memory cannot be reserved.
  static absl::StatusOr<std::unique_ptr<DevicePool>> Create(const DevicePoolOptions& options);
  // Releases the memory. REQUIRES: no copy engine still uses this pool.
  ~DevicePool() override;

  // The CUDA device ordinal, or -1 when emulated.
  int device_ordinal() const { return device_ordinal_; }

 private:
  DevicePool(const DevicePoolOptions& options, uint64_t num_slots, Memory memory,
             int device_ordinal, std::function<void()> release);

  const int device_ordinal_;
  std::function<void()> release_;
};

}  // namespace headwise

#endif  // HEADWISE_OFFLOAD_DEVICE_POOL_H_
