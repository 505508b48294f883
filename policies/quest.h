// Quest (policies.md §7.1; mit-han-lab/Quest evaluation/quest_attention.py, quest/ops/csrc/
// estimate.cu, quest/utils/controller.py): query-aware page selection from per-page key bounds.
// For page p with per-channel key minimum m_p and maximum M_p (HeadContext::key_bounds, kept by
// the engine), the upper bound of q·k over any key of the page is
//
//   U(q, p) = Σ_i max(q_i · m_p[i], q_i · M_p[i])  ≥  max_{j ∈ p} q · k_j,
//
// computed per query head of the kv head's group and reduced over the group (max: a page any
// query head may need; or sum). A decode query of layer l reads, per kv head:
//   * every page when l < dense_layers (Quest keeps layers 0 and 1 dense) or when the head holds
//     at most k_pages pages;
//   * otherwise the last (partial, current) page plus the k_pages - 1 other pages with the
//     highest U (ties: the older page), with k_pages = max(3, floor(token_budget / P)), the
//     reference controller's page budget, which counts the last page.
// Nothing is evicted: the other pages stay where they are (host memory under the offload
// placements) and are simply not read, so only the selected pages are staged.
#ifndef HEADWISE_POLICIES_QUEST_H_
#define HEADWISE_POLICIES_QUEST_H_

#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "headwise/v1/policy.pb.h"
#include "policies/stages.h"

namespace headwise {

// U(q, p) for one query head: q, kmin and kmax hold `head_dim` floats. A channel with q_i = 0
// adds 0 whatever its bounds (so -inf / +inf bounds of an unreadable page add +inf only where
// q_i != 0). Accumulated in double.
double QuestUpperBound(const float* q, const float* kmin, const float* kmax, int head_dim);

class QuestSelector final : public PageSelector {
 public:
  enum class Reduction { kMax, kSum };
  struct Options {
    // Tokens read per head and query; k_pages = max(3, floor(token_budget / P)). Valid: >= 1.
    // Default: 1024 (the middle of the authors' scripts' 512 .. 4096).
    int64_t token_budget = 1024;
    // Layers 0 .. dense_layers - 1 read every page. Valid: >= 0. Default: 2 (the reference's
    // layer_id < 2).
    int32_t dense_layers = 2;
    // The group's per-query-head bounds to one page score. Default: kMax.
    Reduction reduction = Reduction::kMax;
  };
  // INVALID_ARGUMENT for an option out of range.
  static absl::StatusOr<std::unique_ptr<QuestSelector>> Create(const Options& options);
  // The options PolicySpec.selection.quest names (defaults for unset fields); INVALID_ARGUMENT
  // as Create.
  static absl::StatusOr<std::unique_ptr<QuestSelector>> FromSpec(
      const headwise::v1::PolicySpec& spec);

  std::string_view name() const override { return "quest"; }
  std::unique_ptr<PageSelector> Clone() const override;
  bool needs_key_bounds() const override { return true; }
  void Select(const HeadContext& head, absl::Span<const float> q, int group,
              std::vector<int32_t>* pages) const override;
  // The last page, then the others Select picks by decreasing U.
  void Rank(const HeadContext& head, absl::Span<const float> q, int group,
            std::vector<int32_t>* pages) const override;

  // The page budget k_pages for pages of `page_tokens` tokens.
  int64_t PageBudget(int page_tokens) const;
  // The group-reduced U of every page of `head` (out[i] for page i). REQUIRES: head.key_bounds
  // and head.head_dim set; q holds group * head_dim floats.
  void PageScores(const HeadContext& head, absl::Span<const float> q, int group,
                  std::vector<double>* out) const;
  // True when layer `layer` reads every page (a dense layer).
  bool dense(LayerId layer) const { return layer.value() < options_.dense_layers; }
  const Options& options() const { return options_; }

 private:
  explicit QuestSelector(const Options& options) : options_(options) {}
  Options options_;
};

// The `k` highest of `scores` over ordinals [0, n) excluding `exclude` (-1: none), highest
// first, ties to the lower ordinal.
std::vector<int32_t> TopPages(const std::vector<double>& scores, int64_t k, int32_t exclude);

}  // namespace headwise

#endif  // HEADWISE_POLICIES_QUEST_H_
