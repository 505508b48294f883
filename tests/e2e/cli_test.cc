// The `headwise` CLI against a real daemon: `status --json`, `list --json` and `stats --json`
// parse and say what the daemon says; the human forms and a wrong token behave.
#include <sys/wait.h>

#include <cstdio>
#include <memory>
#include <random>
#include <string>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/e2e/daemon_process.h"
#include "tests/e2e/e2e_helpers.h"

namespace headwise::testing {
namespace {

// Runs `headwise <args>` with stdout captured (stderr goes to the test log).
CommandResult RunCli(const std::string& args) {
  return RunCommand(std::string(HEADWISE_CLI_PATH) + " " + args);
}

TEST(CliTest, StatusListStatsAgainstRealDaemon) {
  TempDir dir;
  DaemonOptions options;
  options.work_dir = dir.path();
  absl::StatusOr<std::unique_ptr<DaemonProcess>> daemon = DaemonProcess::Start(options);
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  absl::StatusOr<std::unique_ptr<client::Client>> c = (*daemon)->Connect("");
  ASSERT_TRUE(c.ok()) << c.status();
  const ModelLayout layout = TestLayout();
  ASSERT_TRUE((*c)->RegisterLayout(kLayoutName, layout).ok());
  absl::StatusOr<client::Sequence> seq = (*c)->CreateSequence(kLayoutName, v1::PolicySpec(), false);
  ASSERT_TRUE(seq.ok());
  std::mt19937 rng(5);
  for (int layer = 0; layer < layout.num_layers; ++layer) {
    ASSERT_TRUE(
        (*c)->Append(*seq, layer, RandomKv(rng, layout, 33), RandomKv(rng, layout, 33), 33).ok());
  }
  const std::string flags = "--target=" + (*daemon)->target() + " --token=" + options.token + " ";

  CommandResult status = RunCli("status --json " + flags);
  ASSERT_EQ(status.exit_code, 0) << status.out;
  const nlohmann::json s = nlohmann::json::parse(status.out);
  EXPECT_EQ(s.at("status"), "SERVING");
  EXPECT_EQ(s.at("sequences").get<uint64_t>(), 1u);
  ASSERT_TRUE(s.at("tiers").is_array());
  ASSERT_FALSE(s.at("tiers").empty());
  EXPECT_EQ(s.at("tiers")[0].at("tier"), "device");
  EXPECT_GT(s.at("tiers")[0].at("used_bytes").get<uint64_t>(), 0u);

  CommandResult list = RunCli("list --json " + flags);
  ASSERT_EQ(list.exit_code, 0) << list.out;
  const nlohmann::json l = nlohmann::json::parse(list.out);
  ASSERT_EQ(l.at("sequences").size(), 1u);
  EXPECT_EQ(l.at("sequences")[0].at("handle"), seq->handle());
  EXPECT_EQ(l.at("sequences")[0].at("layout_name"), kLayoutName);
  EXPECT_EQ(l.at("sequences")[0].at("length").get<int64_t>(), 33);

  CommandResult stats = RunCli("stats --json " + flags);
  ASSERT_EQ(stats.exit_code, 0) << stats.out;
  const nlohmann::json st = nlohmann::json::parse(stats.out);
  EXPECT_EQ(st.at("tenant_sequences").get<uint64_t>(), 1u);
  EXPECT_TRUE(st.contains("bytes_host_to_device"));

  // Human forms.
  CommandResult human = RunCli("list " + flags);
  EXPECT_EQ(human.exit_code, 0);
  EXPECT_NE(human.out.find(seq->handle()), std::string::npos) << human.out;
  human = RunCli("status " + flags);
  EXPECT_EQ(human.exit_code, 0);
  EXPECT_NE(human.out.find("SERVING"), std::string::npos) << human.out;

  // Errors: a wrong token fails (exit 1), a bad flag is a usage error (exit 2), --help is 0.
  EXPECT_EQ(
      RunCli("status --target=" + (*daemon)->target() + " --token=wrong 2>/dev/null").exit_code, 1);
  EXPECT_EQ(RunCli("list --frobnicate 2>/dev/null").exit_code, 2);
  CommandResult help = RunCli("stats --help");
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_NE(help.out.find("--target"), std::string::npos);
  // No daemon at all: exit 1 quickly.
  EXPECT_EQ(RunCli("status --timeout=1 --target=unix://" + dir.path() + "/nope.sock 2>/dev/null")
                .exit_code,
            1);
}

}  // namespace
}  // namespace headwise::testing
