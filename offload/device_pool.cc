#include "offload/device_pool.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "cachesvc/base/status_macros.h"

namespace headwise {
namespace {

struct Arena {
  std::byte* base = nullptr;
  std::function<void()> release;
};

// The seam for real device memory. A CUDA build will cudaSetDevice + cudaMalloc here and return
// UNAVAILABLE when cudaGetDeviceCount reports no device (not an error: the caller emulates).
absl::StatusOr<Arena> AllocateCudaArena(int /*device_ordinal*/, uint64_t /*bytes*/) {
#if defined(HEADWISE_HAVE_CUDA)
  return absl::UnimplementedError("CUDA device pool not implemented yet");
#else
  return absl::UnavailableError("built without CUDA");
#endif
}

absl::StatusOr<Arena> AllocateEmulatedArena(uint64_t bytes) {
  // Private anonymous memory, reserved lazily: untouched slots cost nothing, like device memory
  // that was allocated but never written.
  void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "mmap of ", bytes, " bytes for the emulated device pool: ", std::strerror(errno)));
  }
  return Arena{static_cast<std::byte*>(base), [base, bytes] { munmap(base, bytes); }};
}

}  // namespace

absl::StatusOr<std::unique_ptr<DevicePool>> DevicePool::Create(const DevicePoolOptions& options) {
  ASSIGN_OR_RETURN(const uint64_t num_slots, SlotsForBudget(options.pool));
  const uint64_t bytes = num_slots * static_cast<uint64_t>(options.pool.slot_bytes);
  absl::StatusOr<Arena> cuda = AllocateCudaArena(options.device_ordinal, bytes);
  if (cuda.ok()) {
    return std::unique_ptr<DevicePool>(new DevicePool(
        options, num_slots, Memory{.base = cuda->base, .host_accessible = false, .emulated = false},
        options.device_ordinal, std::move(cuda->release)));
  }
  if (!options.allow_emulation) {
    return absl::FailedPreconditionError(
        absl::StrCat("no usable GPU (", cuda.status().message(), ") and emulation disallowed"));
  }
  ASSIGN_OR_RETURN(Arena arena, AllocateEmulatedArena(bytes));
  return std::unique_ptr<DevicePool>(new DevicePool(
      options, num_slots, Memory{.base = arena.base, .host_accessible = true, .emulated = true},
      /*device_ordinal=*/-1, std::move(arena.release)));
}

DevicePool::DevicePool(const DevicePoolOptions& options, uint64_t num_slots, Memory memory,
                       int device_ordinal, std::function<void()> release)
    : PagePool(Tier::kDevice, options.pool, num_slots, memory),
      device_ordinal_(device_ordinal),
      release_(std::move(release)) {}

DevicePool::~DevicePool() {
  if (release_) release_();
}

}  // namespace headwise
