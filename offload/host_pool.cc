#include "offload/host_pool.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "cachesvc/base/status_macros.h"

namespace headwise {
namespace {

absl::Status ErrnoError(const char* what) {
  return absl::InternalError(absl::StrCat(what, ": ", std::strerror(errno)));
}

}  // namespace

absl::StatusOr<std::unique_ptr<HostPool>> HostPool::Create(const HostPoolOptions& options) {
  ASSIGN_OR_RETURN(const uint64_t num_slots, SlotsForBudget(options.pool));
  const uint64_t bytes = num_slots * static_cast<uint64_t>(options.pool.slot_bytes);
  const int fd = memfd_create(options.name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return ErrnoError("memfd_create");
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    absl::Status status = ErrnoError("ftruncate");
    close(fd);
    return status;
  }
  if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    absl::Status status = ErrnoError("fcntl(F_ADD_SEALS)");
    close(fd);
    return status;
  }
  const int flags = MAP_SHARED | (options.prefault ? MAP_POPULATE : 0);
  void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, flags, fd, 0);
  if (base == MAP_FAILED) {
    absl::Status status = ErrnoError("mmap");
    close(fd);
    return status;
  }
  return std::unique_ptr<HostPool>(
      new HostPool(options, num_slots, static_cast<std::byte*>(base), fd));
}

HostPool::HostPool(const HostPoolOptions& options, uint64_t num_slots, std::byte* base, int fd)
    : PagePool(Tier::kHost, options.pool, num_slots,
               Memory{.base = base, .host_accessible = true, .emulated = false}),
      fd_(fd),
      name_(options.name) {}

HostPool::~HostPool() {
  munmap(base(), capacity_bytes());
  close(fd_);
}

}  // namespace headwise
