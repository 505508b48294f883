// Tokens off the command line (issue 14, item 7): `headwised` and the `headwise` CLI read a token
// from --token_file (or $HEADWISE_TOKEN), warn when one is given with --token, and refuse a
// missing, empty or malformed token file, or both flags at once.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "clients/cpp/client.h"
#include "gtest/gtest.h"
#include "tests/e2e/daemon_process.h"
#include "tests/e2e/e2e_helpers.h"

extern char** environ;

namespace headwise::testing {
namespace {

constexpr char kWarning[] = "--token puts the token on the command line";

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream(path) << text;
  chmod(path.c_str(), 0600);
}

// A headwised started with exactly `flags` (plus its socket, no disk, no metrics), its output in
// <dir>/headwised.log. Stopped (SIGTERM, then SIGKILL) on destruction.
class RawDaemon {
 public:
  RawDaemon(const std::string& dir, const std::vector<std::string>& flags)
      : socket_(dir + "/raw.sock"), log_(dir + "/headwised.log") {
    std::vector<std::string> args = {HEADWISED_PATH, "--socket=" + socket_, "--data_dir=none",
                                     "--metrics=none"};
    args.insert(args.end(), flags.begin(), flags.end());
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log_.c_str(),
                                     O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
    if (posix_spawn(&pid_, HEADWISED_PATH, &actions, nullptr, argv.data(), environ) != 0) {
      pid_ = -1;
    }
    posix_spawn_file_actions_destroy(&actions);
  }
  ~RawDaemon() {
    if (pid_ <= 0 || exited_) return;
    kill(pid_, SIGTERM);
    const absl::Time give_up = absl::Now() + absl::Seconds(20);
    while (!Exited() && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(10));
    if (!Exited()) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }

  // True once the process has exited (its status in exit_code()).
  bool Exited() {
    if (exited_ || pid_ <= 0) return true;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      exited_ = true;
      exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    return exited_;
  }
  int exit_code() const { return exit_code_; }
  std::string log() const { return ReadFile(log_); }

  // Health with `token`, waiting (at most 30 s) for the daemon to listen; the daemon's status.
  absl::Status HealthWith(const std::string& token) {
    const absl::Time give_up = absl::Now() + absl::Seconds(30);
    absl::Status last = absl::UnavailableError("not started");
    while (absl::Now() < give_up && !Exited()) {
      client::ClientOptions options;
      options.target = "unix://" + socket_;
      options.token = token;
      options.check_health = false;
      options.reconnect_deadline = absl::ZeroDuration();
      options.deadline = absl::Seconds(2);
      absl::StatusOr<std::unique_ptr<client::Client>> c = client::Client::Connect(options);
      if (c.ok()) {
        last = (*c)->Health().status();
        if (last.code() != absl::StatusCode::kUnavailable) return last;
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
    return last;
  }

  // Waits (at most 30 s) for the process to exit by itself.
  bool WaitForExit() {
    const absl::Time give_up = absl::Now() + absl::Seconds(30);
    while (!Exited() && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(10));
    return Exited();
  }

 private:
  std::string socket_, log_;
  pid_t pid_ = -1;
  bool exited_ = false;
  int exit_code_ = -1;
};

TEST(TokenTest, DaemonReadsTheDefaultTenantsTokenFromAFile) {
  TempDir dir;
  const std::string file = dir.path() + "/token";
  WriteFile(file, "file-token-4242\n");
  RawDaemon daemon(dir.path(), {"--token_file=" + file});
  EXPECT_TRUE(daemon.HealthWith("file-token-4242").ok()) << daemon.log();
  EXPECT_EQ(daemon.HealthWith("file-token-424").code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(daemon.HealthWith("dev-token").code(), absl::StatusCode::kUnauthenticated);
  EXPECT_FALSE(absl::StrContains(daemon.log(), kWarning)) << daemon.log();
}

TEST(TokenTest, DaemonWarnsWhenGivenTheTokenAsAFlag) {
  TempDir dir;
  RawDaemon daemon(dir.path(), {"--token=flag-token-77"});
  EXPECT_TRUE(daemon.HealthWith("flag-token-77").ok()) << daemon.log();
  EXPECT_TRUE(absl::StrContains(daemon.log(), kWarning)) << daemon.log();
}

TEST(TokenTest, DaemonRefusesABadTokenFileOrBothFlags) {
  TempDir dir;
  const std::string empty = dir.path() + "/empty";
  WriteFile(empty, " \n");
  const std::string two_words = dir.path() + "/two-words";
  WriteFile(two_words, "secret part\n");
  const std::string good = dir.path() + "/good";
  WriteFile(good, "good-token");
  struct Case {
    std::vector<std::string> flags;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{"--token_file=" + dir.path() + "/missing"},
       absl::StrCat("token file '", dir.path(), "/missing'")},
      {{"--token_file=" + empty}, absl::StrCat("token file '", empty, "' is empty")},
      {{"--token_file=" + two_words}, "holds a byte outside printable ASCII"},
      {{"--token_file=" + good, "--token=x"}, "give --token_file or --token, not both"},
  };
  for (const Case& c : cases) {
    TempDir run;
    RawDaemon daemon(run.path(), c.flags);
    ASSERT_TRUE(daemon.WaitForExit()) << c.message;
    EXPECT_EQ(daemon.exit_code(), 1) << c.message;
    EXPECT_TRUE(absl::StrContains(daemon.log(), c.message)) << daemon.log();
    EXPECT_FALSE(absl::StrContains(daemon.log(), "secret")) << daemon.log();  // Never quoted.
  }
}

// Runs `headwise <args>` with stdout and stderr captured.
CommandResult RunCli(const std::string& args) {
  return RunCommand(std::string(HEADWISE_CLI_PATH) + " " + args + " 2>&1");
}

TEST(TokenTest, CliReadsTheTokenFromAFileAndWarnsOnTheFlag) {
  TempDir dir;
  DaemonOptions options;
  options.work_dir = dir.path();
  absl::StatusOr<std::unique_ptr<DaemonProcess>> daemon = DaemonProcess::Start(options);
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  const std::string target = "--target=" + (*daemon)->target() + " ";
  const std::string file = dir.path() + "/token";
  WriteFile(file, options.token + "\n");

  CommandResult r = RunCli("status " + target + "--token_file=" + file);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "SERVING")) << r.out;
  EXPECT_FALSE(absl::StrContains(r.out, kWarning)) << r.out;

  r = RunCli("status " + target + "--token=" + options.token);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, kWarning)) << r.out;

  r = RunCli("status " + target + "--token_file=" + dir.path() + "/missing");
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "token file '" + dir.path() + "/missing'")) << r.out;

  r = RunCli("status " + target + "--token_file=" + file + " --token=x");
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "not both")) << r.out;

  // A token file with the wrong token is refused by the daemon (exit 1), like a wrong --token.
  WriteFile(file, "wrong-token\n");
  EXPECT_EQ(RunCli("status " + target + "--token_file=" + file).exit_code, 1);
}

}  // namespace
}  // namespace headwise::testing
