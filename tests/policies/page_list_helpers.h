// Test helpers: page lists of one (layer, kv head) as the engine lays them out.
#ifndef HEADWISE_TESTS_POLICIES_PAGE_LIST_HELPERS_H_
#define HEADWISE_TESTS_POLICIES_PAGE_LIST_HELPERS_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "policies/eviction.h"
#include "policies/page_meta.h"
#include "policies/stages.h"

namespace headwise {
namespace testing_helpers {

// Pages of a head whose `seq_len` tokens were appended from position 0 with nothing dropped.
inline std::vector<PageMeta> ContiguousPages(int64_t seq_len, int page_tokens) {
  std::vector<PageMeta> pages;
  for (int64_t first = 0; first < seq_len; first += page_tokens) {
    PageMeta page;
    page.first_position = first;
    page.token_count = static_cast<int32_t>(std::min<int64_t>(page_tokens, seq_len - first));
    pages.push_back(page);
  }
  return pages;
}

inline HeadPagesView ViewOf(const std::vector<PageMeta>& pages, int page_tokens) {
  HeadPagesView view;
  view.layer = LayerId(0);
  view.kv_head = HeadId(0);
  view.page_tokens = page_tokens;
  view.pages = pages;
  return view;
}

// Appends `count` tokens to a head's page list, filling the partial last page first.
inline void AppendTokens(std::vector<PageMeta>& pages, int64_t& seq_len, int64_t count,
                         int page_tokens) {
  while (count > 0) {
    if (pages.empty() || pages.back().token_count == page_tokens) {
      PageMeta page;
      page.first_position = seq_len;
      pages.push_back(page);
    }
    const int64_t take = std::min<int64_t>(count, page_tokens - pages.back().token_count);
    pages.back().token_count += static_cast<int32_t>(take);
    seq_len += take;
    count -= take;
  }
}

// Whole pages an action policy drops for a head of `seq_len` tokens (after validating the view
// the way the engine does).
struct EvictionDecision {
  std::vector<int32_t> drop;
};
inline absl::StatusOr<EvictionDecision> ChooseVictims(const ActionPolicy& policy,
                                                      const HeadPagesView& view, HeadRole role,
                                                      int64_t seq_len) {
  HeadContext head;
  head.layer = view.layer;
  head.kv_head = view.kv_head;
  head.role = role;
  head.page_tokens = view.page_tokens;
  head.seq_len = seq_len;
  head.pages = view.pages;
  if (absl::Status st = ValidateHeadContext(head); !st.ok()) return st;
  absl::StatusOr<HeadActions> actions = policy.Decide(head);
  if (!actions.ok()) return actions.status();
  return EvictionDecision{actions->drop_pages};
}

// Removes the pages a decision drops (what the engine's apply step does).
inline void ApplyDecision(std::vector<PageMeta>& pages, const EvictionDecision& decision) {
  std::vector<PageMeta> kept;
  size_t next_drop = 0;
  for (size_t i = 0; i < pages.size(); ++i) {
    if (next_drop < decision.drop.size() && decision.drop[next_drop] == static_cast<int32_t>(i)) {
      ++next_drop;
      continue;
    }
    kept.push_back(pages[i]);
  }
  pages = std::move(kept);
}

}  // namespace testing_helpers
}  // namespace headwise

#endif  // HEADWISE_TESTS_POLICIES_PAGE_LIST_HELPERS_H_
