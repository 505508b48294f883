// The llama2.c engine with its KV cache in a real headwised: greedy generation from an empty
// prompt reproduces run.c's 256 reference tokens, and the logits at positions 0-3 match run.c's.
// (tests/llama2 checks the same through the in-process engine.)

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "clients/llama2/checkpoint.h"
#include "clients/llama2/remote_backend.h"
#include "clients/llama2/sampler.h"
#include "clients/llama2/tokenizer.h"
#include "clients/llama2/transformer.h"
#include "gtest/gtest.h"
#include "tests/e2e/daemon_process.h"
#include "tests/llama2/stories260k.h"

namespace headwise::llama2 {
namespace {

using ::headwise::testing::DaemonOptions;
using ::headwise::testing::DaemonProcess;
using ::headwise::testing::TempDir;

class Llama2DaemonTest : public ::testing::Test {
 protected:
  void SetUp() override {
    HEADWISE_SKIP_WITHOUT_STORIES260K();
    DaemonOptions options;
    options.work_dir = dir_.path();
    absl::StatusOr<std::unique_ptr<DaemonProcess>> daemon = DaemonProcess::Start(options);
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    daemon_ = *std::move(daemon);
    absl::StatusOr<Checkpoint> c = LoadCheckpoint(testing::CheckpointPath());
    ASSERT_TRUE(c.ok()) << c.status();
    checkpoint_ = std::make_unique<Checkpoint>(*std::move(c));
    absl::StatusOr<Tokenizer> t = Tokenizer::Load(testing::TokenizerPath(), 512);
    ASSERT_TRUE(t.ok()) << t.status();
    tokenizer_ = std::make_unique<Tokenizer>(*std::move(t));
    absl::StatusOr<std::unique_ptr<RemoteBackend>> backend =
        RemoteBackend::Connect(daemon_->ClientOptionsFor(options.token));
    ASSERT_TRUE(backend.ok()) << backend.status();
    backend_ = *std::move(backend);
    absl::StatusOr<std::unique_ptr<Transformer>> transformer =
        Transformer::Create(checkpoint_.get(), backend_.get(), {});
    ASSERT_TRUE(transformer.ok()) << transformer.status();
    transformer_ = *std::move(transformer);
  }

  TempDir dir_;
  std::unique_ptr<DaemonProcess> daemon_;
  std::unique_ptr<Checkpoint> checkpoint_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<RemoteBackend> backend_;
  std::unique_ptr<Transformer> transformer_;
};

TEST_F(Llama2DaemonTest, GreedyThroughTheDaemonReproducesRunC) {
  const std::vector<testing::ReferenceStep> reference = testing::LoadReferenceSteps();
  ASSERT_EQ(reference.size(), 256u);
  Sampler greedy({.temperature = 0.0f, .top_p = 0.9f, .seed = 1});
  absl::StatusOr<GenerationResult> result = Generate(*transformer_, *tokenizer_, greedy, "", 256);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->tokens.size(), 257u);
  int mismatches = 0;
  for (int pos = 0; pos < 256; ++pos) {
    if (result->tokens[pos + 1] != reference[pos].next) ++mismatches;
  }
  EXPECT_EQ(mismatches, 0) << "next-token ids that differ from run.c's";
  EXPECT_EQ(result->text + "\n", testing::LoadReferenceText());
}

TEST_F(Llama2DaemonTest, LogitsAtPositions0To3MatchRunC) {
  const std::vector<testing::ReferenceStep> reference = testing::LoadReferenceSteps();
  const std::vector<std::vector<double>> expected = testing::LoadReferenceLogits();
  ASSERT_EQ(expected.size(), 4u);
  double worst = 0.0;
  for (size_t pos = 0; pos < expected.size(); ++pos) {
    absl::StatusOr<absl::Span<float>> logits = transformer_->Forward(reference[pos].input);
    ASSERT_TRUE(logits.ok()) << logits.status();
    ASSERT_EQ(logits->size(), expected[pos].size());
    for (size_t i = 0; i < expected[pos].size(); ++i) {
      // Relative to max(|logit|, 1): a plain relative error is meaningless for logits near 0.
      const double ref = expected[pos][i];
      worst = std::max(worst, std::abs((*logits)[i] - ref) / std::max(std::abs(ref), 1.0));
    }
  }
  EXPECT_LT(worst, 1e-4);
  std::printf("[stories260K via headwised] worst logit error %.2e (relative to max(|x|,1))\n",
              worst);
}

}  // namespace
}  // namespace headwise::llama2
