// Eviction policies: which pages of one (layer, kv head) a sequence may drop. A policy is small
// and pure (architecture.md "Plan, then apply"): ChooseVictims reads page metadata, the head's
// role and the sequence length, and returns page ordinals; the engine applies the decision
// (frees or demotes the pages). Events let stateful policies (H2O, SnapKV, ...) accumulate
// statistics; the policies here are stateless and ignore them.
//
// Invariants every policy here keeps (policies.md §9.2): decisions are page-granular; the last
// page of a head (the one holding the newest token, and the one the next token is written to
// when it is partial) is never dropped.
#ifndef HEADWISE_POLICIES_EVICTION_H_
#define HEADWISE_POLICIES_EVICTION_H_

#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "cachesvc/base/ids.h"
#include "headwise/v1/policy.pb.h"
#include "policies/head_roles.h"
#include "policies/page_meta.h"

namespace headwise {

// Attention sinks plus a recent window, in tokens (StreamingLLM, policies.md §5.1; DuoAttention
// streaming heads, §2.4).
struct SinkRecentWindow {
  // Positions [0, sink_tokens) are kept. Valid: >= 0. Default: 64 (DuoAttention's deployment
  // setting; StreamingLLM's code uses 4).
  int64_t sink_tokens = 64;
  // Positions [seq_len - recent_tokens, seq_len) are kept. Valid: >= 0. Default: 256.
  int64_t recent_tokens = 256;
};

// OK when both counts are >= 0; INVALID_ARGUMENT naming the bad one otherwise.
absl::Status ValidateWindow(const SinkRecentWindow& window);

// The per-token rule at page granularity: true when a page holding positions
// [first_position, first_position + token_count) has at least one sink position
// (< sink_tokens) or one position in the recent window [seq_len - recent_tokens, seq_len).
bool PageHoldsSinkOrRecent(int64_t first_position, int64_t token_count, int64_t seq_len,
                           const SinkRecentWindow& window);

// Which eviction method a PolicySpec resolves to, with its parameters validated and defaults
// filled in. This is what both the policies and the accounting functions (accounting.h) read,
// so the two cannot disagree.
struct EvictionSpec {
  enum class Method : uint8_t {
    // Every head keeps everything.
    kNone = 0,
    // StreamingLLM on every head, whatever its role.
    kStreamingLlm = 1,
    // DuoAttention: RETRIEVAL heads keep everything; STREAMING heads keep `window`.
    kDuoAttention = 2,
  };
  // Default: kNone.
  Method method = Method::kNone;
  // Used by kStreamingLlm and kDuoAttention. Default: 64 sinks + 256 recent.
  SinkRecentWindow window;
};

// "none", "streaming_llm", "duo_attention": the registry names.
std::string_view EvictionMethodName(EvictionSpec::Method method);

// Resolves the eviction of `spec`:
//   eviction.none                                   -> kNone
//   eviction.streaming_llm, uniform roles           -> kStreamingLlm (every head)
//   eviction.streaming_llm, duo_attention roles     -> kDuoAttention (streaming heads only)
//   eviction unset, duo_attention roles             -> kDuoAttention with 64 + 256
//   eviction unset, uniform roles                   -> kNone
// Unset sink_tokens / recent_tokens take 64 / 256. INVALID_ARGUMENT for a negative window.
absl::StatusOr<EvictionSpec> ResolveEvictionSpec(const headwise::v1::PolicySpec& spec);

// Phases of an engine step (policies.md §9.2 on_step).
enum class StepPhase : uint8_t { kPrefillChunkEnd = 0, kPrefillEnd = 1, kDecode = 2 };

// K/V of `token_count` tokens starting at `first_position` were written to (layer, kv_head).
struct AppendEvent {
  LayerId layer;
  HeadId kv_head;
  int64_t first_position = 0;
  int64_t token_count = 0;
};

// Per-page attention statistics from the attention kernel for one (layer, kv head): the
// probability mass each page received in this step, summed over the group's query heads,
// indexed by page ordinal. The span is valid only during the call.
struct AttentionStatsEvent {
  LayerId layer;
  HeadId kv_head;
  int64_t step = 0;
  absl::Span<const float> page_mass;
};

// The end of a decode step or prefill chunk; `seq_len` is the length after it.
struct StepEvent {
  int64_t step = 0;
  StepPhase phase = StepPhase::kDecode;
  int64_t seq_len = 0;
};

// What to drop from one (layer, kv head): page ordinals into the HeadPagesView the decision was
// made on, strictly ascending. Empty = keep everything.
struct EvictionDecision {
  std::vector<int32_t> drop;
};

// One instance per sequence (policies may keep per-sequence state from events). The engine
// calls every method under the sequence's lock, so implementations need no locking of their
// own; ChooseVictims is const and must not change observable state.
class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;

  // The registry name ("none", "streaming_llm", "duo_attention").
  virtual std::string_view name() const = 0;

  // Events (policies.md §9.2). Defaults do nothing.
  virtual void OnAppend(const AppendEvent& /*event*/) {}
  virtual void OnAttentionStats(const AttentionStatsEvent& /*event*/) {}
  virtual void OnStep(const StepEvent& /*event*/) {}

  // Decides which pages of `pages` to drop for a head with `role` in a sequence of `seq_len`
  // tokens (positions 0..seq_len-1 have been appended). No side effects. INVALID_ARGUMENT when
  // the view is inconsistent: page_tokens <= 0, a page with token_count outside
  // [1, page_tokens], pages not in strictly increasing, non-overlapping position order, or a
  // page reaching past seq_len.
  virtual absl::StatusOr<EvictionDecision> ChooseVictims(const HeadPagesView& pages, HeadRole role,
                                                         int64_t seq_len) const = 0;
};

// Keeps everything.
class NoEvictionPolicy final : public EvictionPolicy {
 public:
  std::string_view name() const override { return "none"; }
  absl::StatusOr<EvictionDecision> ChooseVictims(const HeadPagesView& pages, HeadRole role,
                                                 int64_t seq_len) const override;
};

// StreamingLLM (policies.md §5.1) at page granularity, on every head regardless of role: a page
// is dropped iff none of its tokens is a sink or in the recent window and it is not the last
// page. When seq_len <= sink + recent nothing is dropped.
class StreamingLlmPolicy final : public EvictionPolicy {
 public:
  struct Options {
    // Default: 64 sinks + 256 recent.
    SinkRecentWindow window;
  };
  // INVALID_ARGUMENT for a negative window.
  static absl::StatusOr<std::unique_ptr<StreamingLlmPolicy>> Create(const Options& options);

  std::string_view name() const override { return "streaming_llm"; }
  absl::StatusOr<EvictionDecision> ChooseVictims(const HeadPagesView& pages, HeadRole role,
                                                 int64_t seq_len) const override;
  const SinkRecentWindow& window() const { return options_.window; }

 private:
  explicit StreamingLlmPolicy(const Options& options) : options_(options) {}
  Options options_;
};

// DuoAttention (policies.md §2.4, §2.6): RETRIEVAL heads keep every page; STREAMING heads follow
// exactly the StreamingLlmPolicy rule with `window`.
class DuoAttentionPolicy final : public EvictionPolicy {
 public:
  struct Options {
    // Window of the streaming heads. Default: 64 sinks + 256 recent (the authors' NIAH and
    // LongBench deployment setting).
    SinkRecentWindow window;
  };
  // INVALID_ARGUMENT for a negative window.
  static absl::StatusOr<std::unique_ptr<DuoAttentionPolicy>> Create(const Options& options);

  std::string_view name() const override { return "duo_attention"; }
  absl::StatusOr<EvictionDecision> ChooseVictims(const HeadPagesView& pages, HeadRole role,
                                                 int64_t seq_len) const override;
  const SinkRecentWindow& window() const { return options_.window; }

 private:
  explicit DuoAttentionPolicy(const Options& options) : options_(options) {}
  Options options_;
};

// Registry: the policy for a resolved spec, or for a PolicySpec (ResolveEvictionSpec first).
// Errors as ResolveEvictionSpec / the policies' Create.
absl::StatusOr<std::unique_ptr<EvictionPolicy>> CreateEvictionPolicy(const EvictionSpec& spec);
absl::StatusOr<std::unique_ptr<EvictionPolicy>> CreateEvictionPolicy(
    const headwise::v1::PolicySpec& spec);

}  // namespace headwise

#endif  // HEADWISE_POLICIES_EVICTION_H_
