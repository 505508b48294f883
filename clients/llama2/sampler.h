// Sampler: next-token selection with llama2.c run.c's semantics, so that a given seed yields the
// same tokens as run.c on the same logits: temperature 0 is argmax; otherwise the logits are
// divided by the temperature, softmaxed, and one coin from run.c's xorshift* generator picks a
// token from the whole distribution (top_p <= 0 or >= 1) or from the nucleus (top-p sampling with
// run.c's cutoff (1 - top_p) / (vocab - 1) that drops hopeless candidates before sorting).
//
// Thread-compatible: one Sampler per generation.
#ifndef HEADWISE_CLIENTS_LLAMA2_SAMPLER_H_
#define HEADWISE_CLIENTS_LLAMA2_SAMPLER_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"

namespace headwise::llama2 {

struct SamplerOptions {
  // 0 = greedy (argmax). Negative values are treated as 0, as run.c does. Default: 1.0.
  float temperature = 1.0f;
  // Nucleus mass; values outside [0, 1] become 0.9, as run.c does. Default: 0.9.
  float top_p = 0.9f;
  // Seed of the xorshift* state. Must be nonzero (xorshift would stay at 0); run.c replaces 0
  // with the wall-clock time, which callers do themselves (see main.cc). Default: 42.
  uint64_t seed = 42;
};

// run.c's random_u32 / random_f32 (xorshift*), exposed for tests.
uint32_t RandomU32(uint64_t* state);
float RandomF32(uint64_t* state);

class Sampler {
 public:
  explicit Sampler(const SamplerOptions& options);

  // Picks the next token from `logits` (one per vocabulary entry). Like run.c, overwrites
  // `logits` with the tempered probabilities when temperature > 0. Advances the RNG by one
  // draw per call when temperature > 0 and not at all when greedy.
  int Sample(absl::Span<float> logits);

  // Index of the first maximum (run.c's sample_argmax).
  static int Argmax(absl::Span<const float> values);

  float temperature() const { return temperature_; }
  float top_p() const { return top_p_; }

 private:
  struct ProbIndex {
    float prob;
    int index;
  };
  int SampleTopP(absl::Span<const float> probs, float coin);

  float temperature_;
  float top_p_;
  uint64_t rng_state_;
  std::vector<ProbIndex> scratch_;
};

// run.c's softmax, in place.
void Softmax(absl::Span<float> x);

}  // namespace headwise::llama2

#endif  // HEADWISE_CLIENTS_LLAMA2_SAMPLER_H_
