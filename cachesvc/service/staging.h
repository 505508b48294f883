// Staging regions: POSIX shared-memory objects through which clients on the same host pass
// large tensors without copying them through protobuf. The daemon creates each object
// (shm_open with a random name, O_CREAT | O_EXCL, mode 0600), sizes and maps it, and binds it to
// the tenant that asked; the client maps the same name. CloseStaging (or daemon shutdown)
// unmaps and shm_unlinks it.
#ifndef HEADWISE_CACHESVC_SERVICE_STAGING_H_
#define HEADWISE_CACHESVC_SERVICE_STAGING_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/random/random.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"

namespace headwise {

// One mapped region. Kept alive by shared_ptr while a request uses it, so a concurrent close
// unlinks the name at once but unmaps only when the last user is done.
class StagingRegion {
 public:
  StagingRegion(std::string id, std::string shm_name, std::string tenant, std::byte* base,
                uint64_t size);
  // Unmaps. The name is unlinked by the registry, not here.
  ~StagingRegion();
  StagingRegion(const StagingRegion&) = delete;
  StagingRegion& operator=(const StagingRegion&) = delete;

  const std::string& id() const { return id_; }
  const std::string& shm_name() const { return shm_name_; }
  const std::string& tenant() const { return tenant_; }
  uint64_t size() const { return size_; }

  // The bytes [offset, offset + length). INVALID_ARGUMENT unless the range lies inside the
  // region (overflow-safe).
  absl::StatusOr<absl::Span<std::byte>> Range(uint64_t offset, uint64_t length) const;

 private:
  const std::string id_;
  const std::string shm_name_;
  const std::string tenant_;
  std::byte* const base_;
  const uint64_t size_;
};

class StagingRegistry {
 public:
  // `max_region_bytes`: the largest region Open accepts.
  explicit StagingRegistry(uint64_t max_region_bytes);
  // Unlinks and unmaps every region still open.
  ~StagingRegistry();

  // Creates a region of `size` bytes for `tenant`. INVALID_ARGUMENT for size 0 or above the
  // maximum; RESOURCE_EXHAUSTED past the tenant's region count or byte quota (0 = unlimited);
  // INTERNAL when the kernel refuses (shm_open, ftruncate, mmap errors, errno in the message).
  absl::StatusOr<std::shared_ptr<StagingRegion>> Open(const std::string& tenant, uint64_t size,
                                                      uint64_t max_regions, uint64_t max_bytes);
  // The region `id` of `tenant`; INVALID_ARGUMENT when there is none (a tenant never sees
  // another tenant's regions).
  absl::StatusOr<std::shared_ptr<StagingRegion>> Find(const std::string& tenant,
                                                      const std::string& id) const;
  // shm_unlinks the region and forgets it; its mapping goes with its last user.
  // INVALID_ARGUMENT as Find.
  absl::Status Close(const std::string& tenant, const std::string& id);
  // Closes every region (shutdown).
  void CloseAll();

  int64_t open_regions() const;

  // Unlinks the staging objects that daemons killed without a shutdown (kill -9, a crash) left
  // in /dev/shm: names "headwise-<pid>-*" owned by this user whose <pid> no longer runs.
  // Returns how many were removed. Called once at start, before any region is created.
  static int RemoveOrphans();

 private:
  const uint64_t max_region_bytes_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<StagingRegion>> regions_ ABSL_GUARDED_BY(mu_);
  absl::BitGen bitgen_ ABSL_GUARDED_BY(mu_);
};

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_SERVICE_STAGING_H_
