// Token budgets per (layer, kv head): the BudgetAllocator stage of policies/stages.h for
// PyramidKV (policies.md §5.6), Ada-KV (§5.7) and HeadKV (§5.8); UniformBudget is in
// basic_stages.h. Budgets are in tokens; over a sequence they sum to at most L * H_kv * B, B
// being the spec's average per-head budget (where the authors' rounding could exceed it, the
// excess is taken back as each class says).
#ifndef HEADWISE_POLICIES_BUDGETS_H_
#define HEADWISE_POLICIES_BUDGETS_H_

#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "cachesvc/base/layout.h"
#include "headwise/v1/policy.pb.h"
#include "policies/stages.h"

namespace headwise {

class PatternDirectory;  // policies/pattern_directory.h

// Integers close to `exact` (each >= 0) summing to at most `total`: round half up, then, while
// the sum exceeds `total`, one token less for the entry rounded up the most (ties: the lower
// index; entries at 0 are left alone). With sum(exact) <= total only round-ups are taken back.
std::vector<int64_t> RoundWithinTotal(absl::Span<const double> exact, int64_t total);

// PyramidKV (KVCache-Factory PyramidKVCluster) with the observation window folded into the
// budget: min = floor(B / β), max = 2B - min; when max >= S: max = S, min = 2B - S; step =
// floor((max - min) / (L - 1)); budget(l) = max - l * step, every head of layer l alike. Below
// S = 2B (and with L = 1) every layer gets B. The authors' floor can make the layers sum to more
// than L * B (by up to L(L-1)/2); the excess is taken off layers 0, 1, ... one token each.
class PyramidKvBudget final : public BudgetAllocator {
 public:
  struct Options {
    // B. Valid: >= 1. Required.
    int64_t tokens = 0;
    // β. Valid: >= 1. Default: 20.
    double beta = 20.0;
  };
  static absl::StatusOr<std::unique_ptr<PyramidKvBudget>> Create(const Options& options);

  std::string_view name() const override { return "pyramid_kv"; }
  std::unique_ptr<BudgetAllocator> Clone() const override;
  void Allocate(const ModelLayout& layout, const HeadRoles& roles, LayerId layer, int64_t seq_len,
                absl::Span<const HeadContext> heads, absl::Span<int64_t> out) const override;
  // Every layer's budget for a model of `num_layers` at `seq_len` tokens.
  std::vector<int64_t> LayerBudgets(int num_layers, int64_t seq_len) const;

 private:
  explicit PyramidKvBudget(const Options& options) : options_(options) {}
  Options options_;
};

// Ada-KV (FFY0/AdaKV AdaptiveSnapKVCluster), over the stack's token scores: one top-k of size
// H * B over the held tokens of every head of the layer (ties: lower head, then older token);
// n_h = head h's winners; cap_h = round(n_h (1 - α) + floor(α B)) (RoundWithinTotal to H * B).
// Tokens scored kUnscored (no statistic yet; the policies keep them) count as winners of their
// own head and leave the rest of the H * B slots to the top-k over the scored ones.
// When the layer holds at most H * B tokens every head keeps what it holds; without token
// scores (a score-free eviction, or no heads given) every head gets B.
class AdaKvBudget final : public BudgetAllocator {
 public:
  struct Options {
    // B. Valid: >= 1. Required.
    int64_t tokens = 0;
    // α. Valid: [0, 1]. Default: 0.5 (see AdaKvBudget message for the GQA default).
    double floor_alpha = 0.5;
  };
  static absl::StatusOr<std::unique_ptr<AdaKvBudget>> Create(const Options& options);

  std::string_view name() const override { return "ada_kv"; }
  std::unique_ptr<BudgetAllocator> Clone() const override;
  void Allocate(const ModelLayout& layout, const HeadRoles& roles, LayerId layer, int64_t seq_len,
                absl::Span<const HeadContext> heads, absl::Span<int64_t> out) const override;

 private:
  explicit AdaKvBudget(const Options& options) : options_(options) {}
  Options options_;
};

// HeadKV (FYYFU/HeadKV ReasonSnapKVCluster): s normalised (s / Σs) and sharpened (s^temp /
// Σ s^temp) over every head; Pool = floor(B / β) * N over the N heads of the score matrix;
// cap = s * Pool + B - floor(B / β). Per-query-head capacities are averaged over each kv head's
// group (KVCache-Factory HeadKVCluster). Rounded with RoundWithinTotal to L * H_kv * B.
class HeadKvBudget final : public BudgetAllocator {
 public:
  struct Options {
    // B. Valid: >= 1. Required.
    int64_t tokens = 0;
    // β. Valid: >= 1. Default: 1.2.
    double beta = 1.2;
    // Valid: > 0. Default: 1.
    double temperature = 1.0;
  };
  // `scores`: num_layers x num_heads, num_heads = layout.num_kv_heads or num_q_heads; finite,
  // >= 0, not all 0. INVALID_ARGUMENT otherwise or for an option out of range.
  static absl::StatusOr<std::unique_ptr<HeadKvBudget>> Create(
      const Options& options, const headwise::v1::InlineHeadScores& scores,
      const ModelLayout& layout);

  std::string_view name() const override { return "head_kv"; }
  std::unique_ptr<BudgetAllocator> Clone() const override;
  void Allocate(const ModelLayout& layout, const HeadRoles& roles, LayerId layer, int64_t seq_len,
                absl::Span<const HeadContext> heads, absl::Span<int64_t> out) const override;
  // Layer-major caps, one per (layer, kv head).
  const std::vector<int64_t>& caps() const { return caps_; }

 private:
  HeadKvBudget(int num_kv_heads, std::vector<int64_t> caps)
      : num_kv_heads_(num_kv_heads), caps_(std::move(caps)) {}
  int num_kv_heads_;
  std::vector<int64_t> caps_;
};

// Checks an inline score matrix against `layout` (rows = num_layers, columns = num_kv_heads or
// num_q_heads, values finite and >= 0). INVALID_ARGUMENT naming `what` otherwise.
absl::Status ValidateInlineScores(const headwise::v1::InlineHeadScores& scores,
                                  const ModelLayout& layout, std::string_view what);

// The allocator PolicySpec.budget names ("uniform" for none, with unlimited tokens), with its
// parameters validated. INVALID_ARGUMENT for a parameter out of range; HeadKV scores named by
// pattern are read from `patterns` (may be null; errors as LoadRetrievalScores).
absl::StatusOr<std::unique_ptr<BudgetAllocator>> CreateBudgetAllocator(
    const headwise::v1::PolicySpec& spec, const ModelLayout& layout,
    const PatternDirectory* patterns = nullptr);

// The registry name of PolicySpec.budget: "uniform", "pyramid_kv", "ada_kv", "head_kv".
std::string_view BudgetAllocatorName(const headwise::v1::PolicySpec& spec);

}  // namespace headwise

#endif  // HEADWISE_POLICIES_BUDGETS_H_
