// SnapKV (policies.md §5.5; FasterDecoding/SnapKV snapkv/monkeypatch/snapkv_utils.py
// SnapKVCluster.update_kv): after a Prefill call, the chunk's last w queries vote for the tokens
// that matter (HeadContext::window_votes: their attention, mean over the kv head's group, summed
// over the window; the engine computes it with kernels::PrefillWindowVotes), the votes are
// smoothed by a 1-D pool over neighbouring held tokens, and each kv head keeps
//
//   keep = the w newest held tokens  ∪  topk(pool(vote) over the older held tokens, C − w)
//
// (ties: the older token) when it holds more than C tokens. C is the head's budget from the
// BudgetAllocator when one is set (PyramidKV, AdaKV and HeadKV build on SnapKV this way), else
// `capacity_tokens`. Appends and decode steps carry no votes and drop nothing. Per kv head over
// its query group (the reference's repeat_kv per query head inflates the cache g-fold, §0.3).
#ifndef HEADWISE_POLICIES_SNAPKV_H_
#define HEADWISE_POLICIES_SNAPKV_H_

#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "policies/stages.h"

namespace headwise {

enum class WindowPooling { kAvg, kMax };

// Pool1D(x, kernel, stride 1, padding kernel / 2) as torch's avg_pool1d (zero padding counted:
// every output is divided by `kernel`) or max_pool1d (padding never wins). REQUIRES: kernel odd
// and >= 1. The output has x.size() values.
std::vector<float> PoolVotes(absl::Span<const float> x, int kernel, WindowPooling pooling);

class SnapKvPolicy final : public ActionPolicy {
 public:
  struct Options {
    // w: the chunk's last w queries vote, and the w newest tokens are kept. Valid: >= 1.
    // Default: 32 (init_snapkv and the LongBench configs).
    int64_t window_tokens = 32;
    // C, tokens kept per head when no budget is set (window included). Valid: >= 1. Default:
    // 2048 (init_snapkv's max_capacity_prompt).
    int64_t capacity_tokens = 2048;
    // Pooling kernel. Valid: odd, 1..63. Default: 5 (init_snapkv; LongBench uses 7).
    int32_t kernel_size = 5;
    // Default: average (init_snapkv; LongBench uses max).
    WindowPooling pooling = WindowPooling::kAvg;
  };
  static absl::StatusOr<std::unique_ptr<SnapKvPolicy>> Create(const Options& options);

  std::string_view name() const override { return "snapkv"; }
  std::unique_ptr<ActionPolicy> Clone() const override;
  int64_t window_tokens() const override { return options_.window_tokens; }
  absl::StatusOr<HeadActions> Decide(const HeadContext& head) const override;
  const Options& options() const { return options_; }

 private:
  explicit SnapKvPolicy(const Options& options) : options_(options) {}
  Options options_;
};

}  // namespace headwise

#endif  // HEADWISE_POLICIES_SNAPKV_H_
