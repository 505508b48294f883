#include "policies/score_eviction.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace headwise {
namespace {

std::vector<TokenRef> HeldTokens(const HeadContext& head) {
  std::vector<TokenRef> held;
  for (size_t i = 0; i < head.pages.size(); ++i) {
    for (int r = 0; r < head.pages[i].token_count; ++r) {
      held.push_back(TokenRef{static_cast<int32_t>(i), r});
    }
  }
  return held;
}

int64_t HeldCount(const HeadContext& head) {
  int64_t n = 0;
  for (const PageMeta& page : head.pages) n += page.token_count;
  return n;
}

absl::Status CheckCount(std::string_view what, int64_t value) {
  if (value >= 0) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrFormat("%s must be >= 0, got %d", std::string(what), value));
}

}  // namespace

HeadActions GroupTokenDrops(const HeadContext& head, absl::Span<const TokenRef> drops) {
  HeadActions out;
  size_t i = 0;
  while (i < drops.size()) {
    const int32_t page = drops[i].page;
    size_t j = i;
    while (j < drops.size() && drops[j].page == page) ++j;
    if (static_cast<int32_t>(j - i) == head.pages[page].token_count) {
      out.drop_pages.push_back(page);
    } else {
      out.drop_tokens.insert(out.drop_tokens.end(), drops.begin() + i, drops.begin() + j);
    }
    i = j;
  }
  return out;
}

absl::StatusOr<HeadActions> KeepWithinBudget(const HeadContext& head, int64_t keep, int64_t recent,
                                             std::string_view method) {
  if (keep < 0) return HeadActions{};
  const std::vector<TokenRef> held = HeldTokens(head);
  const int64_t n = static_cast<int64_t>(held.size());
  keep = std::max<int64_t>(keep, 1);
  if (n <= keep) return HeadActions{};
  if (head.token_scores.size() != head.pages.size() * static_cast<size_t>(head.page_tokens)) {
    return absl::FailedPreconditionError(
        absl::StrCat(std::string(method), " needs token scores (a token scorer in the stack)"));
  }
  const auto score = [&](const TokenRef& t) {
    return head.token_scores[static_cast<size_t>(t.page) * head.page_tokens + t.row];
  };
  recent = std::clamp<int64_t>(recent, 1, keep);
  const int64_t older = n - recent;
  std::vector<int64_t> order(older);
  for (int64_t i = 0; i < older; ++i) order[i] = i;
  // A total order (score descending, then the older token first), so the selection is the same
  // as a stable sort's and needs only O(n): among equal scores the older token is kept.
  const auto better = [&](int64_t a, int64_t b) {
    const float sa = score(held[a]), sb = score(held[b]);
    return sa != sb ? sa > sb : a < b;
  };
  const int64_t heavy = keep - recent;
  if (heavy > 0 && heavy < older) {
    std::nth_element(order.begin(), order.begin() + (heavy - 1), order.end(), better);
  }
  std::vector<bool> kept(older, false);
  for (int64_t i = 0; i < older; ++i) {
    if (i < heavy || score(held[order[i]]) == kUnscored) kept[order[i]] = true;
  }
  std::vector<TokenRef> drops;
  for (int64_t i = 0; i < older; ++i) {
    if (!kept[i]) drops.push_back(held[i]);
  }
  return GroupTokenDrops(head, drops);
}

std::unique_ptr<TokenScorer> LastAttentionScorer::Clone() const {
  return std::make_unique<LastAttentionScorer>();
}

void LastAttentionScorer::Accumulate(absl::Span<const float> probs,
                                     absl::Span<float> scores) const {
  const size_t n = std::min(probs.size(), scores.size());
  std::copy_n(probs.begin(), n, scores.begin());
}

std::unique_ptr<TokenScorer> KeyNormScorer::Clone() const {
  return std::make_unique<KeyNormScorer>();
}

void KeyNormScorer::ScoreAppended(absl::Span<const float> keys, int head_dim,
                                  absl::Span<float> out) const {
  for (size_t i = 0; i < out.size(); ++i) {
    double sum = 0;
    for (int c = 0; c < head_dim; ++c) {
      const double x = keys[i * head_dim + c];
      sum += x * x;
    }
    out[i] = static_cast<float>(-std::sqrt(sum));
  }
}

absl::StatusOr<std::unique_ptr<UnimportanceScorer>> UnimportanceScorer::Create(
    const Options& options) {
  if (options.history_window < 1 || options.threshold_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "scissorhands history_window and threshold_tokens must be >= 1, got %d and %d",
        options.history_window, options.threshold_tokens));
  }
  return std::unique_ptr<UnimportanceScorer>(new UnimportanceScorer(options));
}

std::unique_ptr<TokenScorer> UnimportanceScorer::Clone() const {
  return std::unique_ptr<TokenScorer>(new UnimportanceScorer(options_));
}

void UnimportanceScorer::Accumulate(absl::Span<const float> probs, absl::Span<float> scores) const {
  const float decay = 1.0f - 1.0f / static_cast<float>(options_.history_window);
  const float threshold = 1.0f / static_cast<float>(options_.threshold_tokens);
  const size_t n = std::min(probs.size(), scores.size());
  for (size_t i = 0; i < n; ++i) {
    const float u = scores[i] == kUnscored ? 0.0f : -scores[i];
    scores[i] = -(u * decay + (probs[i] < threshold ? 1.0f : 0.0f));
  }
}

std::unique_ptr<ActionPolicy> TovaPolicy::Clone() const { return std::make_unique<TovaPolicy>(); }

absl::StatusOr<HeadActions> TovaPolicy::Decide(const HeadContext& head) const {
  return KeepWithinBudget(head, head.budget_tokens, /*recent=*/1, "tova");
}

absl::StatusOr<std::unique_ptr<KeyNormPolicy>> KeyNormPolicy::Create(const Options& options) {
  if (absl::Status st = CheckCount("key_norm recent_tokens", options.recent_tokens); !st.ok()) {
    return st;
  }
  return std::unique_ptr<KeyNormPolicy>(new KeyNormPolicy(options));
}

std::unique_ptr<ActionPolicy> KeyNormPolicy::Clone() const {
  return std::unique_ptr<ActionPolicy>(new KeyNormPolicy(options_));
}

absl::StatusOr<HeadActions> KeyNormPolicy::Decide(const HeadContext& head) const {
  return KeepWithinBudget(head, head.budget_tokens, options_.recent_tokens, "key_norm");
}

absl::StatusOr<std::unique_ptr<ScissorhandsPolicy>> ScissorhandsPolicy::Create(
    const Options& options) {
  if (absl::Status st = CheckCount("scissorhands recent_tokens", options.recent_tokens); !st.ok()) {
    return st;
  }
  if (!(options.drop_fraction >= 0.0 && options.drop_fraction < 1.0)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "scissorhands drop_fraction must be in [0, 1), got %g", options.drop_fraction));
  }
  return std::unique_ptr<ScissorhandsPolicy>(new ScissorhandsPolicy(options));
}

std::unique_ptr<ActionPolicy> ScissorhandsPolicy::Clone() const {
  return std::unique_ptr<ActionPolicy>(new ScissorhandsPolicy(options_));
}

absl::StatusOr<HeadActions> ScissorhandsPolicy::Decide(const HeadContext& head) const {
  const int64_t budget = head.budget_tokens;
  if (budget < 0 || HeldCount(head) <= budget) return HeadActions{};
  const int64_t drop = std::llround(options_.drop_fraction * static_cast<double>(budget));
  return KeepWithinBudget(head, budget - drop, options_.recent_tokens, "scissorhands");
}

}  // namespace headwise
