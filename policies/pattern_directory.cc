#include "policies/pattern_directory.h"

#include <fcntl.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cachesvc/base/bounded_file.h"
#include "cachesvc/base/status_macros.h"

namespace headwise {
namespace {

bool IsNameByte(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '=' || c == '-';
}

std::string Quoted(std::string_view name) {
  return absl::StrCat("pattern '", std::string(name), "'");
}

// The '/'-separated components of `name` (empty ones included).
std::vector<std::string> Components(std::string_view name) {
  std::vector<std::string> out;
  for (size_t start = 0;;) {
    const size_t slash = name.find('/', start);
    out.emplace_back(name.substr(start, slash - start));
    if (slash == std::string_view::npos) return out;
    start = slash + 1;
  }
}

// Opens directory component `component` of pattern `name` below `parent` without following a
// symbolic link.
absl::StatusOr<ScopedFd> OpenComponent(int parent, const std::string& component,
                                       std::string_view name) {
  int fd;
  do {
    fd = openat(parent, component.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd >= 0) return ScopedFd(fd);
  const int error = errno;
  struct stat st;
  const bool is_link =
      fstatat(parent, component.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(st.st_mode);
  if (error == ELOOP || is_link) {
    return absl::FailedPreconditionError(
        absl::StrCat(Quoted(name), ": '", component,
                     "' is a symbolic link; links in the pattern directory ", "are not followed"));
  }
  if (error == ENOENT || error == ENOTDIR) {
    return absl::NotFoundError(absl::StrCat("no ", Quoted(name), " in the pattern directory"));
  }
  if (error == EACCES || error == EPERM) {
    return absl::PermissionDeniedError(
        absl::StrCat(Quoted(name), ": '", component, "' cannot be opened: ", std::strerror(error)));
  }
  return absl::UnavailableError(
      absl::StrCat(Quoted(name), ": '", component, "' cannot be opened: ", std::strerror(error)));
}

}  // namespace

absl::Status ValidatePatternName(std::string_view name) {
  if (name.empty()) return absl::InvalidArgumentError("pattern name is empty");
  if (name.size() > kMaxPatternNameBytes) {
    return absl::InvalidArgumentError(absl::StrCat("pattern name is ", name.size(),
                                                   " bytes; the limit is ", kMaxPatternNameBytes));
  }
  for (char c : name) {
    if (c != '/' && !IsNameByte(c)) {
      return absl::InvalidArgumentError(
          "pattern name may hold only [A-Za-z0-9._=-] and '/' between components");
    }
  }
  for (const std::string& component : Components(name)) {
    if (component.empty() || component == "." || component == "..") {
      return absl::InvalidArgumentError(absl::StrCat(
          "pattern name '", std::string(name),
          "' is not a relative name: no leading, trailing or doubled '/', no '.' or '..'"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<PatternDirectory>> PatternDirectory::Open(const std::string& path) {
  if (path.empty()) return absl::InvalidArgumentError("pattern directory path is empty");
  struct stat st;
  if (stat(path.c_str(), &st) != 0) {
    const int error = errno;
    if (error == ENOENT || error == ENOTDIR) {
      return absl::NotFoundError(absl::StrCat("pattern directory '", path, "' does not exist"));
    }
    return absl::UnavailableError(
        absl::StrCat("pattern directory '", path, "': ", std::strerror(error)));
  }
  if (!S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("pattern directory '", path, "' is not a directory"));
  }
  return std::unique_ptr<PatternDirectory>(new PatternDirectory(path));
}

absl::StatusOr<std::string> PatternDirectory::ReadPattern(std::string_view name) const {
  return ReadPatternFile(name, kPatternFileName, kMaxPatternFileBytes);
}

absl::StatusOr<std::string> PatternDirectory::ReadPatternFile(std::string_view name,
                                                              const char* file_name,
                                                              uint64_t max_bytes) const {
  RETURN_IF_ERROR(ValidatePatternName(name));
  int root;
  do {
    root = open(path_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  } while (root < 0 && errno == EINTR);
  if (root < 0) {
    // The directory's path is the operator's business: the client is told only that it is gone.
    return absl::UnavailableError("the daemon's pattern directory cannot be opened");
  }
  ScopedFd dir(root);
  for (const std::string& component : Components(name)) {
    ASSIGN_OR_RETURN(dir, OpenComponent(dir.get(), component, name));
  }
  BoundedReadOptions options;
  options.max_bytes = max_bytes;
  options.description = absl::StrCat(Quoted(name), " (", file_name, ")");
  return ReadBoundedFileAt(dir.get(), file_name, options);
}

absl::StatusOr<DuoAttentionGates> PatternDirectory::LoadGates(std::string_view name) const {
  ASSIGN_OR_RETURN(const std::string text, ReadPattern(name));
  return ParseDuoAttentionGates(text, Quoted(name));
}

}  // namespace headwise
