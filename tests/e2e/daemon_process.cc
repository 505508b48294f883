#include "tests/e2e/daemon_process.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

extern char** environ;

namespace headwise::testing {

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string pattern = absl::StrCat((base != nullptr && *base) ? base : "/tmp", "/hwe2e.XXXXXX");
  if (mkdtemp(pattern.data()) == nullptr) std::abort();
  path_ = pattern;
}

TempDir::~TempDir() {
  std::error_code ignored;
  std::filesystem::remove_all(path_, ignored);
}

DaemonProcess::DaemonProcess(const DaemonOptions& options) : options_(options) {
  socket_path_ = options_.work_dir + "/headwised.sock";
  log_path_ = options_.work_dir + "/headwised.log";
  if (options_.data_dir.empty()) options_.data_dir = options_.work_dir + "/data";
}

absl::StatusOr<std::unique_ptr<DaemonProcess>> DaemonProcess::Start(const DaemonOptions& options) {
  if (options.work_dir.empty()) return absl::InvalidArgumentError("work_dir is required");
  std::unique_ptr<DaemonProcess> daemon(new DaemonProcess(options));
  std::vector<std::string> args = {HEADWISED_PATH, "--socket=" + daemon->socket_path_,
                                   "--data_dir=" + daemon->options_.data_dir,
                                   "--metrics=127.0.0.1:0"};
  if (!options.config_textproto.empty()) {
    const std::string config_path = options.work_dir + "/config.textproto";
    std::ofstream(config_path) << options.config_textproto;
    args.push_back("--config=" + config_path);
  }
  // Used only when the config names no tenants.
  args.push_back("--token=" + options.token);
  for (const std::string& flag : options.extra_flags) args.push_back(flag);
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, daemon->log_path_.c_str(),
                                   O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  const int rc =
      posix_spawn(&daemon->pid_, HEADWISED_PATH, &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) {
    daemon->reaped_ = true;
    return absl::InternalError(absl::StrCat("posix_spawn(", HEADWISED_PATH, "): ", strerror(rc)));
  }

  // Wait for Health, failing early when the process dies.
  const absl::Time give_up = absl::Now() + options.start_timeout;
  absl::Status last;
  while (absl::Now() < give_up) {
    if (!daemon->Running()) {
      return absl::InternalError(absl::StrCat("headwised exited with status ", daemon->exit_status_,
                                              " during start; log:\n", daemon->LogTail()));
    }
    client::ClientOptions probe = daemon->ClientOptionsFor(
        options.config_textproto.empty() ? options.token : std::string("probe"));
    probe.reconnect_deadline = absl::ZeroDuration();
    probe.deadline = absl::Seconds(2);
    probe.check_health = false;
    absl::StatusOr<std::unique_ptr<client::Client>> c = client::Client::Connect(probe);
    if (c.ok()) {
      absl::StatusOr<headwise::v1::HealthResponse> health = (*c)->Health();
      // A wrong probe token still proves the daemon serves.
      if (health.ok() || health.status().code() == absl::StatusCode::kUnauthenticated) {
        return daemon;
      }
      last = health.status();
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return absl::DeadlineExceededError(absl::StrCat(
      "headwised did not answer Health: ", last.ToString(), "; log:\n", daemon->LogTail()));
}

DaemonProcess::~DaemonProcess() {
  if (Running()) Terminate().IgnoreError();
  if (Running()) Kill9();
}

client::ClientOptions DaemonProcess::ClientOptionsFor(const std::string& token) const {
  client::ClientOptions options;
  options.target = target();
  options.token = token.empty() ? options_.token : token;
  options.deadline = absl::Seconds(30);
  return options;
}

absl::StatusOr<std::unique_ptr<client::Client>> DaemonProcess::Connect(
    const std::string& token) const {
  return client::Client::Connect(ClientOptionsFor(token));
}

bool DaemonProcess::Running() {
  if (reaped_) return false;
  int status = 0;
  const pid_t r = waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    reaped_ = true;
    exit_status_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return false;
  }
  return true;
}

void DaemonProcess::Kill9() {
  if (reaped_) return;
  kill(pid_, SIGKILL);
  int status = 0;
  waitpid(pid_, &status, 0);
  reaped_ = true;
  exit_status_ = 128 + SIGKILL;
}

absl::StatusOr<int> DaemonProcess::Terminate(absl::Duration timeout) {
  if (!Running()) return exit_status_;
  kill(pid_, SIGTERM);
  const absl::Time give_up = absl::Now() + timeout;
  while (absl::Now() < give_up) {
    if (!Running()) return exit_status_;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return absl::DeadlineExceededError("headwised did not exit after SIGTERM");
}

std::string DaemonProcess::LogTail(size_t max_bytes) const {
  std::ifstream in(log_path_);
  std::stringstream buffer;
  buffer << in.rdbuf();
  std::string log = buffer.str();
  if (log.size() > max_bytes) log = "..." + log.substr(log.size() - max_bytes);
  return log;
}

std::vector<std::string> ShmNames(const std::string& prefix) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/dev/shm", ec)) {
    const std::string name = entry.path().filename().string();
    if (absl::StartsWith(name, prefix)) names.push_back(name);
  }
  return names;
}

double MaxRelDiff(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(double{a[i]} - double{b[i]}) / (1.0 + std::fabs(double{b[i]}));
    if (!(d <= worst)) worst = d;  // NaN propagates as the worst.
  }
  return worst;
}

}  // namespace headwise::testing
