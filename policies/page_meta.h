// Per-page metadata, as policies see it. The engine keeps one PageMeta per page of every
// (layer, kv head) in host memory and hands policies read-only views of it; policies never touch
// page payloads, tiers or slots.
#ifndef HEADWISE_POLICIES_PAGE_META_H_
#define HEADWISE_POLICIES_PAGE_META_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "cachesvc/base/ids.h"

namespace headwise {

// Metadata of one page of one (layer, kv head). Plain data; the engine owns and updates it.
//
// Token-granular pages. A page's tokens are its rows 0 .. token_count - 1, in increasing
// position order. A page written by appends holds the contiguous positions
// [first_position, first_position + token_count) and `positions` is empty (no per-token cost).
// After a token-level eviction or a compaction a page may hold any increasing set of positions:
// then `positions` lists them, one per row.
struct PageMeta {
  // Valid tokens in the page: 1..page_tokens. Any page may be partial once tokens were dropped.
  int32_t token_count = 0;
  // Position of row 0 (the page's smallest position).
  int64_t first_position = 0;
  // Empty for a contiguous page; otherwise token_count strictly increasing positions.
  std::vector<int64_t> positions;
  // Attention probability mass the page has received, summed over decode steps (each step's
  // share is the mean over the group's query heads, kernels::DecodeArgs::page_mass). Written
  // only when the sequence's stack asks for attention statistics. Default: 0.
  float attention_mass = 0.0f;
  // Decode step (PolicyContext step) at which the page was last written or attended.
  int64_t last_touched_step = 0;
  // Merged rows (policies.md §6.0): per row, the logit bias the kernels add to its score, ln of
  // the tokens a count-biased representative stands for. Empty: 0 for every row.
  std::vector<float> bias;
  // True once a merge rewrote any row's K or V: the page no longer holds its tokens' own K/V
  // (prefix reuse never shares such a page).
  bool rewritten = false;

  bool contiguous() const { return positions.empty(); }
  // Position of row `row`. REQUIRES: 0 <= row < token_count.
  int64_t position(int row) const {
    return positions.empty() ? first_position + row : positions[row];
  }
  // The page's largest position.
  int64_t last_position() const { return position(token_count - 1); }
  // The logit bias of row `row` (0 unless merged).
  float row_bias(int row) const { return bias.empty() ? 0.0f : bias[row]; }
};

// Read-only view of the page list of one (layer, kv head) of one sequence, in position order
// (page ordinal 0 first). Ordinals index `pages`; after an eviction the survivors are
// renumbered. Valid only while the engine holds the sequence's lock.
struct HeadPagesView {
  LayerId layer;
  HeadId kv_head;
  // Tokens per full page (the layout's page_tokens).
  int32_t page_tokens = 0;
  absl::Span<const PageMeta> pages;
};

}  // namespace headwise

#endif  // HEADWISE_POLICIES_PAGE_META_H_
