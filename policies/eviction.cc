#include "policies/eviction.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "cachesvc/base/status_macros.h"
#include "policies/score_eviction.h"

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
    case EvictionSpec::Method::kTova:
      return "tova";
    case EvictionSpec::Method::kKeyNorm:
      return "key_norm";
    case EvictionSpec::Method::kScissorhands:
      return "scissorhands";
    case EvictionSpec::Method::kSnapKv:
      return "snapkv";
  }
  return "unknown";
}

std::string_view ScorerNameFor(EvictionSpec::Method method) {
  switch (method) {
    case EvictionSpec::Method::kH2o:
      return "accumulated_attention";
    case EvictionSpec::Method::kTova:
      return "last_attention";
    case EvictionSpec::Method::kKeyNorm:
      return "key_norm";
    case EvictionSpec::Method::kScissorhands:
      return "unimportance_count";
    default:
      return "none";
  }
}

SnapKvPolicy::Options SnapKvOptions(const EvictionSpec& spec) {
  return {.window_tokens = spec.snapkv_window_tokens,
          .capacity_tokens = spec.snapkv_capacity_tokens,
          .kernel_size = spec.snapkv_kernel_size,
          .pooling = spec.snapkv_max_pool ? WindowPooling::kMax : WindowPooling::kAvg};
}

namespace {

// TOVA, key norm and Scissorhands: parameters, defaults and the budget they need.
absl::StatusOr<EvictionSpec> ResolveBudgetedEviction(const headwise::v1::PolicySpec& spec) {
  const headwise::v1::Eviction& e = spec.eviction();
  EvictionSpec resolved;
  if (spec.budget().method_case() == headwise::v1::TokenBudget::METHOD_NOT_SET) {
    return absl::InvalidArgumentError(
        "eviction tova, key_norm and scissorhands need PolicySpec.budget (how many tokens each "
        "head keeps)");
  }
  if (e.has_tova()) {
    resolved.method = EvictionSpec::Method::kTova;
  } else if (e.has_key_norm()) {
    resolved.method = EvictionSpec::Method::kKeyNorm;
    if (e.key_norm().has_recent_tokens()) {
      resolved.key_norm_recent_tokens = e.key_norm().recent_tokens();
    }
    RETURN_IF_ERROR(
        KeyNormPolicy::Create({.recent_tokens = resolved.key_norm_recent_tokens}).status());
  } else {
    const headwise::v1::ScissorhandsEviction& sh = e.scissorhands();
    resolved.method = EvictionSpec::Method::kScissorhands;
    if (sh.has_history_window()) resolved.scissorhands_history_window = sh.history_window();
    if (sh.has_recent_tokens()) resolved.scissorhands_recent_tokens = sh.recent_tokens();
    if (sh.has_drop_fraction()) resolved.scissorhands_drop_fraction = sh.drop_fraction();
    if (sh.has_threshold_tokens()) {
      resolved.scissorhands_threshold_tokens = sh.threshold_tokens();
    } else if (spec.budget().has_uniform()) {
      resolved.scissorhands_threshold_tokens = spec.budget().uniform().tokens();
    } else {
      return absl::InvalidArgumentError(
          "scissorhands needs threshold_tokens unless the budget is uniform");
    }
    RETURN_IF_ERROR(
        ScissorhandsPolicy::Create({.recent_tokens = resolved.scissorhands_recent_tokens,
                                    .drop_fraction = resolved.scissorhands_drop_fraction})
            .status());
    RETURN_IF_ERROR(
        UnimportanceScorer::Create({.history_window = resolved.scissorhands_history_window,
                                    .threshold_tokens = resolved.scissorhands_threshold_tokens})
            .status());
  }
  return resolved;
}

absl::StatusOr<EvictionSpec> ResolveSnapKv(const headwise::v1::SnapKvEviction& s) {
  EvictionSpec resolved;
  resolved.method = EvictionSpec::Method::kSnapKv;
  if (s.has_window_tokens()) resolved.snapkv_window_tokens = s.window_tokens();
  if (s.has_capacity_tokens()) resolved.snapkv_capacity_tokens = s.capacity_tokens();
  if (s.has_kernel_size()) resolved.snapkv_kernel_size = s.kernel_size();
  resolved.snapkv_max_pool = s.pooling() == headwise::v1::SnapKvEviction::POOLING_MAX;
  RETURN_IF_ERROR(SnapKvPolicy::Create(SnapKvOptions(resolved)).status());
  return resolved;
}

absl::StatusOr<EvictionSpec> ResolveMethod(const headwise::v1::PolicySpec& spec) {
  // Roles that make streaming heads (DuoAttention gates, retrieval scores) give the window to
  // those heads only.
  const bool duo_roles =
      spec.head_roles().source_case() == headwise::v1::HeadRolesSource::kDuoAttention ||
      spec.head_roles().source_case() == headwise::v1::HeadRolesSource::kRetrievalScores;
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
    case headwise::v1::Eviction::kTova:
    case headwise::v1::Eviction::kKeyNorm:
    case headwise::v1::Eviction::kScissorhands:
      return ResolveBudgetedEviction(spec);
    case headwise::v1::Eviction::kSnapkv:
      return ResolveSnapKv(spec.eviction().snapkv());
  }
  const headwise::v1::StreamingLlmEviction& streaming = spec.eviction().streaming_llm();
  resolved.method =
      duo_roles ? EvictionSpec::Method::kDuoAttention : EvictionSpec::Method::kStreamingLlm;
  if (streaming.has_sink_tokens()) resolved.window.sink_tokens = streaming.sink_tokens();
  if (streaming.has_recent_tokens()) resolved.window.recent_tokens = streaming.recent_tokens();
  RETURN_IF_ERROR(ValidateWindow(resolved.window));
  return resolved;
}

}  // namespace

absl::StatusOr<EvictionSpec> ResolveEvictionSpec(const headwise::v1::PolicySpec& spec) {
  ASSIGN_OR_RETURN(EvictionSpec resolved, ResolveMethod(spec));
  if (spec.budget().has_uniform())
    resolved.uniform_budget_tokens = spec.budget().uniform().tokens();
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
  // The newest token always stays, even with recent_tokens = 0.
  const int64_t recent = std::max<int64_t>(1, options_.recent_tokens);
  int64_t keep = options_.heavy_tokens + recent;
  if (head.budget_tokens >= 0) keep = std::min(keep, head.budget_tokens);
  return KeepWithinBudget(head, keep, recent, "h2o");
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
    case EvictionSpec::Method::kTova:
      return std::make_unique<TovaPolicy>();
    case EvictionSpec::Method::kKeyNorm: {
      ASSIGN_OR_RETURN(auto policy,
                       KeyNormPolicy::Create({.recent_tokens = spec.key_norm_recent_tokens}));
      return std::unique_ptr<ActionPolicy>(std::move(policy));
    }
    case EvictionSpec::Method::kScissorhands: {
      ASSIGN_OR_RETURN(auto policy, ScissorhandsPolicy::Create(
                                        {.recent_tokens = spec.scissorhands_recent_tokens,
                                         .drop_fraction = spec.scissorhands_drop_fraction}));
      return std::unique_ptr<ActionPolicy>(std::move(policy));
    }
    case EvictionSpec::Method::kSnapKv: {
      ASSIGN_OR_RETURN(auto policy, SnapKvPolicy::Create(SnapKvOptions(spec)));
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
