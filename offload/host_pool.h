// HostPool: the host tier. Slot memory is an anonymous shared-memory file (memfd_create) mapped
// MAP_SHARED, so a local client can map the same bytes zero-copy: the daemon passes fd() over
// a Unix socket (SCM_RIGHTS) and the client mmaps mapped_bytes() of it. The file is sealed
// against shrinking and growing, so a client cannot make the daemon's mapping fault. Nothing is
// created in /dev/shm or any other directory; the memory is released when the pool and every
// client mapping are gone.
#ifndef HEADWISE_OFFLOAD_HOST_POOL_H_
#define HEADWISE_OFFLOAD_HOST_POOL_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "offload/page_pool.h"

namespace headwise {

struct HostPoolOptions {
  PagePoolOptions pool;
  // Debug name of the memfd (visible in /proc/<pid>/fd as "memfd:<name>"). Default:
  // "headwise-host".
  std::string name = "headwise-host";
  // Touch every page at creation (MAP_POPULATE) so first use does not page-fault and a budget the
  // machine cannot back fails at creation instead of later. Default: false.
  bool prefault = false;
};

// Thread-safety: as PagePool. fd() and mapped_bytes() are immutable.
class HostPool : public PagePool {
 public:
  // INVALID_ARGUMENT for bad options; INTERNAL (with errno text) when memfd_create, ftruncate
  // or mmap fails.
  static absl::StatusOr<std::unique_ptr<HostPool>> Create(const HostPoolOptions& options);
  // Unmaps the memory and closes the fd. REQUIRES: no copy engine still uses this pool.
  ~HostPool() override;

  // The memfd backing the pool; owned by the pool (dup() it to hand it out).
  int fd() const { return fd_; }
  // Bytes of the mapping: capacity_bytes().
  uint64_t mapped_bytes() const { return capacity_bytes(); }
  const std::string& name() const { return name_; }

 private:
  HostPool(const HostPoolOptions& options, uint64_t num_slots, std::byte* base, int fd);

  const int fd_;
  const std::string name_;
};

}  // namespace headwise

#endif  // HEADWISE_OFFLOAD_HOST_POOL_H_
