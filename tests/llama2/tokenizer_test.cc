#include "clients/llama2/tokenizer.h"

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/llama2/stories260k.h"

namespace headwise::llama2 {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;

// Concatenates run.c's decode of every token after BOS.
std::string DecodeAll(const Tokenizer& t, const std::vector<int>& tokens) {
  std::string text;
  for (size_t i = 1; i < tokens.size(); ++i) text += t.Decode(tokens[i - 1], tokens[i]);
  return text;
}

class Tok512Test : public ::testing::Test {
 protected:
  void SetUp() override {
    HEADWISE_SKIP_WITHOUT_STORIES260K();
    absl::StatusOr<Tokenizer> t = Tokenizer::Load(testing::TokenizerPath(), 512);
    ASSERT_TRUE(t.ok()) << t.status();
    tokenizer_.emplace(*std::move(t));
  }
  const Tokenizer& tok() const { return *tokenizer_; }

  std::optional<Tokenizer> tokenizer_;
};

TEST_F(Tok512Test, VocabularyShape) {
  EXPECT_EQ(tok().vocab_size(), 512);
  EXPECT_EQ(tok().max_token_length(), 7);
  EXPECT_EQ(tok().Piece(3), "<0x00>");
  EXPECT_EQ(tok().Piece(258), "<0xFF>");
  EXPECT_EQ(tok().Piece(410), " ");
  EXPECT_EQ(tok().Piece(261), " a");
}

// Expected ids were derived by running run.c's encode algorithm by hand / in an independent
// Python transcription over tok512.bin.
TEST_F(Tok512Test, EncodeMatchesRunC) {
  EXPECT_THAT(tok().Encode("", true, false), ElementsAre(1));
  EXPECT_THAT(tok().Encode("", false, false), ElementsAre());
  EXPECT_THAT(tok().Encode("", true, true), ElementsAre(1, 2));
  // The dummy prefix " " merges with "a" into " a".
  EXPECT_THAT(tok().Encode("a", true, false), ElementsAre(1, 261));
  EXPECT_THAT(tok().Encode("a", false, true), ElementsAre(261, 2));
  EXPECT_THAT(tok().Encode("é", true, false), ElementsAre(1, 410, 485));
  EXPECT_THAT(tok().Encode("Lily's mom said, \"Hi!\"\n", true, false),
              ElementsAre(1, 317, 439, 419, 357, 336, 432, 313, 440, 417, 443, 436, 13));
  // Code points missing from the vocabulary fall back to byte tokens (byte + 3).
  EXPECT_THAT(tok().Encode("héllo wörld 日本", true, false),
              ElementsAre(1, 270, 485, 306, 414, 263, 198, 185, 420, 341, 410, 233, 154, 168, 233,
                          159, 175));
}

TEST_F(Tok512Test, EncodeOfReferenceSentenceIsTheModelsOwnTokens) {
  const std::vector<testing::ReferenceStep> steps = testing::LoadReferenceSteps();
  ASSERT_GE(steps.size(), 16u);
  std::vector<int> expected = {1};
  for (int i = 0; i < 15; ++i) expected.push_back(steps[i].next);
  EXPECT_THAT(tok().Encode("Once upon a time, there was a little girl named Lily.", true, false),
              ElementsAreArray(expected));
}

TEST_F(Tok512Test, DecodeStripsSpaceAfterBosAndExpandsByteTokens) {
  EXPECT_EQ(tok().Decode(1, 261), "a");
  EXPECT_EQ(tok().Decode(400, 261), " a");
  EXPECT_EQ(tok().Decode(1, 'A' + 3), "A");
  EXPECT_EQ(tok().Decode(1, '\n' + 3), "\n");
  EXPECT_EQ(tok().Decode(1, 0xE6 + 3), "\xE6");
  EXPECT_EQ(tok().Decode(1, 3), "");  // <0x00>
  EXPECT_EQ(tok().Decode(1, 9999), "");
}

TEST_F(Tok512Test, RoundTrip) {
  for (const std::string s :
       {"a", "Once upon a time, there was a little girl named Lily.", " leading space",
        "two  spaces\tand\ttabs\nnew lines\n", "Lily's mom said, \"Hi!\"",
        "héllo wörld 日本 🙂", "\x01\x7f control bytes", "1234567890 !@#$%^&*()"}) {
    EXPECT_EQ(DecodeAll(tok(), tok().Encode(s, true, false)), s);
  }
}

TEST_F(Tok512Test, DecodeOfReferenceTokensIsReferenceText) {
  const std::vector<testing::ReferenceStep> steps = testing::LoadReferenceSteps();
  std::string text;
  int prev = kBosToken;
  for (const testing::ReferenceStep& s : steps) {
    const std::string piece = tok().Decode(prev, s.next);
    if (Tokenizer::IsPrintable(piece)) text += piece;
    prev = s.next;
  }
  EXPECT_EQ(text + "\n", testing::LoadReferenceText());
}

std::string TokenizerFile(int32_t max_len, const std::vector<std::pair<float, std::string>>& v) {
  std::string bytes(4, '\0');
  std::memcpy(bytes.data(), &max_len, 4);
  for (const auto& [score, piece] : v) {
    const int32_t len = static_cast<int32_t>(piece.size());
    bytes.append(reinterpret_cast<const char*>(&score), 4);
    bytes.append(reinterpret_cast<const char*>(&len), 4);
    bytes += piece;
  }
  return bytes;
}

TEST(TokenizerTest, TruncatedOrBadFileIsAnError) {
  const std::string good = TokenizerFile(3, {{0, "<unk>"}, {0, "<s>"}, {0, "</s>"}, {-1, "ab"}});
  ASSERT_TRUE(Tokenizer::Parse(good, 4).ok());
  for (size_t keep = 0; keep < good.size(); ++keep) {
    EXPECT_EQ(Tokenizer::Parse(good.substr(0, keep), 4).status().code(),
              absl::StatusCode::kDataLoss)
        << keep;
  }
  EXPECT_EQ(Tokenizer::Parse(good, 5).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(Tokenizer::Parse(good, 2).status().code(), absl::StatusCode::kInvalidArgument);
  std::string negative = TokenizerFile(3, {{0, "<unk>"}});
  const int32_t bad_len = -5;
  std::memcpy(negative.data() + 8, &bad_len, 4);
  EXPECT_EQ(Tokenizer::Parse(negative, 3).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Tokenizer::Load("/nonexistent/tok.bin", 3).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(TokenizerTest, MergesHighestScoreFirstAndLeftmostOnTies) {
  // Byte tokens are absent, so unknown characters use ids byte + 3 only when those exist; keep
  // the text inside the vocabulary.
  std::vector<std::pair<float, std::string>> v = {{0, "<unk>"}, {0, "<s>"}, {0, "</s>"}};
  v.push_back({0, " "});     // 3
  v.push_back({0, "a"});     // 4
  v.push_back({0, "b"});     // 5
  v.push_back({-5, "ab"});   // 6
  v.push_back({-1, " a"});   // 7: preferred over "ab"
  v.push_back({-2, " ab"});  // 8
  v.push_back({-3, "bb"});   // 9
  absl::StatusOr<Tokenizer> t = Tokenizer::Parse(TokenizerFile(3, v), static_cast<int>(v.size()));
  ASSERT_TRUE(t.ok()) << t.status();
  // " " "a" "b" -> " a" "b" (score -1 beats -5) -> " ab".
  EXPECT_THAT(t->Encode("ab", true, false), ElementsAre(1, 8));
  // " " "b" "b" "b": only "bb" merges, leftmost first: " " "bb" "b".
  EXPECT_THAT(t->Encode("bbb", false, false), ElementsAre(3, 9, 5));
}

}  // namespace
}  // namespace headwise::llama2
