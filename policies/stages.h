// The six stages of a sequence's policy stack (architecture.md "Policies"; policies.md §9). Each
// stage is a small class with one job that reads metadata and returns a decision; the engine
// applies every decision (plan, then apply). Stages never touch page payloads, tiers or slots.
//
//   RoleSource       which (layer, kv head) is a retrieval or a streaming head
//   BudgetAllocator  how many tokens each head of a layer may keep
//   TokenScorer      how the importance of each held token is updated from attention statistics
//   ActionPolicy     given roles, budgets and scores: which tokens or pages of a head to drop
//   MergePolicy      optional: which of the dropped tokens are merged into kept ones, and how
//   PageSelector     for one query: which pages of a head the kernel reads (default: all)
//   Prefetcher       which units (layers, heads) to stage on the device ahead of need
//
// Contract shared by every stage:
//   * Decisions are pure functions of their inputs and of the stage's own state; a `const`
//     method has no observable side effect. Stateful stages change state only in their
//     non-const event methods.
//   * Clone() returns an independent copy with the same state: a forked sequence's stack starts
//     where its parent's is and then diverges.
//   * The engine calls every method under the sequence's lock: no locking of their own.
//   * Anything random uses an RNG seeded from the spec; nothing reads wall time.
#ifndef HEADWISE_POLICIES_STAGES_H_
#define HEADWISE_POLICIES_STAGES_H_

#include <cstdint>
#include <limits>
#include <memory>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "cachesvc/base/ids.h"
#include "cachesvc/base/layout.h"
#include "policies/head_roles.h"
#include "policies/page_meta.h"

namespace headwise {

// A head's token budget when nothing limits it.
inline constexpr int64_t kUnlimitedTokens = -1;

// The score of a token no attention statistic has reached yet (TokenScorer::InitialScore of the
// attention-driven scorers that replace or count rather than sum): ranks above every real score,
// so such tokens are kept until a query has seen them.
inline constexpr float kUnscored = std::numeric_limits<float>::infinity();

// What a stage sees of one (layer, kv head) of one sequence. Valid only during the call.
struct HeadContext {
  LayerId layer;
  HeadId kv_head;
  HeadRole role = HeadRole::kRetrieval;
  // Tokens per full page (the layout's page_tokens).
  int32_t page_tokens = 0;
  // Tokens appended to this layer so far: positions 0 .. seq_len - 1 exist or existed.
  int64_t seq_len = 0;
  // Decode steps (tokens) the sequence has taken; a prefill chunk of T tokens counts T.
  int64_t step = 0;
  // The head's pages in position order (page ordinal 0 first). A page's tokens are its rows
  // 0 .. token_count - 1 (PageMeta::position gives each row's position).
  absl::Span<const PageMeta> pages;
  // The head's budget from the BudgetAllocator (kUnlimitedTokens: none).
  int64_t budget_tokens = kUnlimitedTokens;
  // With a TokenScorer: one score per held token, page-major (page i row r at
  // scores[i * page_tokens + r]; rows past a page's token_count are unused). Empty otherwise.
  absl::Span<const float> token_scores;
  // With a selector that needs_key_bounds(): per page, the per-channel minimum then maximum of
  // its keys (page i's kmin at key_bounds[i * 2 * head_dim], kmax head_dim floats later), f32.
  // A page whose keys the engine cannot read now (on disk) has -inf / +inf bounds. Empty
  // otherwise.
  absl::Span<const float> key_bounds;
  int head_dim = 0;
  // With an action whose window_tokens() > 0, while it decides after a Prefill call: the
  // observation window's vote for each held token (the attention the chunk's last w queries
  // give it, mean over the group's query heads, summed over the window rows), page-major like
  // token_scores. Empty otherwise (Append, DecodeStep).
  absl::Span<const float> window_votes;
  // With a merge policy that needs_keys(), while it plans: every held token's key as f32,
  // page-major like token_scores (page i row r at keys[(i * page_tokens + r) * head_dim]); the
  // rows of a page the engine cannot read now (on disk) are NaN. Empty otherwise.
  absl::Span<const float> keys;
  // The merge policy's own per-head state (HeadMerges::state of its last plan for this head;
  // empty before the first). Empty otherwise.
  absl::Span<const float> merge_state;
};

// OK when `head` is consistent: page_tokens > 0; every page has 1..page_tokens tokens; rows hold
// strictly increasing positions below seq_len, and pages follow each other in position order;
// token_scores is empty or holds pages.size() * page_tokens floats. INVALID_ARGUMENT otherwise,
// naming the layer, head and page at fault.
absl::Status ValidateHeadContext(const HeadContext& head);

// ---------------------------------------------------------------------------------------------

// Where each head's role comes from. Resolved once, when the sequence is created.
class RoleSource {
 public:
  virtual ~RoleSource() = default;
  // The registry name ("uniform", "duo_attention").
  virtual std::string_view name() const = 0;
  virtual std::unique_ptr<RoleSource> Clone() const = 0;
  // The roles of every (layer, kv head) of `layout`. INVALID_ARGUMENT when the source does not
  // fit the layout (shape of a gate matrix).
  virtual absl::StatusOr<HeadRoles> Resolve(const ModelLayout& layout) const = 0;
};

// How many tokens each head of one layer may keep. Sees the whole layer at once, so methods that
// share a layer's budget between its heads (AdaKV) or follow a pyramid over layers (PyramidKV)
// fit the same seam.
class BudgetAllocator {
 public:
  virtual ~BudgetAllocator() = default;
  virtual std::string_view name() const = 0;
  virtual std::unique_ptr<BudgetAllocator> Clone() const = 0;
  // Writes the budget of each kv head of `layer` (out.size() == num_kv_heads) for a layer of
  // `seq_len` tokens: a token count >= 0 or kUnlimitedTokens. `heads` is empty or holds the
  // layer's heads (heads[h] is kv head h; their budget_tokens are not yet set), for allocators
  // that read held tokens or token scores (AdaKV); those fall back to a score-free rule when it
  // is empty or carries no scores.
  virtual void Allocate(const ModelLayout& layout, const HeadRoles& roles, LayerId layer,
                        int64_t seq_len, absl::Span<const HeadContext> heads,
                        absl::Span<int64_t> out) const = 0;
};

// Which attention statistics a scorer needs from the kernels.
struct StatsNeeds {
  // Per-token probabilities of each decode query (kernels::DecodeArgs::token_probs: the mean
  // over the g query heads of a KV head's group). Default: false.
  bool token_probs = false;
  // The keys of the tokens being appended (as f32), for scorers of key statistics (key norm).
  // Default: false.
  bool appended_keys = false;
};

// How the importance of each held token evolves. The scores themselves live in the engine's page
// table (one float per held token, moved with the token when pages are compacted and dropped
// with it), so a scorer is only the update rule. Every scorer keeps "higher = more important",
// so budget allocators (AdaKV) can rank any scorer's tokens; +infinity marks a token no
// statistic has reached yet (kUnscored).
class TokenScorer {
 public:
  virtual ~TokenScorer() = default;
  virtual std::string_view name() const = 0;
  virtual std::unique_ptr<TokenScorer> Clone() const = 0;
  virtual StatsNeeds needs() const = 0;
  // The score of a token when it is appended. Default: 0.
  virtual float InitialScore() const { return 0.0f; }
  // With needs().appended_keys: the scores of the tokens being appended to one head, from their
  // keys ([n][head_dim] f32, n = out.size()). Default: InitialScore() for each.
  virtual void ScoreAppended(absl::Span<const float> /*keys*/, int /*head_dim*/,
                             absl::Span<float> out) const {
    for (float& x : out) x = InitialScore();
  }
  // One decode query's statistics for one head: probs[i * page_tokens + r] is the probability of
  // page i row r (the layout of HeadContext::token_scores); updates `scores` in place.
  virtual void Accumulate(absl::Span<const float> probs, absl::Span<float> scores) const = 0;
};

// A token of a page: page ordinal and row, as in HeadContext.
struct TokenRef {
  int32_t page = 0;
  int32_t row = 0;
  friend bool operator==(const TokenRef&, const TokenRef&) = default;
};

// One token merged into a kept one, with the weights of its key and value (MergeGroup).
struct MergeSource {
  TokenRef from;
  float k_weight = 0.0f;
  float v_weight = 0.0f;
};

// A merge into one kept token `into` (policies.md §6.0), computed in f32 and stored in the
// layout's dtype:
//   k_into <- k_self * k_into + sum_i sources[i].k_weight * k_from_i    (v likewise)
// With count_bias the kept row also stands for every source's tokens from then on: its logit
// bias becomes ln(e^b_into + sum_i e^b_from_i) (PageMeta::bias; a fresh token counts 1, b = 0),
// so its score keeps the group's softmax mass when the keys agree. The sources are tokens the
// same decision drops; a source may feed several groups (CaM spreads a value over m tokens).
struct MergeGroup {
  TokenRef into;
  float k_self = 1.0f;
  float v_self = 1.0f;
  bool count_bias = false;
  std::vector<MergeSource> sources;
};

// What a MergePolicy decides for one head: the groups (each `into` at most once, ascending) and
// the policy's new per-head state (HeadContext::merge_state), kept when set_state.
struct HeadMerges {
  std::vector<MergeGroup> groups;
  std::vector<float> state;
  bool set_state = false;
};

// What to drop from one head. Both lists are strictly ascending; no token of a page in
// drop_pages appears in drop_tokens. A page that loses every one of its tokens through
// drop_tokens is freed like a dropped page. Empty = keep everything.
struct HeadActions {
  std::vector<int32_t> drop_pages;
  std::vector<TokenRef> drop_tokens;
  // Filled by the stack's MergePolicy, if any (never by the ActionPolicy itself).
  HeadMerges merges;
  bool empty() const { return drop_pages.empty() && drop_tokens.empty(); }
};

// Keep or drop, per head, within the head's budget. Invariant of every action policy: the
// newest token of a head (the last row of its last page) is never dropped.
class ActionPolicy {
 public:
  virtual ~ActionPolicy() = default;
  virtual std::string_view name() const = 0;
  virtual std::unique_ptr<ActionPolicy> Clone() const = 0;
  // Whether Decide reads HeadContext::token_scores (then the stack must have a scorer).
  virtual bool uses_scores() const { return false; }
  // The observation window w a Prefill call's last queries vote with (HeadContext::
  // window_votes); 0: the action needs no votes. Default: 0.
  virtual int64_t window_tokens() const { return 0; }
  // The decision for `head`, whose context the caller has validated (ValidateHeadContext).
  virtual absl::StatusOr<HeadActions> Decide(const HeadContext& head) const = 0;
};

// Merge instead of drop (CaM, D2O, count-biased means): given what the action policy drops from
// a head, which dropped tokens are folded into which kept ones. Runs only when something is
// dropped. The engine applies the merges before the drops; a merge whose pages are shared (fork)
// or not in memory is skipped, and its sources are then simply dropped.
class MergePolicy {
 public:
  virtual ~MergePolicy() = default;
  virtual std::string_view name() const = 0;
  virtual std::unique_ptr<MergePolicy> Clone() const = 0;
  // Whether Plan reads HeadContext::token_scores (the stack then keeps accumulated attention
  // when the action keeps no scores of its own).
  virtual bool uses_scores() const { return false; }
  // Whether Plan reads HeadContext::keys.
  virtual bool needs_keys() const { return false; }
  // The merges of the tokens `drops` removes from `head` (validated; drops not empty).
  virtual absl::StatusOr<HeadMerges> Plan(const HeadContext& head,
                                          const HeadActions& drops) const = 0;
};

// For one decode query of one head: which pages the kernel reads.
class PageSelector {
 public:
  virtual ~PageSelector() = default;
  virtual std::string_view name() const = 0;
  virtual std::unique_ptr<PageSelector> Clone() const = 0;
  // True when every page is always selected (the engine then skips the call).
  virtual bool selects_all() const { return false; }
  // True when Select reads HeadContext::key_bounds (the engine then maintains them).
  virtual bool needs_key_bounds() const { return false; }
  // Appends to `pages` the ordinals (ascending) of the pages of `head` to attend for the group's
  // queries q ([group][head_dim] f32). The last page is always included.
  virtual void Select(const HeadContext& head, absl::Span<const float> q, int group,
                      std::vector<int32_t>* pages) const = 0;
  // The pages Select picks, most critical first (what a transfer budget keeps when it cannot
  // copy them all ahead). Default: the last page, then Select's others in ascending order.
  virtual void Rank(const HeadContext& head, absl::Span<const float> q, int group,
                    std::vector<int32_t>* pages) const;
};

// Which units to bring to the device ahead of the one being computed.
class Prefetcher {
 public:
  virtual ~Prefetcher() = default;
  virtual std::string_view name() const = 0;
  virtual std::unique_ptr<Prefetcher> Clone() const = 0;
  // While layer `layer` of `num_layers` is computed (layer_offload): the layers to stage next,
  // in order. Decode visits layers 0 .. L-1 every step, so the layer after L-1 is 0.
  virtual std::vector<int> LayersAhead(int layer, int num_layers) const = 0;
  // While kv head `head` of `num_heads` is computed (head_offload): the heads of the same layer
  // to stage next, in order.
  virtual std::vector<int> HeadsAhead(int head, int num_heads) const = 0;
  // With a page selector under layer_offload: at most this many pages of a layer are copied
  // ahead of its query (the transfer budget per layer and step, policies.md §7.5 step 3), taken
  // round-robin over the heads in each head's Rank order. -1: every predicted page. Default: -1.
  virtual int64_t pages_per_layer() const { return -1; }
};

}  // namespace headwise

#endif  // HEADWISE_POLICIES_STAGES_H_
