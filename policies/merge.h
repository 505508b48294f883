// Merging (policies.md §6): MergePolicy stages that fold the tokens an eviction drops into the
// tokens it keeps, instead of losing them. They decide; the engine applies (cachesvc/
// engine_merge.cc: the weighted sums in f32 and the logit bias of count-biased rows).
//
//   cam   CaM (§6.1): a dropped token's value, with probability S(p) / max_kept S(j), is spread
//         over the values of the next m kept tokens; keys untouched.
//   d2o   D2O (§6.2, appendix §4): a dropped token whose best key cosine similarity to a kept
//         token reaches an EMA threshold joins that token, weighted by the similarity.
//   mean  count-biased mean (§6.0): a dropped token joins its most similar kept key as a
//         count-weighted mean, and the kept row carries the bias ln n.
//
// Each Plan is a pure function of the head's metadata, scores, keys and the policy's per-head
// state (D2O's threshold), so a replay plans the same merges.
#ifndef HEADWISE_POLICIES_MERGE_H_
#define HEADWISE_POLICIES_MERGE_H_

#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "headwise/v1/policy.pb.h"
#include "policies/stages.h"

namespace headwise {

// The merge method a PolicySpec names, validated, defaults filled in.
struct MergeSpec {
  enum class Method : uint8_t { kNone = 0, kCam = 1, kD2o = 2, kMean = 3 };
  Method method = Method::kNone;
  // kCam: m, the kept tokens after a dropped one that share its value. Valid: 1..4096.
  // Default: 16.
  int32_t cam_span = 16;
  // kCam: seed of the Bernoulli draws. Default: 0.
  uint64_t cam_seed = 0;
  // kD2o: the EMA weights of the threshold. Valid: [0, 1]. Default: 0.5 each.
  double d2o_alpha = 0.5;
  double d2o_beta = 0.5;
};

// INVALID_ARGUMENT naming the field for an out-of-range parameter.
absl::StatusOr<MergeSpec> ResolveMergeSpec(const headwise::v1::PolicySpec& spec);
// The registry name of `method`: "none", "cam", "d2o", "mean".
std::string_view MergeMethodName(MergeSpec::Method method);

// The tokens of `head` that `drops` removes and the ones it keeps, each in position order.
struct HeadSplit {
  std::vector<TokenRef> dropped;
  std::vector<TokenRef> kept;
};
HeadSplit SplitByDrops(const HeadContext& head, const HeadActions& drops);

// Cosine similarity of two rows of HeadContext::keys; NaN when either row is unreadable (NaN).
float KeyCosine(const HeadContext& head, TokenRef a, TokenRef b);

// The probability CaM merges a dropped token of score `dropped` when the kept tokens' largest
// score is `kept_max`: clamp(dropped / kept_max, 0, 1); 1 for an unscored (+inf) token, 0 when
// nothing kept is scored above 0.
float CamMergeProbability(float dropped, float kept_max);
// CaM's draw for the token at `position` of (layer, kv head): a uniform in [0, 1), a pure
// function of its arguments (SplitMix64).
double CamDraw(uint64_t seed, int32_t layer, int32_t kv_head, int64_t position);

class CamMergePolicy final : public MergePolicy {
 public:
  explicit CamMergePolicy(const MergeSpec& spec) : spec_(spec) {}
  std::string_view name() const override { return "cam"; }
  std::unique_ptr<MergePolicy> Clone() const override;
  bool uses_scores() const override { return true; }
  absl::StatusOr<HeadMerges> Plan(const HeadContext& head, const HeadActions& drops) const override;

 private:
  MergeSpec spec_;
};

class D2oMergePolicy final : public MergePolicy {
 public:
  explicit D2oMergePolicy(const MergeSpec& spec) : spec_(spec) {}
  std::string_view name() const override { return "d2o"; }
  std::unique_ptr<MergePolicy> Clone() const override;
  bool needs_keys() const override { return true; }
  // state: {tau} after the head's first eviction.
  absl::StatusOr<HeadMerges> Plan(const HeadContext& head, const HeadActions& drops) const override;

 private:
  MergeSpec spec_;
};

class MeanMergePolicy final : public MergePolicy {
 public:
  std::string_view name() const override { return "mean"; }
  std::unique_ptr<MergePolicy> Clone() const override;
  bool needs_keys() const override { return true; }
  absl::StatusOr<HeadMerges> Plan(const HeadContext& head, const HeadActions& drops) const override;
};

}  // namespace headwise

#endif  // HEADWISE_POLICIES_MERGE_H_
