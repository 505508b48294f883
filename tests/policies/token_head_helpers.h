// Test helpers: a head of contiguous tokens with one score per token, as the engine hands a
// score-driven stage its HeadContext (pages in position order, scores page-major).
#ifndef HEADWISE_TESTS_POLICIES_TOKEN_HEAD_HELPERS_H_
#define HEADWISE_TESTS_POLICIES_TOKEN_HEAD_HELPERS_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "cachesvc/base/layout.h"
#include "policies/stages.h"

namespace headwise {
namespace testing_helpers {

// A small f16 layout of `layers` x `q_heads` / `kv_heads`, head_dim 16, pages of 4 tokens.
inline ModelLayout SmallLayout(int layers = 2, int q_heads = 4, int kv_heads = 2) {
  ModelLayout l;
  l.num_layers = layers;
  l.num_q_heads = q_heads;
  l.num_kv_heads = kv_heads;
  l.head_dim = 16;
  l.page_tokens = 4;
  return l;
}

class TokenHead {
 public:
  // Positions 0 .. scores.size() - 1 in pages of `page_tokens`; token p scores scores[p].
  TokenHead(std::vector<float> scores, int page_tokens, int kv_head = 0)
      : page_tokens_(page_tokens), kv_head_(kv_head) {
    const int64_t n = static_cast<int64_t>(scores.size());
    for (int64_t first = 0; first < n; first += page_tokens) {
      PageMeta page;
      page.first_position = first;
      page.token_count = static_cast<int32_t>(std::min<int64_t>(page_tokens, n - first));
      pages_.push_back(page);
    }
    scores_.assign(pages_.size() * page_tokens, 0.0f);
    for (int64_t p = 0; p < n; ++p) scores_[p] = scores[p];  // Contiguous: index = position.
    seq_len_ = n;
  }
  // Without scores (score-free stages).
  static TokenHead Unscored(int64_t n, int page_tokens) {
    TokenHead head(std::vector<float>(n, 0.0f), page_tokens);
    head.scores_.clear();
    return head;
  }

  HeadContext Context(int64_t budget = kUnlimitedTokens) const {
    HeadContext head;
    head.kv_head = HeadId(kv_head_);
    head.page_tokens = page_tokens_;
    head.seq_len = seq_len_;
    head.pages = pages_;
    head.budget_tokens = budget;
    head.token_scores = scores_;
    return head;
  }

  // The positions `actions` keeps, ascending.
  std::vector<int64_t> Kept(const HeadActions& actions) const {
    std::vector<int64_t> kept;
    for (size_t i = 0; i < pages_.size(); ++i) {
      if (std::binary_search(actions.drop_pages.begin(), actions.drop_pages.end(),
                             static_cast<int32_t>(i))) {
        continue;
      }
      for (int r = 0; r < pages_[i].token_count; ++r) {
        const TokenRef t{static_cast<int32_t>(i), r};
        if (std::find(actions.drop_tokens.begin(), actions.drop_tokens.end(), t) ==
            actions.drop_tokens.end()) {
          kept.push_back(pages_[i].first_position + r);
        }
      }
    }
    return kept;
  }

 private:
  int page_tokens_;
  int kv_head_;
  int64_t seq_len_ = 0;
  std::vector<PageMeta> pages_;
  std::vector<float> scores_;
};

}  // namespace testing_helpers
}  // namespace headwise

#endif  // HEADWISE_TESTS_POLICIES_TOKEN_HEAD_HELPERS_H_
