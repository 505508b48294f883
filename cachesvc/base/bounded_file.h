// Size-bounded reading of regular files. Every file the daemon reads (its config, TLS keys and
// certificates, head-pattern files) goes through these functions, so that no file, whoever names
// it, can make the daemon block (a FIFO), allocate without bound (/dev/zero, a growing log) or
// read a device. Error messages name the file (as the caller describes it) and never contain any
// of its bytes.
#ifndef HEADWISE_CACHESVC_BASE_BOUNDED_FILE_H_
#define HEADWISE_CACHESVC_BASE_BOUNDED_FILE_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace headwise {

// Owns a file descriptor and closes it on destruction. -1 holds nothing. Move-only.
class ScopedFd {
 public:
  explicit ScopedFd(int fd = -1) : fd_(fd) {}
  ~ScopedFd();
  ScopedFd(ScopedFd&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
  ScopedFd& operator=(ScopedFd&& other) noexcept;
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;

  int get() const { return fd_; }

 private:
  int fd_;
};

struct BoundedReadOptions {
  // The most bytes the file may hold; a larger file is refused without reading past this bound
  // (a file that grows while it is read is refused too). Default: 1 MiB.
  uint64_t max_bytes = uint64_t{1} << 20;
  // Whether a symbolic link as the last component of the path is followed. False opens with
  // O_NOFOLLOW and refuses a link. Paths an operator writes (config, TLS files) may be links;
  // files looked up on behalf of a client must not be. Default: false.
  bool follow_final_symlink = false;
  // How the file is named in error messages, e.g. "config file '/etc/headwise.textproto'" or
  // "pattern 'Llama/run'". Empty: "file '<path>'". Default: empty.
  std::string description;
};

// Reads the whole file at `path`. The file is opened read-only, close-on-exec and non-blocking
// (a FIFO does not block the open), then must be a regular file (fstat S_ISREG) of at most
// options.max_bytes. Errors (none echoes file contents):
//   NOT_FOUND          the path (or a directory on it) does not exist;
//   PERMISSION_DENIED  no right to open it;
//   FAILED_PRECONDITION  a symbolic link while !follow_final_symlink, not a regular file
//                      (directory, device such as /dev/zero, FIFO, socket), or larger than
//                      options.max_bytes (also when it grows while being read);
//   UNAVAILABLE / DATA_LOSS  other open / read errors.
absl::StatusOr<std::string> ReadBoundedFile(const std::string& path,
                                            const BoundedReadOptions& options = {});

// As ReadBoundedFile, for `name` opened with openat(dir_fd, name, ...): `name` is a single
// component (no '/'), which is never followed when it is a symbolic link (O_NOFOLLOW, whatever
// options.follow_final_symlink says). REQUIRES: dir_fd is an open directory.
absl::StatusOr<std::string> ReadBoundedFileAt(int dir_fd, const std::string& name,
                                              const BoundedReadOptions& options);

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_BASE_BOUNDED_FILE_H_
