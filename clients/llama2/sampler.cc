#include "clients/llama2/sampler.h"

#include <algorithm>
#include <cmath>

namespace headwise::llama2 {

uint32_t RandomU32(uint64_t* state) {
  *state ^= *state >> 12;
  *state ^= *state << 25;
  *state ^= *state >> 27;
  return static_cast<uint32_t>((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

float RandomF32(uint64_t* state) { return static_cast<float>(RandomU32(state) >> 8) / 16777216.0f; }

void Softmax(absl::Span<float> x) {
  if (x.empty()) return;
  float max_val = x[0];
  for (size_t i = 1; i < x.size(); ++i) max_val = std::max(max_val, x[i]);
  float sum = 0.0f;
  for (float& v : x) {
    v = std::exp(v - max_val);
    sum += v;
  }
  for (float& v : x) v /= sum;
}

Sampler::Sampler(const SamplerOptions& options)
    : temperature_(options.temperature < 0.0f ? 0.0f : options.temperature),
      top_p_(options.top_p < 0.0f || options.top_p > 1.0f ? 0.9f : options.top_p),
      rng_state_(options.seed) {}

int Sampler::Argmax(absl::Span<const float> values) {
  int best = 0;
  for (size_t i = 1; i < values.size(); ++i) {
    if (values[i] > values[best]) best = static_cast<int>(i);
  }
  return best;
}

int Sampler::Sample(absl::Span<float> logits) {
  if (temperature_ == 0.0f) return Argmax(logits);
  for (float& v : logits) v /= temperature_;
  Softmax(logits);
  const float coin = RandomF32(&rng_state_);
  if (top_p_ <= 0.0f || top_p_ >= 1.0f) {
    // run.c's sample_mult.
    float cdf = 0.0f;
    for (size_t i = 0; i < logits.size(); ++i) {
      cdf += logits[i];
      if (coin < cdf) return static_cast<int>(i);
    }
    return static_cast<int>(logits.size()) - 1;
  }
  return SampleTopP(logits, coin);
}

int Sampler::SampleTopP(absl::Span<const float> probs, float coin) {
  const int n = static_cast<int>(probs.size());
  if (n <= 1) return 0;
  // Tokens below the cutoff cannot be in the nucleus; dropping them first keeps the sort short.
  const float cutoff = (1.0f - top_p_) / static_cast<float>(n - 1);
  scratch_.clear();
  for (int i = 0; i < n; ++i) {
    if (probs[i] >= cutoff) scratch_.push_back({probs[i], i});
  }
  // run.c uses qsort; glibc's is a merge sort, hence stable for equal probabilities.
  std::stable_sort(scratch_.begin(), scratch_.end(),
                   [](const ProbIndex& a, const ProbIndex& b) { return a.prob > b.prob; });
  // Possible only for top_p <= 1/n over a near-uniform distribution; run.c would read
  // probindex[-1] here.
  if (scratch_.empty()) return Argmax(probs);
  float cumulative = 0.0f;
  int last = static_cast<int>(scratch_.size()) - 1;
  for (int i = 0; i < static_cast<int>(scratch_.size()); ++i) {
    cumulative += scratch_[i].prob;
    if (cumulative > top_p_) {
      last = i;
      break;
    }
  }
  const float r = coin * cumulative;
  float cdf = 0.0f;
  for (int i = 0; i <= last; ++i) {
    cdf += scratch_[i].prob;
    if (r < cdf) return scratch_[i].index;
  }
  return scratch_[last].index;
}

}  // namespace headwise::llama2
