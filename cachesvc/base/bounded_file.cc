#include "cachesvc/base/bounded_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace headwise {
namespace {

std::string Describe(const BoundedReadOptions& options, const std::string& path) {
  return options.description.empty() ? absl::StrCat("file '", path, "'") : options.description;
}

// The Status for a failed open(2) with `error` (errno).
absl::Status OpenError(int error, const std::string& what) {
  const std::string reason = std::strerror(error);
  switch (error) {
    case ENOENT:
    case ENOTDIR:
      return absl::NotFoundError(absl::StrCat(what, " does not exist"));
    case EACCES:
    case EPERM:
      return absl::PermissionDeniedError(absl::StrCat(what, " cannot be opened: ", reason));
    case ELOOP:
      return absl::FailedPreconditionError(
          absl::StrCat(what, " is a symbolic link, which is not followed"));
    case ENXIO:  // A socket, or a device without a driver.
      return absl::FailedPreconditionError(absl::StrCat(what, " is not a regular file"));
    default:
      return absl::UnavailableError(absl::StrCat(what, " cannot be opened: ", reason));
  }
}

// Reads the open file `fd` (which the caller closes) as the header describes.
absl::StatusOr<std::string> ReadOpenFile(int fd, const BoundedReadOptions& options,
                                         const std::string& what) {
  struct stat st;
  if (fstat(fd, &st) != 0) {
    return absl::UnavailableError(absl::StrCat(what, ": fstat: ", std::strerror(errno)));
  }
  if (!S_ISREG(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(
        what, " is not a regular file (a directory, device, FIFO or socket is never read)"));
  }
  const auto too_large = [&] {
    return absl::FailedPreconditionError(
        absl::StrCat(what, " is larger than the limit of ", options.max_bytes, " bytes"));
  };
  if (st.st_size < 0 || static_cast<uint64_t>(st.st_size) > options.max_bytes) return too_large();
  // One byte more than the limit is asked for, so that a file that grew since fstat is caught.
  const uint64_t want = options.max_bytes + 1;
  std::string text(static_cast<size_t>(std::min<uint64_t>(want, uint64_t(st.st_size) + 1)), '\0');
  uint64_t have = 0;
  while (have < want) {
    if (have == text.size()) text.resize(static_cast<size_t>(std::min(want, have * 2 + 4096)));
    const ssize_t n = read(fd, text.data() + have, text.size() - have);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return absl::DataLossError(absl::StrCat(what, ": read: ", std::strerror(errno)));
    if (n == 0) break;
    have += static_cast<uint64_t>(n);
  }
  if (have > options.max_bytes) return too_large();
  text.resize(static_cast<size_t>(have));
  return text;
}

constexpr int kOpenFlags = O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY;

}  // namespace

ScopedFd::~ScopedFd() {
  if (fd_ >= 0) close(fd_);
}

ScopedFd& ScopedFd::operator=(ScopedFd&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) close(fd_);
    fd_ = other.fd_;
    other.fd_ = -1;
  }
  return *this;
}

absl::StatusOr<std::string> ReadBoundedFile(const std::string& path,
                                            const BoundedReadOptions& options) {
  const std::string what = Describe(options, path);
  int fd;
  do {
    fd = open(path.c_str(), kOpenFlags | (options.follow_final_symlink ? 0 : O_NOFOLLOW));
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return OpenError(errno, what);
  ScopedFd closer(fd);
  return ReadOpenFile(fd, options, what);
}

absl::StatusOr<std::string> ReadBoundedFileAt(int dir_fd, const std::string& name,
                                              const BoundedReadOptions& options) {
  const std::string what = Describe(options, name);
  if (name.empty() || name.find('/') != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": not a single path component"));
  }
  int fd;
  do {
    fd = openat(dir_fd, name.c_str(), kOpenFlags | O_NOFOLLOW);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return OpenError(errno, what);
  ScopedFd closer(fd);
  return ReadOpenFile(fd, options, what);
}

}  // namespace headwise
