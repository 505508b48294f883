// `headwise replay-requests`: exit codes, errors and outputs, run in-process on small files.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "cachesvc/cli/plan_command.h"
#include "cachesvc/cli/replay_requests_command.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace headwise {
namespace {

struct Result {
  int code;
  std::string out, err;
};

Result Cli(const std::vector<std::string>& args) {
  std::ostringstream out, err;
  const int code = RunReplayRequestsCommand(args, out, err);
  return {code, out.str(), err.str()};
}

class ReplayCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string dir = "/tmp/replay_cli_" + std::to_string(getpid());
    good_ = dir + "_good.jsonl";
    bad_ = dir + "_bad.jsonl";
    std::ofstream(good_)
        << R"({"timestamp": 0, "input_length": 1536, "output_length": 1, "hash_ids": [1, 2, 3]})"
        << "\n"
        << R"({"timestamp": 5, "input_length": 1100, "output_length": 2, "hash_ids": [1, 2, 4]})"
        << "\n";
    std::ofstream(bad_)
        << R"({"timestamp": 0, "input_length": 1536, "output_length": 1, "hash_ids": [1, 2, 3]})"
        << "\n"
        << R"({"timestamp": 5, "input_length": "many"})"
        << "\n";
  }
  void TearDown() override {
    std::remove(good_.c_str());
    std::remove(bad_.c_str());
  }
  std::string good_, bad_;
};

TEST_F(ReplayCliTest, HelpAndUsageErrors) {
  const Result help = Cli({"--help"});
  EXPECT_EQ(help.code, kExitOk);
  EXPECT_NE(help.out.find("--capacity"), std::string::npos);
  EXPECT_EQ(Cli({}).code, kExitUsage);
  EXPECT_EQ(Cli({"--trace", good_, "--bogus"}).code, kExitUsage);
  EXPECT_EQ(Cli({"--trace", good_, "--capacity", "0%"}).code, kExitUsage);
  EXPECT_EQ(Cli({"--trace", good_, "--capacity", "five"}).code, kExitUsage);
  EXPECT_EQ(Cli({"--trace", good_, "--policy", "mru"}).code, kExitUsage);
  EXPECT_EQ(Cli({"--trace", good_, "--layout", "gpt-5"}).code, kExitUsage);
  EXPECT_EQ(Cli({"--trace", good_, "--json", "--csv"}).code, kExitUsage);
  EXPECT_EQ(Cli({"--trace", "x.txt"}).code, kExitUsage);
  const Result twice = Cli({"--trace", good_, "--trace", good_});
  EXPECT_EQ(twice.code, kExitUsage);
  EXPECT_NE(twice.err.find("given twice"), std::string::npos) << twice.err;
}

TEST_F(ReplayCliTest, BadFilesFail) {
  const Result missing = Cli({"--trace", "/nonexistent/t.jsonl"});
  EXPECT_EQ(missing.code, kExitFailure);
  const Result bad = Cli({"--trace", bad_});
  EXPECT_EQ(bad.code, kExitFailure);
  EXPECT_NE(bad.err.find("line 2"), std::string::npos) << bad.err;
  EXPECT_TRUE(bad.out.empty());
}

TEST_F(ReplayCliTest, JsonCsvAndTable) {
  const Result json = Cli({"--trace", good_, "--json", "--policy", "lru,belady", "--policy", "arc",
                           "--capacity", "50%", "--layout", "llama-2-7b"});
  ASSERT_EQ(json.code, kExitOk) << json.err;
  const auto doc = nlohmann::json::parse(json.out);
  EXPECT_EQ(doc["summary"]["unique_blocks"], 4);
  EXPECT_EQ(doc["model"]["token_kv_bytes"], 524288);  // 32 layers x 32 KV heads x 128 x 2 x 2 B.
  ASSERT_EQ(doc["results"].size(), 6u);               // 3 policies x (50%, unlimited).
  EXPECT_EQ(doc["results"][0]["policy"], "lru");
  EXPECT_EQ(doc["results"][2]["policy"], "arc");
  EXPECT_EQ(doc["results"][5]["capacity"], "unlimited");
  EXPECT_EQ(doc["results"][5]["hits"], 2);

  const Result csv = Cli({"--trace", good_, "--csv", "--no-unlimited"});
  ASSERT_EQ(csv.code, kExitOk) << csv.err;
  EXPECT_EQ(std::count(csv.out.begin(), csv.out.end(), '\n'), 1 + 3 * 5);

  const Result table = Cli({"--trace", good_, "--device", "A100-PCIe4"});
  ASSERT_EQ(table.code, kExitOk) << table.err;
  EXPECT_NE(table.out.find("A100-PCIe4"), std::string::npos);
  EXPECT_NE(table.out.find("belady   unlimited"), std::string::npos) << table.out;
}

}  // namespace
}  // namespace headwise
