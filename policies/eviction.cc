#include "policies/eviction.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "cachesvc/base/status_macros.h"

namespace headwise {

absl::Status ValidateWindow(const SinkRecentWindow& window) {
  if (window.sink_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("sink_tokens must be >= 0, got %d", window.sink_tokens));
  }
  if (window.recent_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("recent_tokens must be >= 0, got %d", window.recent_tokens));
  }
  return absl::OkStatus();
}

bool PageHoldsSinkOrRecent(int64_t first_position, int64_t token_count, int64_t seq_len,
                           const SinkRecentWindow& window) {
  const int64_t last_position = first_position + token_count - 1;
  const bool holds_sink = first_position < window.sink_tokens;
  const bool holds_recent = last_position >= seq_len - window.recent_tokens;
  return holds_sink || holds_recent;
}

std::string_view EvictionMethodName(EvictionSpec::Method method) {
  switch (method) {
    case EvictionSpec::Method::kNone:
      return "none";
    case EvictionSpec::Method::kStreamingLlm:
      return "streaming_llm";
    case EvictionSpec::Method::kDuoAttention:
      return "duo_attention";
    case EvictionSpec::Method::kH2o:
      return "h2o";
  }
  return "unknown";
}

absl::StatusOr<EvictionSpec> ResolveEvictionSpec(const headwise::v1::PolicySpec& spec) {
  const bool duo_roles =
      spec.head_roles().source_case() == headwise::v1::HeadRolesSource::kDuoAttention;
  EvictionSpec resolved;
  switch (spec.eviction().method_case()) {
    case headwise::v1::Eviction::kNone:
      resolved.method = EvictionSpec::Method::kNone;
      return resolved;
    case headwise::v1::Eviction::METHOD_NOT_SET:
      resolved.method =
          duo_roles ? EvictionSpec::Method::kDuoAttention : EvictionSpec::Method::kNone;
      return resolved;
    case headwise::v1::Eviction::kStreamingLlm:
      break;
    case headwise::v1::Eviction::kH2O: {
      const headwise::v1::H2oEviction& h2o = spec.eviction().h2o();
      resolved.method = EvictionSpec::Method::kH2o;
      if (h2o.has_heavy_tokens()) resolved.heavy_tokens = h2o.heavy_tokens();
      if (h2o.has_recent_tokens()) resolved.h2o_recent_tokens = h2o.recent_tokens();
      if (resolved.heavy_tokens < 0 || resolved.h2o_recent_tokens < 0) {
        return absl::InvalidArgumentError(
            absl::StrFormat("h2o heavy_tokens and recent_tokens must be >= 0, got %d and %d",
                            resolved.heavy_tokens, resolved.h2o_recent_tokens));
      }
      return resolved;
    }
  }
  const headwise::v1::StreamingLlmEviction& streaming = spec.eviction().streaming_llm();
  resolved.method =
      duo_roles ? EvictionSpec::Method::kDuoAttention : EvictionSpec::Method::kStreamingLlm;
  if (streaming.has_sink_tokens()) resolved.window.sink_tokens = streaming.sink_tokens();
  if (streaming.has_recent_tokens()) resolved.window.recent_tokens = streaming.recent_tokens();
  RETURN_IF_ERROR(ValidateWindow(resolved.window));
  return resolved;
}

namespace {

// The StreamingLLM rule shared by StreamingLlmPolicy and DuoAttentionPolicy's streaming heads.
HeadActions SinkRecentVictims(const HeadContext& head, const SinkRecentWindow& window) {
  HeadActions actions;
  const int64_t num_pages = static_cast<int64_t>(head.pages.size());
  for (int64_t i = 0; i + 1 < num_pages; ++i) {  // The last page always stays.
    const PageMeta& page = head.pages[i];
    const bool holds_sink = page.first_position < window.sink_tokens;
    const bool holds_recent = page.last_position() >= head.seq_len - window.recent_tokens;
    if (!holds_sink && !holds_recent) actions.drop_pages.push_back(static_cast<int32_t>(i));
  }
  return actions;
}

}  // namespace

std::unique_ptr<ActionPolicy> NoEvictionPolicy::Clone() const {
  return std::make_unique<NoEvictionPolicy>();
}

absl::StatusOr<HeadActions> NoEvictionPolicy::Decide(const HeadContext& /*head*/) const {
  return HeadActions{};
}

absl::StatusOr<std::unique_ptr<StreamingLlmPolicy>> StreamingLlmPolicy::Create(
    const Options& options) {
  RETURN_IF_ERROR(ValidateWindow(options.window));
  return std::unique_ptr<StreamingLlmPolicy>(new StreamingLlmPolicy(options));
}

std::unique_ptr<ActionPolicy> StreamingLlmPolicy::Clone() const {
  return std::unique_ptr<ActionPolicy>(new StreamingLlmPolicy(options_));
}

absl::StatusOr<HeadActions> StreamingLlmPolicy::Decide(const HeadContext& head) const {
  return SinkRecentVictims(head, options_.window);
}

absl::StatusOr<std::unique_ptr<DuoAttentionPolicy>> DuoAttentionPolicy::Create(
    const Options& options) {
  RETURN_IF_ERROR(ValidateWindow(options.window));
  return std::unique_ptr<DuoAttentionPolicy>(new DuoAttentionPolicy(options));
}

std::unique_ptr<ActionPolicy> DuoAttentionPolicy::Clone() const {
  return std::unique_ptr<ActionPolicy>(new DuoAttentionPolicy(options_));
}

absl::StatusOr<HeadActions> DuoAttentionPolicy::Decide(const HeadContext& head) const {
  if (head.role == HeadRole::kRetrieval) return HeadActions{};
  return SinkRecentVictims(head, options_.window);
}

absl::StatusOr<std::unique_ptr<H2oPolicy>> H2oPolicy::Create(const Options& options) {
  if (options.heavy_tokens < 0 || options.recent_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("h2o heavy_tokens and recent_tokens must be >= 0, got %d and %d",
                        options.heavy_tokens, options.recent_tokens));
  }
  return std::unique_ptr<H2oPolicy>(new H2oPolicy(options));
}

std::unique_ptr<ActionPolicy> H2oPolicy::Clone() const {
  return std::unique_ptr<ActionPolicy>(new H2oPolicy(options_));
}

absl::StatusOr<HeadActions> H2oPolicy::Decide(const HeadContext& head) const {
  std::vector<TokenRef> held;
  for (size_t i = 0; i < head.pages.size(); ++i) {
    for (int r = 0; r < head.pages[i].token_count; ++r) {
      held.push_back(TokenRef{static_cast<int32_t>(i), r});
    }
  }
  const int64_t n = static_cast<int64_t>(held.size());
  // The newest token always stays, even with recent_tokens = 0.
  const int64_t recent = std::max<int64_t>(1, options_.recent_tokens);
  if (n <= options_.heavy_tokens + recent) return HeadActions{};
  if (head.token_scores.size() != head.pages.size() * static_cast<size_t>(head.page_tokens)) {
    return absl::FailedPreconditionError(
        "h2o needs token scores (an accumulated-attention scorer)");
  }
  const auto score = [&](const TokenRef& t) {
    return head.token_scores[static_cast<size_t>(t.page) * head.page_tokens + t.row];
  };
  // Candidates: every held token but the `recent` newest, already in position order.
  std::vector<int64_t> order(n - recent);
  for (int64_t i = 0; i < n - recent; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return score(held[a]) > score(held[b]); });
  std::vector<bool> keep(n - recent, false);
  for (int64_t i = 0; i < options_.heavy_tokens; ++i) keep[order[i]] = true;
  HeadActions actions;
  for (int64_t i = 0; i < n - recent; ++i) {
    if (!keep[i]) actions.drop_tokens.push_back(held[i]);
  }
  // Pages losing every token are dropped whole (no compaction of an emptied page).
  HeadActions out;
  size_t i = 0;
  while (i < actions.drop_tokens.size()) {
    const int32_t page = actions.drop_tokens[i].page;
    size_t j = i;
    while (j < actions.drop_tokens.size() && actions.drop_tokens[j].page == page) ++j;
    if (static_cast<int32_t>(j - i) == head.pages[page].token_count) {
      out.drop_pages.push_back(page);
    } else {
      out.drop_tokens.insert(out.drop_tokens.end(), actions.drop_tokens.begin() + i,
                             actions.drop_tokens.begin() + j);
    }
    i = j;
  }
  return out;
}

absl::StatusOr<std::unique_ptr<ActionPolicy>> CreateActionPolicy(const EvictionSpec& spec) {
  switch (spec.method) {
    case EvictionSpec::Method::kNone:
      return std::make_unique<NoEvictionPolicy>();
    case EvictionSpec::Method::kStreamingLlm: {
      ASSIGN_OR_RETURN(auto policy, StreamingLlmPolicy::Create({.window = spec.window}));
      return std::unique_ptr<ActionPolicy>(std::move(policy));
    }
    case EvictionSpec::Method::kDuoAttention: {
      ASSIGN_OR_RETURN(auto policy, DuoAttentionPolicy::Create({.window = spec.window}));
      return std::unique_ptr<ActionPolicy>(std::move(policy));
    }
    case EvictionSpec::Method::kH2o: {
      ASSIGN_OR_RETURN(auto policy, H2oPolicy::Create({.heavy_tokens = spec.heavy_tokens,
                                                       .recent_tokens = spec.h2o_recent_tokens}));
      return std::unique_ptr<ActionPolicy>(std::move(policy));
    }
  }
  return absl::InvalidArgumentError(
      absl::StrFormat("unknown eviction method %d", static_cast<int>(spec.method)));
}

absl::StatusOr<std::unique_ptr<ActionPolicy>> CreateActionPolicy(
    const headwise::v1::PolicySpec& spec) {
  ASSIGN_OR_RETURN(EvictionSpec resolved, ResolveEvictionSpec(spec));
  return CreateActionPolicy(resolved);
}

}  // namespace headwise
