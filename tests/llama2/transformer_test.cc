// The forward pass over Headwise against llama2.c run.c's own outputs on stories260K, and the
// StreamingLLM sliding-window experiment.
#include "clients/llama2/transformer.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "clients/llama2/checkpoint.h"
#include "clients/llama2/embedded_backend.h"
#include "clients/llama2/sampler.h"
#include "clients/llama2/tokenizer.h"
#include "gtest/gtest.h"
#include "tests/llama2/run_c_attention_backend.h"
#include "tests/llama2/stories260k.h"

namespace headwise::llama2 {
namespace {

class Stories260KTest : public ::testing::Test {
 protected:
  void SetUp() override {
    HEADWISE_SKIP_WITHOUT_STORIES260K();
    absl::StatusOr<Checkpoint> c = LoadCheckpoint(testing::CheckpointPath());
    ASSERT_TRUE(c.ok()) << c.status();
    checkpoint_ = std::make_unique<Checkpoint>(*std::move(c));
    absl::StatusOr<Tokenizer> t = Tokenizer::Load(testing::TokenizerPath(), 512);
    ASSERT_TRUE(t.ok()) << t.status();
    tokenizer_ = std::make_unique<Tokenizer>(*std::move(t));
    reference_ = testing::LoadReferenceSteps();
    ASSERT_EQ(reference_.size(), 256u);
  }

  // A fresh in-process engine per call, so each test's stats start at zero.
  std::unique_ptr<EmbeddedBackend> NewBackend() {
    absl::StatusOr<std::unique_ptr<EmbeddedBackend>> b = EmbeddedBackend::Create({});
    EXPECT_TRUE(b.ok()) << b.status();
    return b.ok() ? *std::move(b) : nullptr;
  }

  std::unique_ptr<Transformer> NewTransformer(KvBackend* backend,
                                              const TransformerOptions& options) {
    absl::StatusOr<std::unique_ptr<Transformer>> t =
        Transformer::Create(checkpoint_.get(), backend, options);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *std::move(t) : nullptr;
  }

  // Teacher forcing: feeds the reference input tokens and returns the argmax at each position.
  std::vector<int> TeacherForcedArgmax(Transformer& t) {
    std::vector<int> argmax;
    for (const testing::ReferenceStep& step : reference_) {
      absl::StatusOr<absl::Span<float>> logits = t.Forward(step.input);
      EXPECT_TRUE(logits.ok()) << logits.status();
      if (!logits.ok()) break;
      argmax.push_back(Sampler::Argmax(*logits));
    }
    return argmax;
  }

  std::unique_ptr<Checkpoint> checkpoint_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::vector<testing::ReferenceStep> reference_;
};

TEST_F(Stories260KTest, GreedyFromEmptyPromptReproducesRunCExactly) {
  std::unique_ptr<EmbeddedBackend> backend = NewBackend();
  ASSERT_NE(backend, nullptr);
  std::unique_ptr<Transformer> t = NewTransformer(backend.get(), {});
  ASSERT_NE(t, nullptr);
  Sampler greedy({.temperature = 0.0f, .top_p = 0.9f, .seed = 1});
  absl::StatusOr<GenerationResult> result = Generate(*t, *tokenizer_, greedy, "", 256);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->positions, 256);
  ASSERT_EQ(result->tokens.size(), 257u);
  int mismatches = 0;
  for (int pos = 0; pos < 256; ++pos) {
    EXPECT_EQ(result->tokens[pos], reference_[pos].input) << "input at position " << pos;
    if (result->tokens[pos + 1] != reference_[pos].next) ++mismatches;
    EXPECT_EQ(result->tokens[pos + 1], reference_[pos].next) << "next token at position " << pos;
  }
  EXPECT_EQ(mismatches, 0);
  EXPECT_EQ(result->text + "\n", testing::LoadReferenceText());
  std::printf("[stories260K] greedy 256 positions, embedded, page_tokens 16: %.0f tok/s\n",
              result->tokens_per_second);
}

// Largest |logit - run.c's logit| over positions 0..3, absolute and relative to max(|ref|, 1).
struct LogitErrors {
  double worst_abs = 0;
  double worst_rel = 0;        // |err| / max(|ref|, 1).
  double worst_plain_rel = 0;  // |err| / |ref|, for the report.
};

LogitErrors CompareLogits(Transformer& t, const std::vector<testing::ReferenceStep>& reference) {
  const std::vector<std::vector<double>> expected = testing::LoadReferenceLogits();
  EXPECT_EQ(expected.size(), 4u);
  LogitErrors e;
  for (size_t pos = 0; pos < expected.size(); ++pos) {
    absl::StatusOr<absl::Span<float>> logits = t.Forward(reference[pos].input);
    EXPECT_TRUE(logits.ok()) << logits.status();
    if (!logits.ok()) break;
    EXPECT_EQ(expected[pos].size(), logits->size());
    for (size_t i = 0; i < std::min(logits->size(), expected[pos].size()); ++i) {
      const double ref = expected[pos][i];
      const double err = std::abs((*logits)[i] - ref);
      e.worst_abs = std::max(e.worst_abs, err);
      e.worst_rel = std::max(e.worst_rel, err / std::max(std::abs(ref), 1.0));
      e.worst_plain_rel = std::max(e.worst_plain_rel, err / std::abs(ref));
    }
  }
  return e;
}

// With run.c's own attention arithmetic (a test backend) the model code must reproduce run.c's
// logits to the 9 significant digits they were printed with.
TEST_F(Stories260KTest, LogitsWithRunCAttentionMatchRunC) {
  testing::RunCAttentionBackend backend;
  std::unique_ptr<Transformer> t = NewTransformer(&backend, {});
  ASSERT_NE(t, nullptr);
  const LogitErrors e = CompareLogits(*t, reference_);
  std::printf("[stories260K] logits pos 0-3, run.c attention: worst abs %.3g, rel %.3g\n",
              e.worst_abs, e.worst_plain_rel);
  EXPECT_LE(e.worst_plain_rel, 1e-7);
}

// Through Headwise's attention kernels (different but valid float rounding) the logits stay
// within 1e-4 of run.c's relative to max(|logit|, 1): relative for every logit of magnitude
// >= 1, absolute 1e-4 for the few near zero, where a per-element relative bound is meaningless.
TEST_F(Stories260KTest, LogitsAtPositions0To3MatchRunC) {
  std::unique_ptr<EmbeddedBackend> backend = NewBackend();
  ASSERT_NE(backend, nullptr);
  std::unique_ptr<Transformer> t = NewTransformer(backend.get(), {});
  ASSERT_NE(t, nullptr);
  const LogitErrors e = CompareLogits(*t, reference_);
  std::printf(
      "[stories260K] logits pos 0-3, Headwise attention: worst abs %.3g, worst |err|/max(|ref|,1) "
      "%.3g, worst |err|/|ref| %.3g\n",
      e.worst_abs, e.worst_rel, e.worst_plain_rel);
  EXPECT_LE(e.worst_rel, 1e-4);
}

TEST_F(Stories260KTest, GenerationStopsAtSeqLenAndRejectsBadTokens) {
  std::unique_ptr<EmbeddedBackend> backend = NewBackend();
  ASSERT_NE(backend, nullptr);
  std::unique_ptr<Transformer> t = NewTransformer(backend.get(), {});
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->Forward(-1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(t->Forward(512).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(t->pos(), 0);
  ASSERT_TRUE(t->Forward(1).ok());
  Sampler greedy({.temperature = 0.0f, .top_p = 0.9f, .seed = 1});
  EXPECT_EQ(Generate(*t, *tokenizer_, greedy, "", 4).status().code(),
            absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(t->Reset().ok());
  EXPECT_EQ(t->pos(), 0);
}

TEST_F(Stories260KTest, SampledGenerationIsDeterministicPerSeed) {
  std::unique_ptr<EmbeddedBackend> backend = NewBackend();
  ASSERT_NE(backend, nullptr);
  std::unique_ptr<Transformer> t = NewTransformer(backend.get(), {});
  ASSERT_NE(t, nullptr);
  auto run = [&](uint64_t seed) {
    EXPECT_TRUE(t->Reset().ok());
    Sampler sampler({.temperature = 1.0f, .top_p = 0.9f, .seed = seed});
    absl::StatusOr<GenerationResult> r = Generate(*t, *tokenizer_, sampler, "Once upon", 64);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? r->tokens : std::vector<int>();
  };
  const std::vector<int> a = run(42);
  EXPECT_GT(a.size(), 3u);
  EXPECT_EQ(a, run(42));
  EXPECT_NE(a, run(43));
}

// The sliding-window experiment: StreamingLLM (4 sink + 64 recent tokens, 4-token pages so the
// window is page aligned) against the full cache, by teacher forcing over the reference tokens.
TEST_F(Stories260KTest, StreamingLlmWindowAgreementWithFullCache) {
  std::unique_ptr<EmbeddedBackend> backend = NewBackend();
  ASSERT_NE(backend, nullptr);
  TransformerOptions full_options;
  full_options.page_tokens = 4;
  std::unique_ptr<Transformer> full = NewTransformer(backend.get(), full_options);
  ASSERT_NE(full, nullptr);
  const std::vector<int> full_argmax = TeacherForcedArgmax(*full);
  ASSERT_EQ(full_argmax.size(), 256u);
  // The full cache reproduces run.c's greedy choice at every position.
  for (int pos = 0; pos < 256; ++pos) {
    EXPECT_EQ(full_argmax[pos], reference_[pos].next) << "position " << pos;
  }

  // A window wider than the run never evicts, so it must agree everywhere too.
  std::unique_ptr<Transformer> wide =
      NewTransformer(backend.get(), {.page_tokens = 4, .policy = StreamingLlmPolicy(4, 512)});
  ASSERT_NE(wide, nullptr);
  EXPECT_EQ(TeacherForcedArgmax(*wide), full_argmax);

  std::unique_ptr<Transformer> windowed =
      NewTransformer(backend.get(), {.page_tokens = 4, .policy = StreamingLlmPolicy(4, 64)});
  ASSERT_NE(windowed, nullptr);
  const std::vector<int> windowed_argmax = TeacherForcedArgmax(*windowed);
  ASSERT_EQ(windowed_argmax.size(), 256u);
  int agree = 0, agree_past_window = 0, past_window = 0;
  for (int pos = 0; pos < 256; ++pos) {
    agree += windowed_argmax[pos] == full_argmax[pos];
    if (pos >= 4 + 64) {
      ++past_window;
      agree_past_window += windowed_argmax[pos] == full_argmax[pos];
    }
  }
  const double fraction = agree / 256.0;
  std::printf(
      "[stories260K] StreamingLLM sink 4 + recent 64, page_tokens 4, teacher forcing over 256 "
      "reference tokens: argmax agreement with the full cache %d/256 = %.4f (positions >= 68: "
      "%d/%d = %.4f)\n",
      agree, fraction, agree_past_window, past_window,
      static_cast<double>(agree_past_window) / past_window);
  absl::StatusOr<std::string> stats = backend->DescribeStats(windowed->sequence());
  ASSERT_TRUE(stats.ok()) << stats.status();
  std::printf("%s\n", stats->c_str());
  EXPECT_GE(fraction, 0.0);
  EXPECT_LE(fraction, 1.0);
  // Before the window fills nothing is evicted, so the first 68 positions must agree.
  for (int pos = 0; pos < 68; ++pos) {
    EXPECT_EQ(windowed_argmax[pos], full_argmax[pos]) << "position " << pos;
  }

  // Greedy generation under the window still produces text.
  ASSERT_TRUE(windowed->Reset().ok());
  Sampler greedy({.temperature = 0.0f, .top_p = 0.9f, .seed = 1});
  absl::StatusOr<GenerationResult> text = Generate(*windowed, *tokenizer_, greedy, "", 256);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_FALSE(text->text.empty());
  std::printf("[stories260K] windowed greedy text (%.0f tok/s):\n%s\n", text->tokens_per_second,
              text->text.c_str());
}

}  // namespace
}  // namespace headwise::llama2
