#include "cachesvc/service/staging.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace headwise {
namespace {

absl::Status Errno(const std::string& what) {
  return absl::InternalError(absl::StrCat(what, ": ", std::strerror(errno)));
}

}  // namespace

StagingRegion::StagingRegion(std::string id, std::string shm_name, std::string tenant,
                             std::byte* base, uint64_t size)
    : id_(std::move(id)),
      shm_name_(std::move(shm_name)),
      tenant_(std::move(tenant)),
      base_(base),
      size_(size) {}

StagingRegion::~StagingRegion() { munmap(base_, size_); }

absl::StatusOr<absl::Span<std::byte>> StagingRegion::Range(uint64_t offset, uint64_t length) const {
  if (offset > size_ || length > size_ - offset) {
    return absl::InvalidArgumentError(absl::StrCat("staged range [", offset, ", +", length,
                                                   ") is outside region ", id_, " of ", size_,
                                                   " bytes"));
  }
  return absl::Span<std::byte>(base_ + offset, length);
}

StagingRegistry::StagingRegistry(uint64_t max_region_bytes) : max_region_bytes_(max_region_bytes) {}

StagingRegistry::~StagingRegistry() { CloseAll(); }

absl::StatusOr<std::shared_ptr<StagingRegion>> StagingRegistry::Open(const std::string& tenant,
                                                                     uint64_t size,
                                                                     uint64_t max_regions,
                                                                     uint64_t max_bytes) {
  if (size == 0 || size > max_region_bytes_) {
    return absl::InvalidArgumentError(
        absl::StrCat("staging size ", size, " is not in [1, ", max_region_bytes_, "]"));
  }
  absl::MutexLock lock(&mu_);
  uint64_t count = 0, bytes = 0;
  for (const auto& [id, region] : regions_) {
    if (region->tenant() == tenant) {
      ++count;
      bytes += region->size();
    }
  }
  if (max_regions != 0 && count + 1 > max_regions) {
    return absl::ResourceExhaustedError(
        absl::StrCat("tenant quota: at most ", max_regions, " staging regions"));
  }
  if (max_bytes != 0 && bytes + size > max_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("tenant quota: at most ", max_bytes, " staging bytes"));
  }
  std::string id, name;
  int fd = -1;
  for (int attempt = 0; attempt < 8 && fd < 0; ++attempt) {
    id = absl::StrFormat("%016x%016x", absl::Uniform<uint64_t>(bitgen_),
                         absl::Uniform<uint64_t>(bitgen_));
    name = absl::StrCat("/headwise-", getpid(), "-", id);
    fd = shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0 && errno != EEXIST) return Errno("shm_open");
  }
  if (fd < 0) return absl::InternalError("shm_open: no free name");
  // The umask may have cleared bits but never adds any; make the mode exact anyway.
  fchmod(fd, 0600);
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
    absl::Status status = Errno("ftruncate");
    close(fd);
    shm_unlink(name.c_str());
    return status;
  }
  void* base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (base == MAP_FAILED) {
    absl::Status status = Errno("mmap");
    shm_unlink(name.c_str());
    return status;
  }
  auto region =
      std::make_shared<StagingRegion>(id, name, tenant, static_cast<std::byte*>(base), size);
  regions_[id] = region;
  return region;
}

absl::StatusOr<std::shared_ptr<StagingRegion>> StagingRegistry::Find(const std::string& tenant,
                                                                     const std::string& id) const {
  absl::MutexLock lock(&mu_);
  auto it = regions_.find(id);
  if (it == regions_.end() || it->second->tenant() != tenant) {
    return absl::InvalidArgumentError(absl::StrCat("unknown staging region '", id, "'"));
  }
  return it->second;
}

absl::Status StagingRegistry::Close(const std::string& tenant, const std::string& id) {
  std::shared_ptr<StagingRegion> region;
  {
    absl::MutexLock lock(&mu_);
    auto it = regions_.find(id);
    if (it == regions_.end() || it->second->tenant() != tenant) {
      return absl::InvalidArgumentError(absl::StrCat("unknown staging region '", id, "'"));
    }
    region = std::move(it->second);
    regions_.erase(it);
  }
  shm_unlink(region->shm_name().c_str());
  return absl::OkStatus();
}

void StagingRegistry::CloseAll() {
  absl::flat_hash_map<std::string, std::shared_ptr<StagingRegion>> regions;
  {
    absl::MutexLock lock(&mu_);
    regions.swap(regions_);
  }
  for (const auto& [id, region] : regions) shm_unlink(region->shm_name().c_str());
}

int64_t StagingRegistry::open_regions() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(regions_.size());
}

int StagingRegistry::RemoveOrphans() {
  constexpr std::string_view kPrefix = "headwise-";
  std::error_code ec;
  int removed = 0;
  for (const auto& entry : std::filesystem::directory_iterator("/dev/shm", ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(kPrefix, 0) != 0) continue;
    const size_t dash = name.find('-', kPrefix.size());
    if (dash == std::string::npos) continue;
    int pid = 0;
    if (!absl::SimpleAtoi(name.substr(kPrefix.size(), dash - kPrefix.size()), &pid) || pid <= 0) {
      continue;
    }
    struct stat st;
    if (stat(entry.path().c_str(), &st) != 0 || st.st_uid != geteuid()) continue;
    if (kill(pid, 0) == 0 || errno != ESRCH) continue;  // Its daemon still runs.
    if (shm_unlink(("/" + name).c_str()) == 0) ++removed;
  }
  return removed;
}

}  // namespace headwise
