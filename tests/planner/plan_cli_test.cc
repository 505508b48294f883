// Runs the built `headwise` binary and checks its exit codes, JSON and messages.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace headwise {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kGiB = int64_t{1} << 30;

struct Result {
  int exit_code = -1;
  std::string out;
  std::string err;
};

// Runs `headwise <args>` through the shell, capturing stdout and stderr separately.
Result RunHeadwise(const std::string& args) {
  const fs::path dir = fs::path(testing::TempDir());
  // ctest runs every test case as its own process, in parallel: names must not collide.
  const std::string tag = std::to_string(getpid());
  const std::string out_path = (dir / ("headwise_cli_out." + tag)).string();
  const std::string err_path = (dir / ("headwise_cli_err." + tag)).string();
  const std::string command =
      std::string(HEADWISE_CLI_PATH) + " " + args + " >" + out_path + " 2>" + err_path;
  const int status = std::system(command.c_str());
  Result result;
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  auto slurp = [](const std::string& path) {
    std::ifstream in(path);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  };
  result.out = slurp(out_path);
  result.err = slurp(err_path);
  return result;
}

nlohmann::json RunJson(const std::string& args) {
  const Result r = RunHeadwise(args + " --json");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(r.err.empty()) << r.err;
  nlohmann::json json = nlohmann::json::parse(r.out, nullptr, /*allow_exceptions=*/false);
  EXPECT_FALSE(json.is_discarded()) << r.out;
  return json;
}

TEST(PlanCli, HeadOffloadLlama3OneMillionJson) {
  const nlohmann::json j = RunJson(
      "plan --layout llama-3-8b --context 1048576 --device-budget 1GiB --policy head_offload");
  if (j.is_discarded()) return;
  EXPECT_EQ(j["layout"]["num_layers"], 32);
  EXPECT_EQ(j["layout"]["num_kv_heads"], 8);
  EXPECT_EQ(j["layout"]["dtype"], "bf16");
  EXPECT_EQ(j["context_tokens"], 1048576);
  EXPECT_EQ(j["policy"]["placement"], "head_offload");
  EXPECT_EQ(j["kv"]["full_bytes"], 128 * kGiB);
  EXPECT_EQ(j["tiers"]["device_bytes"], kGiB);
  EXPECT_LE(j["tiers"]["device_bytes"].get<int64_t>(), j["tiers"]["device_budget_bytes"]);
  EXPECT_EQ(j["tiers"]["host_bytes"], 128 * kGiB);
  EXPECT_EQ(j["tiers"]["disk_bytes"], 0);
  EXPECT_EQ(j["tiers"]["fits"], true);
  EXPECT_TRUE(j["tiers"]["host_budget_bytes"].is_null());
  EXPECT_EQ(j["profile"]["name"], "H100-PCIe5");
  EXPECT_EQ(j["decode"]["bound"], "link");
  EXPECT_NEAR(j["decode"]["seconds_per_token"].get<double>(), 128.0 * kGiB / 55e9, 1e-6);
}

TEST(PlanCli, DuoAttentionEvenSplitJson) {
  const nlohmann::json j = RunJson(
      "plan --layout llama-3-8b --context 1048576 --policy duo_attention --sparsity 0.5 "
      "--sink 64 --recent 256 --profile A100-PCIe4");
  if (j.is_discarded()) return;
  EXPECT_EQ(j["policy"]["eviction"], "duo_attention");
  EXPECT_EQ(j["policy"]["retrieval_heads"], 128);
  EXPECT_NEAR(j["kv"]["compression_ratio"].get<double>(), 2.0, 0.02);
  EXPECT_EQ(j["tiers"]["device_bytes"], j["kv"]["retained_bytes"]);
  EXPECT_EQ(j["profile"]["name"], "A100-PCIe4");
}

TEST(PlanCli, LayoutFileAndOverrides) {
  const std::string path = (fs::path(testing::TempDir()) / "planner_cli_layout.json").string();
  std::ofstream(path) << R"({"layers": 2, "q_heads": 8, "kv_heads": 2, "head_dim": 64,
                             "dtype": "f32", "page_tokens": 16})";
  const nlohmann::json j = RunJson("plan --layout-file " + path +
                                   " --context=1000 --profile cpu --device-bw 10GB/s "
                                   "--flops 1e11 --policy layer_offload --prefetch-depth 0");
  if (j.is_discarded()) return;
  EXPECT_EQ(j["layout"]["num_q_heads"], 8);
  EXPECT_EQ(j["layout"]["page_bytes"], 16 * 2 * 64 * 4);
  // 1000 tokens = 63 pages of 16 per head, 4 heads.
  EXPECT_EQ(j["kv"]["retained_bytes"], 4 * 63 * 16 * 2 * 64 * 4);
  EXPECT_EQ(j["profile"]["device_bytes_per_s"], 10e9);
  EXPECT_EQ(j["profile"]["link_bytes_per_s"], 5e9);  // cpu: memcpy = half the bandwidth
  EXPECT_EQ(j["policy"]["overlapped"], false);
}

TEST(PlanCli, TableHasTiersAndTime) {
  const Result r = RunHeadwise("plan --layout mistral-7b --context 32768");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (const char* text :
       {"device", "host", "disk", "decode, per token", "4.00 GiB", "fits: yes"}) {
    EXPECT_NE(r.out.find(text), std::string::npos) << text << " in\n" << r.out;
  }
}

TEST(PlanCli, HelpExitsZero) {
  Result r = RunHeadwise("--help");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("plan"), std::string::npos);
  r = RunHeadwise("plan --help");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("--device-budget"), std::string::npos);
}

TEST(PlanCli, UsageErrorsExitTwoWithAMessage) {
  const struct {
    const char* args;
    const char* message;
  } cases[] = {
      {"", "usage"},
      {"frobnicate", "unknown command"},
      {"plan --layout llama-3-8b --context 1 --bogus", "unknown flag --bogus"},
      {"plan --context 1", "--layout"},
      {"plan --layout llama-3-8b", "--context"},
      {"plan --layout gpt-5 --context 1", "unknown layout"},
      {"plan --layout llama-3-8b --context ten", "--context=ten"},
      {"plan --layout llama-3-8b --context 1 --device-budget 1XB", "unknown unit"},
      {"plan --layout llama-3-8b --context 1 --policy h2o", "unknown policy"},
      {"plan --layout llama-3-8b --context 1 --profile tpu", "unknown device profile"},
      {"plan --layout llama-3-8b --context 1 --sparsity 0.5", "duo_attention only"},
      {"plan --layout llama-3-8b --context 1 --policy duo_attention --sparsity 2",
       "sparsity must be in [0, 1]"},
      {"plan --layout llama-3-8b --context 1 --link-bw fast", "--link-bw=fast"},
      {"plan --layout llama-3-8b --context", "needs a value"},
      {"plan --layout llama-3-8b --context 1 --json=yes", "takes no value"},
      {"plan --layout llama-3-8b --context 1 extra", "unexpected argument"},
  };
  for (const auto& c : cases) {
    const Result r = RunHeadwise(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args;
    EXPECT_NE(r.err.find(c.message), std::string::npos) << c.args << " -> " << r.err;
    EXPECT_TRUE(r.out.empty()) << c.args;
  }
}

TEST(PlanCli, UnreadableInputsExitOne) {
  Result r = RunHeadwise("plan --layout-file /nonexistent/layout.json --context 1");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("cannot open layout file"), std::string::npos) << r.err;
  r = RunHeadwise(
      "plan --layout llama-3-8b --context 1 --policy duo_attention --duo-tsv /nonexistent.tsv");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_FALSE(r.err.empty());
}

}  // namespace
}  // namespace headwise
