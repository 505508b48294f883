#include "clients/llama2/sampler.h"

#include <cmath>
#include <cstdint>
#include <vector>

#include "gtest/gtest.h"

namespace headwise::llama2 {
namespace {

TEST(SamplerTest, XorshiftMatchesRunC) {
  // run.c's random_u32 from state 42, computed independently (Python, 64-bit wraparound).
  uint64_t state = 42;
  EXPECT_EQ(RandomU32(&state), 1456360119u);
  EXPECT_EQ(RandomU32(&state), 3359763283u);
  EXPECT_EQ(RandomU32(&state), 3393612768u);
  state = 42;
  EXPECT_FLOAT_EQ(RandomF32(&state), static_cast<float>(1456360119u >> 8) / 16777216.0f);
}

TEST(SamplerTest, GreedyIsFirstArgmaxAndLeavesLogitsAlone) {
  Sampler sampler({.temperature = 0.0f, .top_p = 0.9f, .seed = 1});
  std::vector<float> logits = {0.5f, 3.0f, -1.0f, 3.0f};
  EXPECT_EQ(sampler.Sample(absl::MakeSpan(logits)), 1);
  EXPECT_EQ(logits[1], 3.0f);
  Sampler negative({.temperature = -2.0f, .top_p = 0.9f, .seed = 1});
  EXPECT_EQ(negative.temperature(), 0.0f);
  EXPECT_EQ(negative.Sample(absl::MakeSpan(logits)), 1);
}

std::vector<float> RandomLogits(uint64_t seed, int n) {
  std::vector<float> logits(n);
  for (float& l : logits) l = 4.0f * RandomF32(&seed);
  return logits;
}

std::vector<int> Draw(const SamplerOptions& options, int count) {
  Sampler sampler(options);
  std::vector<int> tokens;
  for (int i = 0; i < count; ++i) {
    std::vector<float> logits = RandomLogits(1000 + i, 64);
    tokens.push_back(sampler.Sample(absl::MakeSpan(logits)));
  }
  return tokens;
}

TEST(SamplerTest, SameSeedSameTokensDifferentSeedDifferentTokens) {
  for (float top_p : {0.0f, 0.9f}) {
    const std::vector<int> a = Draw({.temperature = 1.0f, .top_p = top_p, .seed = 7}, 64);
    EXPECT_EQ(a, Draw({.temperature = 1.0f, .top_p = top_p, .seed = 7}, 64));
    EXPECT_NE(a, Draw({.temperature = 1.0f, .top_p = top_p, .seed = 8}, 64));
  }
}

TEST(SamplerTest, TopPNeverLeavesTheNucleus) {
  // Probabilities 0.6, 0.3, 0.1 (as logits): with top_p 0.5 the nucleus is token 0 alone; with
  // 0.8 it is {0, 1}.
  const std::vector<float> base = {std::log(0.6f), std::log(0.3f), std::log(0.1f)};
  Sampler narrow({.temperature = 1.0f, .top_p = 0.5f, .seed = 3});
  Sampler wide({.temperature = 1.0f, .top_p = 0.8f, .seed = 3});
  int wide_counts[3] = {0, 0, 0};
  for (int i = 0; i < 2000; ++i) {
    std::vector<float> logits = base;
    EXPECT_EQ(narrow.Sample(absl::MakeSpan(logits)), 0);
    logits = base;
    ++wide_counts[wide.Sample(absl::MakeSpan(logits))];
  }
  EXPECT_EQ(wide_counts[2], 0);
  // Renormalized over {0.6, 0.3}: token 1 about a third of the time.
  EXPECT_NEAR(wide_counts[1] / 2000.0, 1.0 / 3.0, 0.05);
}

TEST(SamplerTest, TemperatureScalesBeforeSoftmax) {
  // With top_p >= 1 the whole distribution is sampled with run.c's single coin: cdf walk.
  std::vector<float> logits = {1.0f, 2.0f};
  Sampler sampler({.temperature = 2.0f, .top_p = 1.0f, .seed = 42});
  uint64_t state = 42;
  const float coin = RandomF32(&state);
  const float p0 = 1.0f / (1.0f + std::exp(0.5f));
  EXPECT_EQ(sampler.Sample(absl::MakeSpan(logits)), coin < p0 ? 0 : 1);
  EXPECT_NEAR(logits[0], p0, 1e-6);
}

}  // namespace
}  // namespace headwise::llama2
