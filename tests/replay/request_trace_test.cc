// The Mooncake and Azure readers: good input parsed exactly, every kind of bad input rejected with
// an error naming the line.
#include "cachesvc/replay/request_trace.h"

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <random>
#include <string>
#include <string_view>

#include "gtest/gtest.h"

namespace headwise {
namespace {

// Whether `text` contains `part`.
bool Has(absl::string_view text, const std::string& part) {
  return text.find(part) != absl::string_view::npos;
}

absl::StatusOr<RequestTrace> Mooncake(const std::string& text, RequestTraceLimits limits = {}) {
  return ParseRequestTrace(text, RequestTraceFormat::kMooncake, "t.jsonl", limits);
}

absl::StatusOr<RequestTrace> Azure(const std::string& text) {
  return ParseRequestTrace(text, RequestTraceFormat::kAzure, "t.csv");
}

void ExpectError(const absl::StatusOr<RequestTrace>& trace, const std::string& where,
                 const std::string& what) {
  ASSERT_FALSE(trace.ok()) << where;
  EXPECT_EQ(trace.status().code(), absl::StatusCode::kInvalidArgument) << trace.status();
  EXPECT_TRUE(Has(trace.status().message(), where)) << trace.status();
  EXPECT_TRUE(Has(trace.status().message(), what)) << trace.status();
}

constexpr char kGoodLine[] =
    R"({"timestamp": 1500, "input_length": 1100, "output_length": 7, "hash_ids": [0, 1, 9]})";

TEST(RequestTraceTest, ParsesMooncake) {
  const auto trace =
      Mooncake(std::string(kGoodLine) + "\n\n" +
               R"({"timestamp":0,"input_length":0,"output_length":0,"hash_ids":[]})");
  ASSERT_TRUE(trace.ok()) << trace.status();
  ASSERT_EQ(trace->requests.size(), 2u);
  EXPECT_TRUE(trace->has_blocks());
  EXPECT_EQ(trace->block_tokens, 512);
  EXPECT_DOUBLE_EQ(trace->requests[0].arrival_s, 1.5);
  EXPECT_EQ(trace->requests[0].input_tokens, 1100);
  EXPECT_EQ(trace->requests[0].output_tokens, 7);
  EXPECT_EQ(trace->requests[0].blocks, (std::vector<BlockId>{0, 1, 9}));
  EXPECT_TRUE(trace->requests[1].blocks.empty());
}

TEST(RequestTraceTest, RejectsBadMooncakeLines) {
  const std::string good = std::string(kGoodLine) + "\n";
  ExpectError(Mooncake(good + R"({"timestamp": 0, "input_len)"), "t.jsonl line 2",
              "not valid JSON");
  ExpectError(Mooncake(good + "[1, 2]\n"), "line 2", "not a JSON object");
  ExpectError(Mooncake(R"({"input_length": 1, "output_length": 1, "hash_ids": [1]})"), "line 1",
              "missing field \"timestamp\"");
  ExpectError(Mooncake(R"({"timestamp": 0, "output_length": 1, "hash_ids": [1]})"), "line 1",
              "missing field \"input_length\"");
  ExpectError(Mooncake(R"({"timestamp": 0, "input_length": 1, "output_length": 1})"), "line 1",
              "missing field \"hash_ids\"");
  ExpectError(
      Mooncake(R"({"timestamp": "0", "input_length": 1, "output_length": 1, "hash_ids": []})"),
      "line 1", "\"timestamp\" is not a number");
  ExpectError(
      Mooncake(R"({"timestamp": 0, "input_length": 1.5, "output_length": 1, "hash_ids": []})"),
      "line 1", "\"input_length\" is not an integer");
  ExpectError(
      Mooncake(R"({"timestamp": 0, "input_length": -1, "output_length": 1, "hash_ids": []})"),
      "line 1", "\"input_length\" must be in");
  ExpectError(
      Mooncake(
          R"({"timestamp": 0, "input_length": 1099511627776, "output_length": 1, "hash_ids": []})"),
      "line 1", "\"input_length\" must be in");
  ExpectError(
      Mooncake(R"({"timestamp": -5, "input_length": 1, "output_length": 1, "hash_ids": []})"),
      "line 1", "\"timestamp\" must be in");
  ExpectError(Mooncake(R"({"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": 3})"),
              "line 1", "\"hash_ids\" is not an array");
  ExpectError(
      Mooncake(R"({"timestamp": 0, "input_length": 600, "output_length": 1, "hash_ids": [1, -2]})"),
      "line 1", "\"hash_ids\"[1] is not a non-negative integer");
  ExpectError(
      Mooncake(
          R"({"timestamp": 0, "input_length": 600, "output_length": 1, "hash_ids": [1, "x"]})"),
      "line 1", "\"hash_ids\"[1]");
  ExpectError(
      Mooncake(R"({"timestamp": 0, "input_length": 512, "output_length": 1, "hash_ids": [1, 2]})"),
      "line 1", "makes only 1 blocks");
  RequestTraceLimits limits;
  limits.max_line_bytes = 40;
  ExpectError(Mooncake(good, limits), "line 1", "longer than 40 bytes");
  ExpectError(Mooncake("\n  \n"), "t.jsonl", "no requests");
}

TEST(RequestTraceTest, SurvivesDeepNestingAndMutatedInput) {
  const std::string deep(200000, '[');
  ExpectError(Mooncake(deep + std::string(200000, ']')), "line 1", "not a JSON object");
  ExpectError(Mooncake(R"({"timestamp":0,"input_length":9,"output_length":1,"hash_ids":[)" + deep),
              "line 1", "not valid JSON");
  // Random truncations and byte flips of good text: each parse succeeds or fails with
  // INVALID_ARGUMENT naming a line, never anything else.
  const std::string good = std::string(kGoodLine) + "\n" + kGoodLine + "\n";
  const std::string csv = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,48,1\n";
  std::mt19937 rng(11);
  for (int i = 0; i < 3000; ++i) {
    const bool jsonl = i % 2 == 0;
    std::string text = jsonl ? good : csv;
    text.resize(rng() % (text.size() + 1));
    for (int flips = rng() % 4; flips > 0 && !text.empty(); --flips) {
      text[rng() % text.size()] = static_cast<char>(rng() % 256);
    }
    const auto trace = jsonl ? Mooncake(text) : Azure(text);
    if (!trace.ok()) {
      EXPECT_EQ(trace.status().code(), absl::StatusCode::kInvalidArgument) << trace.status();
      EXPECT_TRUE(Has(trace.status().message(), jsonl ? "t.jsonl" : "t.csv"));
    }
  }
}

TEST(RequestTraceTest, ParsesAzure) {
  const auto trace = Azure(
      "TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
      "2023-11-16 18:17:03.9799600,4808,10\r\n"
      "2023-11-16 18:17:05.4799600,3180,8\r\n");
  ASSERT_TRUE(trace.ok()) << trace.status();
  EXPECT_FALSE(trace->has_blocks());
  ASSERT_EQ(trace->requests.size(), 2u);
  EXPECT_DOUBLE_EQ(trace->requests[0].arrival_s, 0);
  EXPECT_NEAR(trace->requests[1].arrival_s, 1.5, 1e-9);
  EXPECT_EQ(trace->requests[1].input_tokens, 3180);
  EXPECT_EQ(trace->requests[1].output_tokens, 8);
  EXPECT_TRUE(trace->requests[1].blocks.empty());
}

TEST(RequestTraceTest, RejectsBadAzureLines) {
  const std::string header = "TIMESTAMP,ContextTokens,GeneratedTokens\n";
  ExpectError(Azure("TIME,Context\n"), "t.csv line 1", "expected the header");
  ExpectError(Azure(header + "2023-11-16 18:17:03.97,48\n"), "line 2", "expected 3");
  ExpectError(Azure(header + "yesterday,48,1\n"), "line 2", "TIMESTAMP is not");
  ExpectError(Azure(header + "2023-11-16 18:17:03,4x8,1\n"), "line 2", "ContextTokens");
  ExpectError(Azure(header + "2023-11-16 18:17:03,48,-1\n"), "line 2", "GeneratedTokens");
  ExpectError(Azure(header + "2023-11-16 18:17:03,48,1\n2023-11-16 18:17:04,9999999999999,1\n"),
              "line 3", "ContextTokens");
  ExpectError(Azure(header), "t.csv", "no requests");
}

TEST(RequestTraceTest, FormatsByNameAndExtension) {
  EXPECT_EQ(*ParseRequestTraceFormat("azure"), RequestTraceFormat::kAzure);
  EXPECT_FALSE(ParseRequestTraceFormat("parquet").ok());
  EXPECT_EQ(*RequestTraceFormatForPath("/x/conversation_trace.jsonl"),
            RequestTraceFormat::kMooncake);
  EXPECT_EQ(*RequestTraceFormatForPath("a.csv"), RequestTraceFormat::kAzure);
  EXPECT_FALSE(RequestTraceFormatForPath("a.txt").ok());
}

TEST(RequestTraceTest, LoadRefusesMissingAndOversizedFiles) {
  const auto missing = LoadRequestTrace("/nonexistent/trace.jsonl", RequestTraceFormat::kMooncake);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);

  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string path = std::string(tmp != nullptr ? tmp : "/tmp") + "/replay_trace_" +
                           std::to_string(getpid()) + ".jsonl";
  {
    std::ofstream out(path);
    out << kGoodLine << "\n";
  }
  RequestTraceLimits limits;
  limits.max_file_bytes = 16;
  const auto big = LoadRequestTrace(path, RequestTraceFormat::kMooncake, limits);
  ASSERT_FALSE(big.ok());
  EXPECT_EQ(big.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Has(big.status().message(), path)) << big.status();
  const auto ok = LoadRequestTrace(path, RequestTraceFormat::kMooncake);
  EXPECT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->source, path);
  std::remove(path.c_str());
}

}  // namespace
}  // namespace headwise
