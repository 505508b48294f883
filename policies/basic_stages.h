// The stages every stack starts from: uniform and DuoAttention roles, uniform budgets, the
// accumulated-attention scorer (H2O's A), selecting every page, and prefetching the next units.
// Each is one small class implementing a stage of policies/stages.h.
#ifndef HEADWISE_POLICIES_BASIC_STAGES_H_
#define HEADWISE_POLICIES_BASIC_STAGES_H_

#include <memory>
#include <string_view>
#include <vector>

#include "headwise/v1/policy.pb.h"
#include "policies/stages.h"

namespace headwise {

class PatternDirectory;  // policies/pattern_directory.h

// Every head gets `role`. Default role: kRetrieval.
class UniformRoleSource final : public RoleSource {
 public:
  explicit UniformRoleSource(HeadRole role = HeadRole::kRetrieval) : role_(role) {}
  std::string_view name() const override { return "uniform"; }
  std::unique_ptr<RoleSource> Clone() const override;
  absl::StatusOr<HeadRoles> Resolve(const ModelLayout& layout) const override;

 private:
  HeadRole role_;
};

// DuoAttention gates (policies.md §2.3): inline, or a pattern named in the daemon's pattern
// directory; the heads at or above the sparsity quantile are retrieval heads (ResolveHeadRoles).
class DuoAttentionRoleSource final : public RoleSource {
 public:
  // `patterns` may be null (then only inline gates resolve); not owned, must outlive the source.
  DuoAttentionRoleSource(const headwise::v1::HeadRolesSource& source,
                         const PatternDirectory* patterns)
      : source_(source), patterns_(patterns) {}
  std::string_view name() const override { return "duo_attention"; }
  std::unique_ptr<RoleSource> Clone() const override;
  absl::StatusOr<HeadRoles> Resolve(const ModelLayout& layout) const override;

 private:
  headwise::v1::HeadRolesSource source_;
  const PatternDirectory* patterns_;
};

// The same budget for every head: `tokens`, or kUnlimitedTokens. Default: unlimited.
class UniformBudget final : public BudgetAllocator {
 public:
  explicit UniformBudget(int64_t tokens = kUnlimitedTokens) : tokens_(tokens) {}
  std::string_view name() const override { return "uniform"; }
  std::unique_ptr<BudgetAllocator> Clone() const override;
  void Allocate(const ModelLayout& layout, const HeadRoles& roles, LayerId layer, int64_t seq_len,
                absl::Span<const HeadContext> heads, absl::Span<int64_t> out) const override;
  int64_t tokens() const { return tokens_; }

 private:
  int64_t tokens_;
};

// H2O's accumulated attention (policies.md §5.2): A(j) <- A(j) + a_t(j) for every decode query,
// a_t being the mean over the group's query heads (§0.3 "mean"). New tokens start at 0 and gain
// the attention of the step that appends them.
class AccumulatedAttentionScorer final : public TokenScorer {
 public:
  std::string_view name() const override { return "accumulated_attention"; }
  std::unique_ptr<TokenScorer> Clone() const override;
  StatsNeeds needs() const override { return {.token_probs = true}; }
  void Accumulate(absl::Span<const float> probs, absl::Span<float> scores) const override;
};

// Every page, every time.
class AllPagesSelector final : public PageSelector {
 public:
  std::string_view name() const override { return "all"; }
  std::unique_ptr<PageSelector> Clone() const override;
  bool selects_all() const override { return true; }
  void Select(const HeadContext& head, absl::Span<const float> q, int group,
              std::vector<int32_t>* pages) const override;
};

// The next `layers_ahead` layers (wrapping to layer 0: the next decode step) and the next
// `heads_ahead` heads of the same layer (not wrapping); with a page selector, at most
// `pages_per_layer` predicted pages of a layer (-1: all). Defaults: 1, 1 and -1.
class NextUnitsPrefetcher final : public Prefetcher {
 public:
  NextUnitsPrefetcher(int layers_ahead = 1, int heads_ahead = 1, int64_t pages_per_layer = -1)
      : layers_ahead_(layers_ahead), heads_ahead_(heads_ahead), pages_(pages_per_layer) {}
  std::string_view name() const override { return "next_units"; }
  std::unique_ptr<Prefetcher> Clone() const override;
  std::vector<int> LayersAhead(int layer, int num_layers) const override;
  std::vector<int> HeadsAhead(int head, int num_heads) const override;
  int64_t pages_per_layer() const override { return pages_; }

 private:
  int layers_ahead_;
  int heads_ahead_;
  int64_t pages_;
};

}  // namespace headwise

#endif  // HEADWISE_POLICIES_BASIC_STAGES_H_
