// Eviction: the ActionPolicy stage of the policy stack (policies/stages.h) for the methods that
// drop tokens: which pages or tokens of one (layer, kv head) a sequence drops. Each policy is
// small and pure: Decide reads the head's metadata, role, length and (H2O) token scores and
// returns what to drop; the engine applies it (frees pages, compacts partial ones).
//
// Invariant every policy here keeps (policies.md §9.2): the last page of a head (the one holding
// the newest token, and the one the next token is written to when it is partial) is never
// dropped. StreamingLLM and DuoAttention decide whole pages; H2O decides single tokens.
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
#include "policies/snapkv.h"
#include "policies/stages.h"

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
    // H2O (policies.md §5.2) on every head: the `heavy_tokens` older tokens with the largest
    // accumulated attention plus the `recent_tokens` newest, at token granularity.
    kH2o = 3,
    // TOVA (§5.4, score_eviction.h): the budget's tokens with the highest last-query attention.
    kTova = 4,
    // Key norm (score_eviction.h): `key_norm_recent_tokens` newest + lowest-norm, in the budget.
    kKeyNorm = 5,
    // Scissorhands (§5.3, score_eviction.h): drop the most often unimportant over the budget.
    kScissorhands = 6,
    // SnapKV (§5.5, snapkv.h): after each Prefill call, the window's pooled vote within C.
    kSnapKv = 7,
  };
  // Default: kNone.
  Method method = Method::kNone;
  // Used by kStreamingLlm and kDuoAttention. Default: 64 sinks + 256 recent.
  SinkRecentWindow window;
  // kH2o: heavy hitters kept. Valid: >= 0. Default: 4 (the authors' H2OKVCache_LayerWise).
  int64_t heavy_tokens = 4;
  // kH2o: most recent tokens kept. Valid: >= 0. Default: 512 (the same class).
  int64_t h2o_recent_tokens = 512;
  // kKeyNorm: newest tokens kept. Valid: >= 0. Default: 10.
  int64_t key_norm_recent_tokens = 10;
  // kScissorhands: w (>= 1; default 400), r (>= 0; default 10), m / B ([0, 1); default 0.5) and
  // T (>= 1; default: the uniform budget's tokens).
  int64_t scissorhands_history_window = 400;
  int64_t scissorhands_recent_tokens = 10;
  double scissorhands_drop_fraction = 0.5;
  int64_t scissorhands_threshold_tokens = 0;
  // kSnapKv: w (>= 1; default 32), C (>= 1; default 2048), kernel (odd 1..63; default 5), max
  // pooling (default: average).
  int64_t snapkv_window_tokens = 32;
  int64_t snapkv_capacity_tokens = 2048;
  int32_t snapkv_kernel_size = 5;
  bool snapkv_max_pool = false;
  // PolicySpec.budget.uniform.tokens when the budget is uniform, else kUnlimitedTokens (per-layer
  // and per-head budgets are the BudgetAllocator's). Read by the accounting (accounting.h).
  int64_t uniform_budget_tokens = kUnlimitedTokens;
};

// The TokenScorer registry name a method's scores need: "none" for the score-free methods,
// "accumulated_attention" (H2O), "last_attention" (TOVA), "key_norm", "unimportance_count"
// (Scissorhands).
std::string_view ScorerNameFor(EvictionSpec::Method method);

// The SnapKvPolicy options of a kSnapKv spec.
SnapKvPolicy::Options SnapKvOptions(const EvictionSpec& spec);

// "none", "streaming_llm", "duo_attention", "h2o", "tova", "key_norm", "scissorhands": the
// registry names.
std::string_view EvictionMethodName(EvictionSpec::Method method);

// Resolves the eviction of `spec`:
//   eviction.none                                   -> kNone
//   eviction.streaming_llm, uniform roles           -> kStreamingLlm (every head)
//   eviction.streaming_llm, duo_attention roles     -> kDuoAttention (streaming heads only)
//   eviction unset, duo_attention roles             -> kDuoAttention with 64 + 256
// (retrieval_scores roles behave as duo_attention roles in both rows)
//   eviction unset, uniform roles                   -> kNone
//   eviction.h2o                                    -> kH2o (every head, whatever its role)
//   eviction.tova / key_norm / scissorhands         -> kTova / kKeyNorm / kScissorhands
// Unset sink_tokens / recent_tokens take 64 / 256; unset H2O sizes 4 / 512. INVALID_ARGUMENT
// for a negative count, a parameter out of its range, or TOVA / key norm / Scissorhands without
// PolicySpec.budget (they would keep everything), or Scissorhands without threshold_tokens and
// a uniform budget to take it from.
absl::StatusOr<EvictionSpec> ResolveEvictionSpec(const headwise::v1::PolicySpec& spec);

// Keeps everything.
class NoEvictionPolicy final : public ActionPolicy {
 public:
  std::string_view name() const override { return "none"; }
  std::unique_ptr<ActionPolicy> Clone() const override;
  absl::StatusOr<HeadActions> Decide(const HeadContext& head) const override;
};

// StreamingLLM (policies.md §5.1) at page granularity, on every head regardless of role: a page
// is dropped iff none of its tokens is a sink or in the recent window and it is not the last
// page. When seq_len <= sink + recent nothing is dropped.
class StreamingLlmPolicy final : public ActionPolicy {
 public:
  struct Options {
    // Default: 64 sinks + 256 recent.
    SinkRecentWindow window;
  };
  // INVALID_ARGUMENT for a negative window.
  static absl::StatusOr<std::unique_ptr<StreamingLlmPolicy>> Create(const Options& options);

  std::string_view name() const override { return "streaming_llm"; }
  std::unique_ptr<ActionPolicy> Clone() const override;
  absl::StatusOr<HeadActions> Decide(const HeadContext& head) const override;
  const SinkRecentWindow& window() const { return options_.window; }

 private:
  explicit StreamingLlmPolicy(const Options& options) : options_(options) {}
  Options options_;
};

// DuoAttention (policies.md §2.4, §2.6): RETRIEVAL heads keep every page; STREAMING heads follow
// exactly the StreamingLlmPolicy rule with `window`.
class DuoAttentionPolicy final : public ActionPolicy {
 public:
  struct Options {
    // Window of the streaming heads. Default: 64 sinks + 256 recent (the authors' NIAH and
    // LongBench deployment setting).
    SinkRecentWindow window;
  };
  // INVALID_ARGUMENT for a negative window.
  static absl::StatusOr<std::unique_ptr<DuoAttentionPolicy>> Create(const Options& options);

  std::string_view name() const override { return "duo_attention"; }
  std::unique_ptr<ActionPolicy> Clone() const override;
  absl::StatusOr<HeadActions> Decide(const HeadContext& head) const override;
  const SinkRecentWindow& window() const { return options_.window; }

 private:
  explicit DuoAttentionPolicy(const Options& options) : options_(options) {}
  Options options_;
};

// H2O (policies.md §5.2, FMInference/H2O H2OKVCache_LayerWise), per kv head at token
// granularity. With S tokens held and S > heavy + recent, keeps
//   topk(A over the tokens older than the `recent` newest held ones, heavy) ∪ the recent ones,
// where A is the token score (AccumulatedAttentionScorer: attention summed over decode steps).
// Ties in A keep the older token. Tokens are counted as held, so after drops the window is the
// newest `recent` held tokens, as the authors' code slices its gathered cache. With a head budget
// B (HeadContext::budget_tokens) below heavy + recent the head keeps B: min(recent, B) recent
// tokens and the rest heavy hitters.
class H2oPolicy final : public ActionPolicy {
 public:
  struct Options {
    // Default: 4 (the authors' class default).
    int64_t heavy_tokens = 4;
    // Default: 512.
    int64_t recent_tokens = 512;
  };
  // INVALID_ARGUMENT for a negative count.
  static absl::StatusOr<std::unique_ptr<H2oPolicy>> Create(const Options& options);

  std::string_view name() const override { return "h2o"; }
  std::unique_ptr<ActionPolicy> Clone() const override;
  bool uses_scores() const override { return true; }
  absl::StatusOr<HeadActions> Decide(const HeadContext& head) const override;

 private:
  explicit H2oPolicy(const Options& options) : options_(options) {}
  Options options_;
};

// Registry: the action policy for a resolved spec, or for a PolicySpec (ResolveEvictionSpec
// first). Errors as ResolveEvictionSpec / the policies' Create.
absl::StatusOr<std::unique_ptr<ActionPolicy>> CreateActionPolicy(const EvictionSpec& spec);
absl::StatusOr<std::unique_ptr<ActionPolicy>> CreateActionPolicy(
    const headwise::v1::PolicySpec& spec);

}  // namespace headwise

#endif  // HEADWISE_POLICIES_EVICTION_H_
