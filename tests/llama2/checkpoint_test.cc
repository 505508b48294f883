#include "clients/llama2/checkpoint.h"

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "tests/llama2/stories260k.h"

namespace headwise::llama2 {
namespace {

// A llama2.c file for `header` whose floats are 0, 1, 2, ... so that every tensor's first
// element tells where the reader put it. `float_count` overrides the implied size when >= 0.
std::string SyntheticCheckpoint(const std::vector<int32_t>& header, int64_t float_count) {
  std::string bytes(header.size() * 4 + float_count * 4, '\0');
  std::memcpy(bytes.data(), header.data(), header.size() * 4);
  for (int64_t i = 0; i < float_count; ++i) {
    const float f = static_cast<float>(i);
    std::memcpy(bytes.data() + header.size() * 4 + i * 4, &f, 4);
  }
  return bytes;
}

// dim 4, hidden 6, 1 layer, 2 heads, 1 kv head, vocab 3, seq_len 2 (head size 2, kv_dim 2).
constexpr int64_t kTinyFloats = 3 * 4 + 4 + 16 + 8 + 8 + 16 + 4 + 24 + 24 + 24 + 4 + 2 * 2;

TEST(CheckpointTest, SharedClassifierPointsAtEmbeddingAndSkipsRopeTables) {
  absl::StatusOr<Checkpoint> c =
      ParseCheckpoint(SyntheticCheckpoint({4, 6, 1, 2, 1, 3, 2}, kTinyFloats));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->config.shared_classifier);
  EXPECT_EQ(c->config.head_size(), 2);
  EXPECT_EQ(c->config.kv_dim(), 2);
  EXPECT_EQ(c->wcls, c->token_embedding);
  EXPECT_EQ(c->rms_att[0], 12.0f);
  EXPECT_EQ(c->wq[0], 16.0f);
  EXPECT_EQ(c->wk[0], 32.0f);
  EXPECT_EQ(c->wv[0], 40.0f);
  EXPECT_EQ(c->wo[0], 48.0f);
  EXPECT_EQ(c->rms_ffn[0], 64.0f);
  EXPECT_EQ(c->w1[0], 68.0f);
  EXPECT_EQ(c->w2[0], 92.0f);
  EXPECT_EQ(c->w3[0], 116.0f);
  EXPECT_EQ(c->rms_final[0], 140.0f);
}

TEST(CheckpointTest, NegativeVocabMeansSeparateClassifierAfterRopeTables) {
  absl::StatusOr<Checkpoint> c =
      ParseCheckpoint(SyntheticCheckpoint({4, 6, 1, 2, 1, -3, 2}, kTinyFloats + 12));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->config.shared_classifier);
  EXPECT_EQ(c->config.vocab_size, 3);
  EXPECT_EQ(c->wcls[0], static_cast<float>(kTinyFloats));
}

TEST(CheckpointTest, SizeMismatchIsDataLoss) {
  for (int64_t floats : {int64_t{0}, kTinyFloats - 1, kTinyFloats + 1}) {
    absl::StatusOr<Checkpoint> c =
        ParseCheckpoint(SyntheticCheckpoint({4, 6, 1, 2, 1, 3, 2}, floats));
    EXPECT_EQ(c.status().code(), absl::StatusCode::kDataLoss) << floats << ": " << c.status();
  }
  EXPECT_EQ(ParseCheckpoint("").status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(ParseCheckpoint(std::string(27, '\0')).status().code(), absl::StatusCode::kDataLoss);
}

TEST(CheckpointTest, BadHeaderIsInvalidArgument) {
  const std::vector<std::vector<int32_t>> headers = {
      {0, 6, 1, 2, 1, 3, 2},          // dim 0
      {4, 6, 1, 0, 1, 3, 2},          // no heads
      {4, 6, 1, 3, 1, 3, 2},          // dim not a multiple of heads
      {4, 6, 1, 2, 3, 3, 2},          // heads not a multiple of kv heads
      {4, 6, 1, 4, 1, 3, 2},          // odd head size
      {4, 6, -1, 2, 1, 3, 2},         // negative layers
      {4, 6, 1, 2, 1, INT32_MIN, 2},  // vocab without a magnitude
      {1 << 30, 6, 1, 2, 1, 3, 2},    // absurd size
  };
  for (const auto& header : headers) {
    EXPECT_EQ(ParseCheckpoint(SyntheticCheckpoint(header, kTinyFloats)).status().code(),
              absl::StatusCode::kInvalidArgument)
        << header[0] << " " << header[2] << " " << header[3] << " " << header[4];
  }
}

TEST(CheckpointTest, MissingFileIsNotFound) {
  EXPECT_EQ(LoadCheckpoint("/nonexistent/model.bin").status().code(), absl::StatusCode::kNotFound);
}

TEST(CheckpointTest, LoadsStories260K) {
  HEADWISE_SKIP_WITHOUT_STORIES260K();
  absl::StatusOr<Checkpoint> c = LoadCheckpoint(testing::CheckpointPath());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->config.dim, 64);
  EXPECT_EQ(c->config.hidden_dim, 172);
  EXPECT_EQ(c->config.n_layers, 5);
  EXPECT_EQ(c->config.n_heads, 8);
  EXPECT_EQ(c->config.n_kv_heads, 4);
  EXPECT_EQ(c->config.vocab_size, 512);
  EXPECT_EQ(c->config.seq_len, 512);
  EXPECT_TRUE(c->config.shared_classifier);
}

TEST(CheckpointTest, TruncatedOrCorruptedStories260KIsAnErrorNotACrash) {
  HEADWISE_SKIP_WITHOUT_STORIES260K();
  absl::StatusOr<std::string> bytes = ReadFileBytes(testing::CheckpointPath());
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  for (size_t keep : {size_t{0}, size_t{12}, size_t{28}, size_t{1000}, bytes->size() / 2,
                      bytes->size() - 4, bytes->size() - 1}) {
    absl::StatusOr<Checkpoint> c = ParseCheckpoint(bytes->substr(0, keep));
    EXPECT_EQ(c.status().code(), absl::StatusCode::kDataLoss) << keep << ": " << c.status();
  }
  std::string corrupt = *bytes;
  const int32_t huge_layers = 1000;
  std::memcpy(corrupt.data() + 8, &huge_layers, 4);
  EXPECT_EQ(ParseCheckpoint(corrupt).status().code(), absl::StatusCode::kDataLoss);
  // Flipping the vocab sign claims a separate classifier the file does not have.
  corrupt = *bytes;
  const int32_t negative_vocab = -512;
  std::memcpy(corrupt.data() + 20, &negative_vocab, 4);
  EXPECT_EQ(ParseCheckpoint(corrupt).status().code(), absl::StatusCode::kDataLoss);
}

}  // namespace
}  // namespace headwise::llama2
