#include "policies/accounting.h"

#include <algorithm>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "cachesvc/base/status_macros.h"

namespace headwise {

HeadRetention FullRetention(int64_t seq_len, int page_tokens) {
  return {.pages = (seq_len + page_tokens - 1) / page_tokens, .tokens = seq_len};
}

namespace {

// The most tokens a token-granular method keeps per head (kUnlimitedTokens: no bound).
int64_t TokenBound(const EvictionSpec& spec) {
  const int64_t budget = spec.uniform_budget_tokens < 0
                             ? kUnlimitedTokens
                             : std::max<int64_t>(1, spec.uniform_budget_tokens);
  switch (spec.method) {
    case EvictionSpec::Method::kH2o: {
      const int64_t keep = spec.heavy_tokens + std::max<int64_t>(1, spec.h2o_recent_tokens);
      return budget < 0 ? keep : std::min(keep, budget);
    }
    case EvictionSpec::Method::kTova:
    case EvictionSpec::Method::kKeyNorm:
    case EvictionSpec::Method::kScissorhands:
      return budget;
    case EvictionSpec::Method::kSnapKv:  // Right after a Prefill; decode steps add one each.
      return budget < 0 ? std::max<int64_t>(1, spec.snapkv_capacity_tokens) : budget;
    default:
      return kUnlimitedTokens;
  }
}

bool TokenGranular(EvictionSpec::Method method) {
  return method == EvictionSpec::Method::kH2o || method == EvictionSpec::Method::kTova ||
         method == EvictionSpec::Method::kKeyNorm ||
         method == EvictionSpec::Method::kScissorhands || method == EvictionSpec::Method::kSnapKv;
}

}  // namespace

HeadRetention RetainedForHead(const EvictionSpec& spec, HeadRole role, int64_t seq_len,
                              int page_tokens) {
  if (TokenGranular(spec.method)) {
    const HeadRetention full = FullRetention(seq_len, page_tokens);
    const int64_t bound = TokenBound(spec);
    if (bound < 0) return full;
    const int64_t tokens = std::min(seq_len, bound);
    if (tokens == seq_len) return full;
    // Token-granular drops leave partial pages; the engine merges adjacent partial pages whose
    // tokens fit one page, so at most 2 * ceil(tokens / P) + 1 pages remain (a bound).
    const int64_t dense = (tokens + page_tokens - 1) / page_tokens;
    return {.pages = std::min(full.pages, 2 * dense + 1), .tokens = tokens};
  }
  const bool evicts =
      spec.method == EvictionSpec::Method::kStreamingLlm ||
      (spec.method == EvictionSpec::Method::kDuoAttention && role == HeadRole::kStreaming);
  const HeadRetention full = FullRetention(seq_len, page_tokens);
  if (!evicts || seq_len == 0) return full;
  const int64_t p = page_tokens;
  // Pages [0, sink_pages) hold a sink position; pages [first_recent, full.pages) hold a recent
  // position or are the last page. Everything between is dropped.
  const int64_t sink_pages = (spec.window.sink_tokens + p - 1) / p;
  const int64_t window_start = std::max<int64_t>(0, seq_len - spec.window.recent_tokens);
  const int64_t first_recent =
      std::min(window_start / p, full.pages - 1);  // min(): the last page always stays.
  const int64_t kept_head_pages = std::min(sink_pages, first_recent);
  return {.pages = kept_head_pages + (full.pages - first_recent),
          .tokens = kept_head_pages * p + (seq_len - first_recent * p)};
}

absl::StatusOr<KvFootprint> ComputeKvFootprint(const ModelLayout& layout, int64_t seq_len,
                                               const HeadRoles& roles, const EvictionSpec& spec) {
  RETURN_IF_ERROR(ValidateLayout(layout));
  RETURN_IF_ERROR(ValidateWindow(spec.window));
  if (seq_len < 0) {
    return absl::InvalidArgumentError(absl::StrFormat("seq_len must be >= 0, got %d", seq_len));
  }
  if (roles.num_layers() != layout.num_layers || roles.num_kv_heads() != layout.num_kv_heads) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "head roles are %d x %d but the layout has %d layers x %d kv heads", roles.num_layers(),
        roles.num_kv_heads(), layout.num_layers, layout.num_kv_heads));
  }
  KvFootprint footprint;
  footprint.seq_len = seq_len;
  footprint.per_head.reserve(static_cast<size_t>(layout.num_layers) * layout.num_kv_heads);
  const HeadRetention full = FullRetention(seq_len, layout.page_tokens);
  for (int l = 0; l < layout.num_layers; ++l) {
    for (int h = 0; h < layout.num_kv_heads; ++h) {
      const HeadRetention kept =
          RetainedForHead(spec, roles.role(LayerId(l), HeadId(h)), seq_len, layout.page_tokens);
      footprint.per_head.push_back(kept);
      footprint.retained_pages += kept.pages;
      footprint.retained_tokens += kept.tokens;
      footprint.full_pages += full.pages;
    }
  }
  footprint.retained_bytes = footprint.retained_pages * layout.page_bytes();
  footprint.full_bytes = footprint.full_pages * layout.page_bytes();
  return footprint;
}

}  // namespace headwise
