// Head roles from offline retrieval scores (policies.md §4, Wu et al. "Retrieval Head"): the
// RoleSource stage for RetrievalScoreRoles. Scores come inline or from `head_scores.json` in a
// pattern named inside the daemon's pattern directory (pattern_directory.h), in the format the
// authors ship (nightdessert/Retrieval_Head head_score/<model>.json; FYYFU/HeadKV
// Important_Head/head_score/*.json):
//
//   {"<layer>-<query head>": [score of each trial, ...], ...}      (a plain number is accepted)
//
// A head's score is the mean of its list (the README's np.mean); heads absent from the file
// score 0. Query heads are reduced to kv heads (max by default, §4.2), then a kv head is a
// RETRIEVAL head iff its score > threshold (default 0.1, the paper's), or iff it is among the
// ceil(top_fraction * L * H_kv) best.
#ifndef HEADWISE_POLICIES_RETRIEVAL_ROLES_H_
#define HEADWISE_POLICIES_RETRIEVAL_ROLES_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "cachesvc/base/layout.h"
#include "headwise/v1/policy.pb.h"
#include "policies/head_roles.h"
#include "policies/stages.h"

namespace headwise {

class PatternDirectory;  // policies/pattern_directory.h

// The paper's threshold: a head is a retrieval head when its score exceeds 0.1.
inline constexpr double kDefaultRetrievalThreshold = 0.1;

// Parses a Retrieval Head JSON file into layout.num_layers x layout.num_q_heads scores (row-major
// InlineHeadScores). INVALID_ARGUMENT, naming `source` and the entry's ordinal but never quoting
// the file, when the text is not a JSON object, a key is not "<layer>-<head>" within the layout,
// a key repeats, or a value is not a number or a list of numbers, each finite and >= 0.
absl::StatusOr<headwise::v1::InlineHeadScores> ParseRetrievalScores(std::string_view text,
                                                                    const ModelLayout& layout,
                                                                    std::string_view source);

// The scores of pattern `name`'s head_scores.json (PatternDirectory::ReadPatternFile, then
// ParseRetrievalScores). FAILED_PRECONDITION when `patterns` is null; the directory's and the
// parser's errors otherwise.
absl::StatusOr<headwise::v1::InlineHeadScores> LoadRetrievalScores(const PatternDirectory* patterns,
                                                                   const std::string& name,
                                                                   const ModelLayout& layout);

// Per kv head (layer-major L x H_kv) from per-kv-head or per-query-head `scores`, reduced over
// each group by `reduction` (UNSPECIFIED = `fallback`). REQUIRES: ValidateInlineScores passed.
std::vector<double> KvHeadScores(const headwise::v1::InlineHeadScores& scores,
                                 const ModelLayout& layout, headwise::v1::GroupReduction reduction,
                                 headwise::v1::GroupReduction fallback);

// The roles for per-kv-head `kv_scores` under `config`'s selection. INVALID_ARGUMENT for a
// non-finite threshold or a top_fraction outside [0, 1].
absl::StatusOr<HeadRoles> SelectRetrievalHeads(const std::vector<double>& kv_scores,
                                               const ModelLayout& layout,
                                               const headwise::v1::RetrievalScoreRoles& config);

class RetrievalScoreRoleSource final : public RoleSource {
 public:
  // `patterns` may be null (then only inline scores resolve); not owned, must outlive this.
  RetrievalScoreRoleSource(const headwise::v1::RetrievalScoreRoles& config,
                           const PatternDirectory* patterns)
      : config_(config), patterns_(patterns) {}
  std::string_view name() const override { return "retrieval_scores"; }
  std::unique_ptr<RoleSource> Clone() const override;
  // Errors: as ValidateInlineScores / ParseRetrievalScores / SelectRetrievalHeads;
  // FAILED_PRECONDITION for a pattern name without a pattern directory; the directory's errors
  // (NOT_FOUND, ...) for a named pattern; INVALID_ARGUMENT when no scores are given.
  absl::StatusOr<HeadRoles> Resolve(const ModelLayout& layout) const override;

 private:
  headwise::v1::RetrievalScoreRoles config_;
  const PatternDirectory* patterns_;
};

}  // namespace headwise

#endif  // HEADWISE_POLICIES_RETRIEVAL_ROLES_H_
