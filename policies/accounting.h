// KV memory accounting: how many pages and tokens each (layer, kv head) retains under an
// eviction spec, and the bytes that adds up to. Pure functions, shared by the engine (budget
// checks) and planners/replay (what a configuration would cost), so both count the same way.
//
// The counts are closed forms of exactly what the policies in eviction.h decide, for the
// engine's normal page layout: a head's pages were appended from position 0, so page i held
// positions [i * page_tokens, min((i + 1) * page_tokens, seq_len)) before any eviction, and the
// policy was applied at any number of earlier lengths (dropping is monotone: a page dropped at
// one length would be dropped at every later one). Bytes are page-granular: a partial page costs
// a whole page.
#ifndef HEADWISE_POLICIES_ACCOUNTING_H_
#define HEADWISE_POLICIES_ACCOUNTING_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "cachesvc/base/layout.h"
#include "policies/eviction.h"
#include "policies/head_roles.h"

namespace headwise {

// What one (layer, kv head) keeps.
struct HeadRetention {
  int64_t pages = 0;
  int64_t tokens = 0;
};

// Pages (ceil(seq_len / page_tokens)) and tokens of a head that keeps everything.
// REQUIRES: seq_len >= 0, page_tokens > 0.
HeadRetention FullRetention(int64_t seq_len, int page_tokens);

// What a head with `role` keeps at `seq_len` under `spec` (see the file comment for the page
// layout assumed). For H2O the tokens are exact and the pages an upper bound (token-granular
// drops leave partial pages; see accounting.cc). TOVA, key norm and Scissorhands count
// min(seq_len, B) tokens for a uniform budget B (exact for TOVA once a query has scored the
// prompt and for key norm; an upper bound for Scissorhands, which oscillates between B - m and
// B), with H2O's page bound; H2O with a uniform budget keeps min(heavy + recent, B). Other
// budgets (PyramidKV, AdaKV, HeadKV) are not modelled: full retention, an upper bound.
// REQUIRES: seq_len >= 0, page_tokens > 0, spec.window valid.
HeadRetention RetainedForHead(const EvictionSpec& spec, HeadRole role, int64_t seq_len,
                              int page_tokens);

// The whole sequence's KV footprint.
struct KvFootprint {
  int64_t seq_len = 0;
  // Sums over every (layer, kv head).
  int64_t retained_pages = 0;
  int64_t retained_tokens = 0;
  // retained_pages * layout.page_bytes().
  int64_t retained_bytes = 0;
  // The same without eviction.
  int64_t full_pages = 0;
  int64_t full_bytes = 0;
  // Per head, layer-major: per_head[layer * num_kv_heads + kv_head].
  std::vector<HeadRetention> per_head;

  // full_bytes / retained_bytes (1 when nothing is retained).
  double CompressionRatio() const {
    return retained_bytes == 0
               ? 1.0
               : static_cast<double>(full_bytes) / static_cast<double>(retained_bytes);
  }
};

// The footprint of one sequence of `seq_len` tokens. INVALID_ARGUMENT when the layout is invalid
// (ValidateLayout), seq_len < 0, roles are not layout.num_layers x layout.num_kv_heads, or the
// spec's window is negative.
absl::StatusOr<KvFootprint> ComputeKvFootprint(const ModelLayout& layout, int64_t seq_len,
                                               const HeadRoles& roles, const EvictionSpec& spec);

}  // namespace headwise

#endif  // HEADWISE_POLICIES_ACCOUNTING_H_
