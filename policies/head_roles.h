// Head roles: which (layer, kv head) keeps its whole context (RETRIEVAL) and which keeps only
// attention sinks plus a recent window (STREAMING), and where roles come from: uniformly, or
// from DuoAttention's learned gates (policies.md §2.2, §2.3).
#ifndef HEADWISE_POLICIES_HEAD_ROLES_H_
#define HEADWISE_POLICIES_HEAD_ROLES_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "cachesvc/base/ids.h"
#include "cachesvc/base/layout.h"
#include "headwise/v1/policy.pb.h"

namespace headwise {

// The one definition of a head's role. Everything else (eviction, accounting, placement,
// prefetch) reads roles through this enum.
enum class HeadRole : uint8_t {
  // Keeps the full context (it may still be offloaded; it is never evicted by role).
  kRetrieval = 0,
  // Keeps attention sinks plus a recent window (DuoAttention streaming head).
  kStreaming = 1,
};

// "retrieval" or "streaming".
std::string_view HeadRoleName(HeadRole role);

// A role for every (layer, kv head): a num_layers x num_kv_heads table. Plain value type;
// thread-compatible.
class HeadRoles {
 public:
  // An empty table (0 x 0).
  HeadRoles() = default;
  // A num_layers x num_kv_heads table with every entry `role`. REQUIRES: both >= 0.
  HeadRoles(int num_layers, int num_kv_heads, HeadRole role);

  int num_layers() const { return num_layers_; }
  int num_kv_heads() const { return num_kv_heads_; }

  // REQUIRES: 0 <= layer < num_layers(), 0 <= kv_head < num_kv_heads().
  HeadRole role(LayerId layer, HeadId kv_head) const { return roles_[Index(layer, kv_head)]; }
  void set_role(LayerId layer, HeadId kv_head, HeadRole role) {
    roles_[Index(layer, kv_head)] = role;
  }

  // How many heads have `role`.
  int Count(HeadRole role) const;
  // Count(kRetrieval) / (num_layers * num_kv_heads); 0 for an empty table.
  double RetrievalFraction() const;

  // One line per layer, 'R' for retrieval and 's' for streaming.
  std::string DebugString() const;

 private:
  size_t Index(LayerId layer, HeadId kv_head) const {
    return static_cast<size_t>(layer.value()) * num_kv_heads_ + kv_head.value();
  }

  int num_layers_ = 0;
  int num_kv_heads_ = 0;
  std::vector<HeadRole> roles_;  // Layer-major.
};

// Every head of `layout` gets `role`. Default role: kRetrieval.
HeadRoles UniformRoles(const ModelLayout& layout, HeadRole role = HeadRole::kRetrieval);

// DuoAttention gates alpha, one per (layer, kv head), each in [0, 1]. Stored as double because
// the authors' loader (np.loadtxt) reads them as float64 and takes the quantile in float64.
struct DuoAttentionGates {
  int num_layers = 0;
  int num_kv_heads = 0;
  // Layer-major: alpha[layer * num_kv_heads + kv_head].
  std::vector<double> alpha;

  double at(LayerId layer, HeadId kv_head) const {
    return alpha[static_cast<size_t>(layer.value()) * num_kv_heads + kv_head.value()];
  }
};

// How far outside [0, 1] a gate may lie and still be accepted (then clipped to [0, 1], as the
// authors' load_attn_pattern does). The shipped files hold trained values such as -0.0014.
inline constexpr double kGateClipTolerance = 0.01;

// Builds gates from a row-major matrix. INVALID_ARGUMENT when rows or columns are not positive,
// values.size() != rows * cols, or a value is NaN, infinite or further than kGateClipTolerance
// outside [0, 1]; values within the tolerance are clipped to [0, 1].
absl::StatusOr<DuoAttentionGates> GatesFromMatrix(int num_layers, int num_kv_heads,
                                                  absl::Span<const double> values);

// Parses the text of a `full_attention_heads.tsv`: rows = layers, tab-separated columns = kv
// heads. Like np.loadtxt, blank lines and lines starting with '#' are skipped and a trailing
// '\r' is ignored. INVALID_ARGUMENT, naming `source_name` and the 1-based line (and column) at
// fault and what was expected there, when the text has no rows, rows differ in length, a field
// is empty or not a number, or a value is out of range (see GatesFromMatrix). No message quotes
// the text: the file may not be a pattern file at all, and its bytes are not the client's to see.
absl::StatusOr<DuoAttentionGates> ParseDuoAttentionGates(std::string_view tsv_text,
                                                         std::string_view source_name);

// The most bytes LoadDuoAttentionGates reads. Default of its `max_bytes`.
inline constexpr uint64_t kMaxGatesFileBytes = uint64_t{1} << 20;

// Reads (through ReadBoundedFile: a regular file of at most `max_bytes`, symbolic links followed)
// and parses a gates file that the user names on the local machine, for local tools such as
// `headwise plan`. The daemon never calls this: it reads patterns only by name, through a
// PatternDirectory. NOT_FOUND when the file does not exist, PERMISSION_DENIED when it cannot be
// read, FAILED_PRECONDITION when it is not a regular file or is too large, otherwise as
// ParseDuoAttentionGates.
absl::StatusOr<DuoAttentionGates> LoadDuoAttentionGates(const std::string& path,
                                                        uint64_t max_bytes = kMaxGatesFileBytes);

// The q-quantile of `values` by linear interpolation between order statistics, as numpy's
// np.quantile with its default method ("linear"): sorted v, h = q * (n - 1),
// result = v[floor(h)] + (h - floor(h)) * (v[floor(h) + 1] - v[floor(h)]).
// REQUIRES: values non-empty, 0 <= q <= 1.
double LinearQuantile(absl::Span<const double> values, double q);

struct RoleSelectionOptions {
  // Amplitude of the uniform tie-breaking noise added to every gate before the quantile, as in
  // the authors' sparsify_attention_heads (alpha += U(0, 1e-6)). 0 disables it; then all heads
  // tied at the threshold become retrieval heads. Default: 1e-6.
  double tie_break_noise = 1e-6;
  // Seed of the noise (std::mt19937_64), so that a choice is reproducible. Default: 0.
  uint64_t seed = 0;
};

// DuoAttention's head selection for a target sparsity (policies.md §2.3, utils.py
// sparsify_attention_heads): alpha' = alpha + noise; threshold = LinearQuantile(alpha', s) over
// all heads of all layers (s >= 1: threshold 2, every head streaming; s <= 0: threshold -1,
// every head retrieval); a head is kRetrieval iff alpha' >= threshold. With distinct alpha' the
// number of retrieval heads is n - ceil(s * (n - 1)) (n = heads), i.e. the streaming fraction
// is s within one head. INVALID_ARGUMENT when `sparsity` is NaN or outside [0, 1], the gates
// are empty, or options.tie_break_noise is negative or not finite.
absl::StatusOr<HeadRoles> RolesForSparsity(const DuoAttentionGates& gates, double sparsity,
                                           const RoleSelectionOptions& options = {});

// The sparsity DuoAttentionRoles uses when its `sparsity` field is unset.
inline constexpr double kDefaultDuoAttentionSparsity = 0.5;

class PatternDirectory;  // policies/pattern_directory.h

// Resolves a PolicySpec's head-role source for `layout`: uniform (every head kRetrieval), or
// DuoAttention gates (the pattern `pattern_name` looked up in `patterns`, or inline) selected at
// the spec's sparsity. `patterns` (not owned; may be null) is the daemon's configured pattern
// directory. INVALID_ARGUMENT when the gates' shape differs from layout's num_layers x
// num_kv_heads, the duo_attention source names no gates, the pattern name is malformed, or any
// value is invalid; FAILED_PRECONDITION when a pattern is named but `patterns` is null (no
// pattern directory configured); otherwise the errors of PatternDirectory::LoadGates (NOT_FOUND
// for an unknown pattern).
absl::StatusOr<HeadRoles> ResolveHeadRoles(const headwise::v1::HeadRolesSource& source,
                                           const ModelLayout& layout,
                                           const PatternDirectory* patterns = nullptr);

}  // namespace headwise

#endif  // HEADWISE_POLICIES_HEAD_ROLES_H_
