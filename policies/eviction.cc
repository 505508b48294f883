#include "policies/eviction.h"

#include <utility>

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

absl::Status ValidateView(const HeadPagesView& view, int64_t seq_len) {
  if (view.page_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("page_tokens must be positive, got %d", view.page_tokens));
  }
  int64_t previous_end = 0;
  for (size_t i = 0; i < view.pages.size(); ++i) {
    const PageMeta& page = view.pages[i];
    if (page.token_count < 1 || page.token_count > view.page_tokens) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "layer %d kv head %d page %d: token_count %d outside [1, %d]", view.layer.value(),
          view.kv_head.value(), i, page.token_count, view.page_tokens));
    }
    if (page.first_position < previous_end) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "layer %d kv head %d page %d: first_position %d overlaps or precedes the page before "
          "(which ends at %d)",
          view.layer.value(), view.kv_head.value(), i, page.first_position, previous_end));
    }
    previous_end = page.end_position();
  }
  if (previous_end > seq_len) {
    return absl::InvalidArgumentError(
        absl::StrFormat("layer %d kv head %d: pages reach position %d past seq_len %d",
                        view.layer.value(), view.kv_head.value(), previous_end - 1, seq_len));
  }
  return absl::OkStatus();
}

// The StreamingLLM rule shared by StreamingLlmPolicy and DuoAttentionPolicy's streaming heads.
EvictionDecision SinkRecentVictims(const HeadPagesView& view, int64_t seq_len,
                                   const SinkRecentWindow& window) {
  EvictionDecision decision;
  const int64_t num_pages = static_cast<int64_t>(view.pages.size());
  for (int64_t i = 0; i + 1 < num_pages; ++i) {  // The last page always stays.
    const PageMeta& page = view.pages[i];
    if (!PageHoldsSinkOrRecent(page.first_position, page.token_count, seq_len, window)) {
      decision.drop.push_back(static_cast<int32_t>(i));
    }
  }
  return decision;
}

}  // namespace

absl::StatusOr<EvictionDecision> NoEvictionPolicy::ChooseVictims(const HeadPagesView& pages,
                                                                 HeadRole /*role*/,
                                                                 int64_t seq_len) const {
  RETURN_IF_ERROR(ValidateView(pages, seq_len));
  return EvictionDecision{};
}

absl::StatusOr<std::unique_ptr<StreamingLlmPolicy>> StreamingLlmPolicy::Create(
    const Options& options) {
  RETURN_IF_ERROR(ValidateWindow(options.window));
  return std::unique_ptr<StreamingLlmPolicy>(new StreamingLlmPolicy(options));
}

absl::StatusOr<EvictionDecision> StreamingLlmPolicy::ChooseVictims(const HeadPagesView& pages,
                                                                   HeadRole /*role*/,
                                                                   int64_t seq_len) const {
  RETURN_IF_ERROR(ValidateView(pages, seq_len));
  return SinkRecentVictims(pages, seq_len, options_.window);
}

absl::StatusOr<std::unique_ptr<DuoAttentionPolicy>> DuoAttentionPolicy::Create(
    const Options& options) {
  RETURN_IF_ERROR(ValidateWindow(options.window));
  return std::unique_ptr<DuoAttentionPolicy>(new DuoAttentionPolicy(options));
}

absl::StatusOr<EvictionDecision> DuoAttentionPolicy::ChooseVictims(const HeadPagesView& pages,
                                                                   HeadRole role,
                                                                   int64_t seq_len) const {
  RETURN_IF_ERROR(ValidateView(pages, seq_len));
  if (role == HeadRole::kRetrieval) return EvictionDecision{};
  return SinkRecentVictims(pages, seq_len, options_.window);
}

absl::StatusOr<std::unique_ptr<EvictionPolicy>> CreateEvictionPolicy(const EvictionSpec& spec) {
  switch (spec.method) {
    case EvictionSpec::Method::kNone:
      return std::make_unique<NoEvictionPolicy>();
    case EvictionSpec::Method::kStreamingLlm: {
      ASSIGN_OR_RETURN(auto policy, StreamingLlmPolicy::Create({.window = spec.window}));
      return std::unique_ptr<EvictionPolicy>(std::move(policy));
    }
    case EvictionSpec::Method::kDuoAttention: {
      ASSIGN_OR_RETURN(auto policy, DuoAttentionPolicy::Create({.window = spec.window}));
      return std::unique_ptr<EvictionPolicy>(std::move(policy));
    }
  }
  return absl::InvalidArgumentError(
      absl::StrFormat("unknown eviction method %d", static_cast<int>(spec.method)));
}

absl::StatusOr<std::unique_ptr<EvictionPolicy>> CreateEvictionPolicy(
    const headwise::v1::PolicySpec& spec) {
  ASSIGN_OR_RETURN(EvictionSpec resolved, ResolveEvictionSpec(spec));
  return CreateEvictionPolicy(resolved);
}

}  // namespace headwise
