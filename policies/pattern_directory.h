// The directory of DuoAttention head patterns a daemon serves, and the rules by which a client
// names one of them (architecture.md, "Security rule"): the daemon never opens a path a client
// sends. A client names a pattern; the daemon looks the name up inside the one directory its
// operator configured (DaemonConfig.pattern_dir) and reads only the file
// `<pattern_dir>/<name>/full_attention_heads.tsv`, laid out as the authors ship them in
// mit-han-lab/duo-attention attn_patterns/ (`<model>/<run>/full_attention_heads.tsv`).
#ifndef HEADWISE_POLICIES_PATTERN_DIRECTORY_H_
#define HEADWISE_POLICIES_PATTERN_DIRECTORY_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "policies/head_roles.h"

namespace headwise {

// The file a pattern name's directory must hold.
inline constexpr char kPatternFileName[] = "full_attention_heads.tsv";
// Longest pattern name, in bytes.
inline constexpr size_t kMaxPatternNameBytes = 256;
// Largest pattern file read: 1 MiB. A 128-layer x 128-head matrix of "%.17g\t" values is about
// 400 KiB; the shipped files are at most 26 KiB.
inline constexpr uint64_t kMaxPatternFileBytes = kMaxGatesFileBytes;
// The retrieval-score file a pattern directory may hold instead (or as well), in the Retrieval
// Head / HeadKV JSON format (policies/retrieval_roles.h), and its size bound: 8 MiB (the files
// keep one score per trial for every query head; Llama-2-7B's is about 1 MiB).
inline constexpr char kRetrievalScoresFileName[] = "head_scores.json";
inline constexpr uint64_t kMaxRetrievalScoresBytes = uint64_t{8} << 20;

// Checks a pattern name: 1..kMaxPatternNameBytes bytes of components separated by single '/',
// each component made of [A-Za-z0-9._=-] and neither "." nor ".."; no leading or trailing '/'.
// E.g. "Llama-3-8B-Instruct-Gradient-1048k/lr=0.02-reg=0.05-ctx=1000_32000-multi_passkey10".
// INVALID_ARGUMENT otherwise; the message quotes the name only when it passed the length and
// character checks (so it never echoes control bytes).
absl::Status ValidatePatternName(std::string_view name);

// A pattern directory. Immutable after Open; thread-safe. The directory is reopened by path on
// every lookup, so patterns added or replaced while the daemon runs are seen.
class PatternDirectory {
 public:
  // Checks that `path` (operator-chosen; it may be or contain symbolic links) is a directory.
  // NOT_FOUND when it does not exist, FAILED_PRECONDITION when it is not a directory,
  // INVALID_ARGUMENT when `path` is empty.
  static absl::StatusOr<std::unique_ptr<PatternDirectory>> Open(const std::string& path);

  const std::string& path() const { return path_; }

  // The bytes of `name`'s full_attention_heads.tsv. Each component of `name` is opened with
  // openat(O_NOFOLLOW) from the directory: a symbolic link anywhere below the directory is
  // refused (links cannot lead out of it), so the file read is always inside. Errors, which name
  // the pattern but never the directory's path nor any byte of a file:
  //   INVALID_ARGUMENT     `name` fails ValidatePatternName;
  //   NOT_FOUND            no such pattern (a component or the file is missing);
  //   FAILED_PRECONDITION  a component or the file is a symbolic link, the file is not a regular
  //                        file, or it is larger than kMaxPatternFileBytes;
  //   PERMISSION_DENIED / UNAVAILABLE / DATA_LOSS as ReadBoundedFile.
  absl::StatusOr<std::string> ReadPattern(std::string_view name) const;
  // The same for the file `file_name` (a fixed name chosen by the caller, never by a client:
  // kPatternFileName or kRetrievalScoresFileName) of at most `max_bytes`.
  absl::StatusOr<std::string> ReadPatternFile(std::string_view name, const char* file_name,
                                              uint64_t max_bytes) const;

  // ReadPattern, then ParseDuoAttentionGates with source "pattern '<name>'".
  absl::StatusOr<DuoAttentionGates> LoadGates(std::string_view name) const;

 private:
  explicit PatternDirectory(std::string path) : path_(std::move(path)) {}

  std::string path_;
};

}  // namespace headwise

#endif  // HEADWISE_POLICIES_PATTERN_DIRECTORY_H_
