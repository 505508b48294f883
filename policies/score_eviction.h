// Score-driven eviction at token granularity, within each head's budget (HeadContext::
// budget_tokens, from the BudgetAllocator): TOVA (policies.md §5.4), key norm (kvpress
// KnormPress) and Scissorhands (§5.3, appendix §2), each an ActionPolicy with the TokenScorer
// that maintains its scores. Scores follow the TokenScorer convention "higher = more important",
// so one selection rule (KeepWithinBudget) serves every method here and H2O:
//
//   keep = the `recent` newest held tokens  ∪  topk(score over the older ones, keep - recent)
//
// with ties keeping the older token (deterministic), tokens scored kUnscored always kept, and the
// newest token always kept. A page that loses all its tokens is dropped whole.
#ifndef HEADWISE_POLICIES_SCORE_EVICTION_H_
#define HEADWISE_POLICIES_SCORE_EVICTION_H_

#include <cstdint>
#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "policies/stages.h"

namespace headwise {

// The drops that leave `head` with at most max(keep, 1, #unscored) tokens: the `recent` newest
// held tokens (clamped to [1, keep]) plus the highest-scored older ones (ties: the older token
// wins; kUnscored tokens are never dropped). Nothing when the head holds <= keep tokens. With
// keep < 0 (unlimited) nothing is dropped. FAILED_PRECONDITION when a drop is needed and
// head.token_scores is empty (`method` names the policy in the message).
absl::StatusOr<HeadActions> KeepWithinBudget(const HeadContext& head, int64_t keep, int64_t recent,
                                             std::string_view method);

// Groups strictly ascending token drops of `head` into whole pages (a page losing every token)
// and single tokens, as HeadActions wants them.
HeadActions GroupTokenDrops(const HeadContext& head, absl::Span<const TokenRef> drops);

// TOVA's score: the attention of the latest query, replacing the previous one (no history).
// Appended tokens start kUnscored. The probability is the engine's group mean (§0.3 "mean").
class LastAttentionScorer final : public TokenScorer {
 public:
  std::string_view name() const override { return "last_attention"; }
  std::unique_ptr<TokenScorer> Clone() const override;
  StatsNeeds needs() const override { return {.token_probs = true}; }
  float InitialScore() const override { return kUnscored; }
  void Accumulate(absl::Span<const float> probs, absl::Span<float> scores) const override;
};

// Key norm: score = -||k||_2 (computed in double from the stored key, kept as fp32); attention
// statistics leave it unchanged.
class KeyNormScorer final : public TokenScorer {
 public:
  std::string_view name() const override { return "key_norm"; }
  std::unique_ptr<TokenScorer> Clone() const override;
  StatsNeeds needs() const override { return {.appended_keys = true}; }
  void ScoreAppended(absl::Span<const float> keys, int head_dim,
                     absl::Span<float> out) const override;
  void Accumulate(absl::Span<const float> /*probs*/, absl::Span<float> /*scores*/) const override {}
};

// Scissorhands' unimportance count, stored negated (score = -U, so higher = more important):
//   U <- U * (1 - 1/w) + 1[a < 1/T]      for every decode query that reaches the token,
// an exponentially weighted count over about the last w steps (the paper counts exactly over a
// sliding window of w steps, which needs w bits per token; see docs/policies.md). Appended
// tokens start kUnscored, which the first query turns into U = 0 before counting.
class UnimportanceScorer final : public TokenScorer {
 public:
  struct Options {
    // w, in decode steps. Valid: >= 1. Default: 400.
    int64_t history_window = 400;
    // T. Valid: >= 1. Default: 512.
    int64_t threshold_tokens = 512;
  };
  // INVALID_ARGUMENT for an option out of range.
  static absl::StatusOr<std::unique_ptr<UnimportanceScorer>> Create(const Options& options);

  std::string_view name() const override { return "unimportance_count"; }
  std::unique_ptr<TokenScorer> Clone() const override;
  StatsNeeds needs() const override { return {.token_probs = true}; }
  float InitialScore() const override { return kUnscored; }
  void Accumulate(absl::Span<const float> probs, absl::Span<float> scores) const override;

 private:
  explicit UnimportanceScorer(const Options& options) : options_(options) {}
  Options options_;
};

// TOVA (schwartz-lab-NLP/TOVA TOVACache.reduce), per kv head: keep the budget's tokens with the
// highest last-query attention (the newest always). Unlimited budget: nothing dropped.
class TovaPolicy final : public ActionPolicy {
 public:
  std::string_view name() const override { return "tova"; }
  std::unique_ptr<ActionPolicy> Clone() const override;
  bool uses_scores() const override { return true; }
  absl::StatusOr<HeadActions> Decide(const HeadContext& head) const override;
};

// Key norm: the `recent_tokens` newest plus the lowest-norm older tokens, within the budget.
class KeyNormPolicy final : public ActionPolicy {
 public:
  struct Options {
    // Valid: >= 0. Default: 10.
    int64_t recent_tokens = 10;
  };
  static absl::StatusOr<std::unique_ptr<KeyNormPolicy>> Create(const Options& options);

  std::string_view name() const override { return "key_norm"; }
  std::unique_ptr<ActionPolicy> Clone() const override;
  bool uses_scores() const override { return true; }
  absl::StatusOr<HeadActions> Decide(const HeadContext& head) const override;

 private:
  explicit KeyNormPolicy(const Options& options) : options_(options) {}
  Options options_;
};

// Scissorhands: when a head holds more than its budget B, keep the `recent_tokens` newest and the
// lowest-U older tokens, B - round(drop_fraction * B) in all (at least 1).
class ScissorhandsPolicy final : public ActionPolicy {
 public:
  struct Options {
    // r. Valid: >= 0. Default: 10.
    int64_t recent_tokens = 10;
    // m / B. Valid: [0, 1). Default: 0.5.
    double drop_fraction = 0.5;
  };
  static absl::StatusOr<std::unique_ptr<ScissorhandsPolicy>> Create(const Options& options);

  std::string_view name() const override { return "scissorhands"; }
  std::unique_ptr<ActionPolicy> Clone() const override;
  bool uses_scores() const override { return true; }
  absl::StatusOr<HeadActions> Decide(const HeadContext& head) const override;

 private:
  explicit ScissorhandsPolicy(const Options& options) : options_(options) {}
  Options options_;
};

}  // namespace headwise

#endif  // HEADWISE_POLICIES_SCORE_EVICTION_H_
