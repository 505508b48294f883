#include "policies/snapkv.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "policies/score_eviction.h"

namespace headwise {

std::vector<float> PoolVotes(absl::Span<const float> x, int kernel, WindowPooling pooling) {
  const int64_t n = static_cast<int64_t>(x.size());
  const int64_t half = kernel / 2;
  std::vector<float> out(n);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t lo = std::max<int64_t>(0, j - half), hi = std::min(n - 1, j + half);
    if (pooling == WindowPooling::kMax) {
      out[j] = *std::max_element(x.begin() + lo, x.begin() + hi + 1);
    } else {
      double sum = 0.0;
      for (int64_t i = lo; i <= hi; ++i) sum += x[i];
      out[j] = static_cast<float>(sum / kernel);
    }
  }
  return out;
}

absl::StatusOr<std::unique_ptr<SnapKvPolicy>> SnapKvPolicy::Create(const Options& options) {
  if (options.window_tokens < 1 || options.capacity_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("snapkv.window_tokens (", options.window_tokens,
                                                   ") and capacity_tokens (",
                                                   options.capacity_tokens, ") must be >= 1"));
  }
  if (options.kernel_size < 1 || options.kernel_size > 63 || options.kernel_size % 2 == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("snapkv.kernel_size must be odd in 1..63, got ", options.kernel_size));
  }
  return std::unique_ptr<SnapKvPolicy>(new SnapKvPolicy(options));
}

std::unique_ptr<ActionPolicy> SnapKvPolicy::Clone() const {
  return std::unique_ptr<ActionPolicy>(new SnapKvPolicy(options_));
}

absl::StatusOr<HeadActions> SnapKvPolicy::Decide(const HeadContext& head) const {
  if (head.window_votes.empty()) return HeadActions{};
  // Held tokens in position order, and their votes.
  std::vector<TokenRef> held;
  std::vector<float> votes;
  for (size_t p = 0; p < head.pages.size(); ++p) {
    for (int r = 0; r < head.pages[p].token_count; ++r) {
      held.push_back(TokenRef{static_cast<int32_t>(p), r});
      votes.push_back(head.window_votes[p * head.page_tokens + r]);
    }
  }
  const int64_t n = static_cast<int64_t>(held.size());
  const int64_t capacity =
      head.budget_tokens == kUnlimitedTokens ? options_.capacity_tokens : head.budget_tokens;
  if (n <= std::max<int64_t>(capacity, 1)) return HeadActions{};
  const int64_t window = std::min(options_.window_tokens, n);
  const int64_t prefix = n - window;
  const std::vector<float> pooled =
      PoolVotes(absl::MakeConstSpan(votes.data(), prefix), options_.kernel_size, options_.pooling);
  std::vector<int64_t> order(prefix);
  std::iota(order.begin(), order.end(), 0);
  const int64_t keep = std::clamp<int64_t>(capacity - window, 0, prefix);
  std::partial_sort(order.begin(), order.begin() + keep, order.end(), [&](int64_t a, int64_t b) {
    return pooled[a] != pooled[b] ? pooled[a] > pooled[b] : a < b;
  });
  std::vector<bool> kept(prefix, false);
  for (int64_t i = 0; i < keep; ++i) kept[order[i]] = true;
  std::vector<TokenRef> drops;
  for (int64_t i = 0; i < prefix; ++i) {
    if (!kept[i]) drops.push_back(held[i]);
  }
  return GroupTokenDrops(head, drops);
}

}  // namespace headwise
