#include "policies/stages.h"

#include <algorithm>

#include "absl/strings/str_format.h"

namespace headwise {

absl::Status ValidateHeadContext(const HeadContext& head) {
  if (head.page_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("page_tokens must be positive, got %d", head.page_tokens));
  }
  int64_t previous = -1;
  for (size_t i = 0; i < head.pages.size(); ++i) {
    const PageMeta& page = head.pages[i];
    if (page.token_count < 1 || page.token_count > head.page_tokens ||
        (!page.positions.empty() &&
         page.positions.size() != static_cast<size_t>(page.token_count))) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "layer %d kv head %d page %d: token_count %d outside [1, %d] or positions of size %d",
          head.layer.value(), head.kv_head.value(), i, page.token_count, head.page_tokens,
          page.positions.size()));
    }
    for (int r = 0; r < page.token_count; ++r) {
      const int64_t p = page.position(r);
      if (p <= previous || p >= head.seq_len) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "layer %d kv head %d page %d row %d: position %d is not above %d and below seq_len %d",
            head.layer.value(), head.kv_head.value(), i, r, p, previous, head.seq_len));
      }
      previous = p;
    }
  }
  if (!head.token_scores.empty() &&
      head.token_scores.size() != head.pages.size() * static_cast<size_t>(head.page_tokens)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "token_scores holds %d floats, not pages x page_tokens = %d", head.token_scores.size(),
        head.pages.size() * static_cast<size_t>(head.page_tokens)));
  }
  const size_t bounds = head.pages.size() * 2 * static_cast<size_t>(std::max(0, head.head_dim));
  if (!head.key_bounds.empty() && (head.head_dim <= 0 || head.key_bounds.size() != bounds)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("key_bounds holds %d floats, not pages x 2 x head_dim = %d",
                        head.key_bounds.size(), bounds));
  }
  if (!head.window_votes.empty() &&
      head.window_votes.size() != head.pages.size() * static_cast<size_t>(head.page_tokens)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "window_votes holds %d floats, not pages x page_tokens = %d", head.window_votes.size(),
        head.pages.size() * static_cast<size_t>(head.page_tokens)));
  }
  return absl::OkStatus();
}

void PageSelector::Rank(const HeadContext& head, absl::Span<const float> q, int group,
                        std::vector<int32_t>* pages) const {
  std::vector<int32_t> picked;
  Select(head, q, group, &picked);
  if (picked.empty()) return;
  pages->push_back(picked.back());
  pages->insert(pages->end(), picked.begin(), picked.end() - 1);
}

}  // namespace headwise
