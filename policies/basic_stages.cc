#include "policies/basic_stages.h"

#include <algorithm>

namespace headwise {

std::unique_ptr<RoleSource> UniformRoleSource::Clone() const {
  return std::make_unique<UniformRoleSource>(role_);
}

absl::StatusOr<HeadRoles> UniformRoleSource::Resolve(const ModelLayout& layout) const {
  return UniformRoles(layout, role_);
}

std::unique_ptr<RoleSource> DuoAttentionRoleSource::Clone() const {
  return std::make_unique<DuoAttentionRoleSource>(source_, patterns_);
}

absl::StatusOr<HeadRoles> DuoAttentionRoleSource::Resolve(const ModelLayout& layout) const {
  return ResolveHeadRoles(source_, layout, patterns_);
}

std::unique_ptr<BudgetAllocator> UniformBudget::Clone() const {
  return std::make_unique<UniformBudget>(tokens_);
}

void UniformBudget::Allocate(const ModelLayout& /*layout*/, const HeadRoles& /*roles*/,
                             LayerId /*layer*/, int64_t /*seq_len*/,
                             absl::Span<const HeadContext> /*heads*/,
                             absl::Span<int64_t> out) const {
  std::fill(out.begin(), out.end(), tokens_);
}

std::unique_ptr<TokenScorer> AccumulatedAttentionScorer::Clone() const {
  return std::make_unique<AccumulatedAttentionScorer>();
}

void AccumulatedAttentionScorer::Accumulate(absl::Span<const float> probs,
                                            absl::Span<float> scores) const {
  const size_t n = std::min(probs.size(), scores.size());
  for (size_t i = 0; i < n; ++i) scores[i] += probs[i];
}

std::unique_ptr<PageSelector> AllPagesSelector::Clone() const {
  return std::make_unique<AllPagesSelector>();
}

void AllPagesSelector::Select(const HeadContext& head, absl::Span<const float> /*q*/, int /*group*/,
                              std::vector<int32_t>* pages) const {
  for (size_t i = 0; i < head.pages.size(); ++i) pages->push_back(static_cast<int32_t>(i));
}

std::unique_ptr<Prefetcher> NextUnitsPrefetcher::Clone() const {
  return std::make_unique<NextUnitsPrefetcher>(layers_ahead_, heads_ahead_, pages_);
}

std::vector<int> NextUnitsPrefetcher::LayersAhead(int layer, int num_layers) const {
  std::vector<int> out;
  for (int i = 1; i <= layers_ahead_ && i < num_layers; ++i)
    out.push_back((layer + i) % num_layers);
  return out;
}

std::vector<int> NextUnitsPrefetcher::HeadsAhead(int head, int num_heads) const {
  std::vector<int> out;
  for (int i = head + 1; i <= head + heads_ahead_ && i < num_heads; ++i) out.push_back(i);
  return out;
}

}  // namespace headwise
