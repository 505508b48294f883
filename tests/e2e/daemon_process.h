// Test helpers for end-to-end tests: a real `headwised` child process on a temporary socket and
// data directory, plus the comparison helpers the suites share. The binary's path comes from the
// HEADWISED_PATH compile definition (tests/e2e/CMakeLists.txt).
#ifndef HEADWISE_TESTS_E2E_DAEMON_PROCESS_H_
#define HEADWISE_TESTS_E2E_DAEMON_PROCESS_H_

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "clients/cpp/client.h"

namespace headwise::testing {

// A fresh directory under $TMPDIR (or /tmp), removed with its contents on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

struct DaemonOptions {
  // Directory for the socket, the log and (unless data_dir is set) the data. Required.
  std::string work_dir;
  // --data_dir. Empty: <work_dir>/data.
  std::string data_dir;
  // Text of a DaemonConfig (proto/headwise/v1/config.proto) written to <work_dir>/config.textproto
  // and passed with --config. Empty: no config file. Without tenants in it, the daemon has one
  // tenant whose token is `token`.
  std::string config_textproto;
  // --token: the default tenant's token when the config names no tenants. Default: "e2e-token".
  std::string token = "e2e-token";
  // More flags, e.g. "--device_budget=64MiB".
  std::vector<std::string> extra_flags;
  // How long Start waits for Health. Default: 30 s.
  absl::Duration start_timeout = absl::Seconds(30);
};

// One headwised child process. Start spawns it and waits until Health answers SERVING.
class DaemonProcess {
 public:
  static absl::StatusOr<std::unique_ptr<DaemonProcess>> Start(const DaemonOptions& options);
  // Stops the daemon with SIGTERM (SIGKILL after 20 s) when it still runs.
  ~DaemonProcess();

  // "unix:///.../headwised.sock".
  std::string target() const { return "unix://" + socket_path_; }
  const std::string& socket_path() const { return socket_path_; }
  const std::string& log_path() const { return log_path_; }
  pid_t pid() const { return pid_; }

  // Options for a client of this daemon with `token` (default: the options' token).
  client::ClientOptions ClientOptionsFor(const std::string& token) const;
  // A connected client (ASSERT-friendly: the status says why not).
  absl::StatusOr<std::unique_ptr<client::Client>> Connect(const std::string& token) const;

  // True while the process has not exited.
  bool Running();
  // SIGKILL and reap. The daemon gets no chance to clean up.
  void Kill9();
  // SIGTERM and wait for exit; the exit status (0 for a clean shutdown), or DEADLINE_EXCEEDED.
  absl::StatusOr<int> Terminate(absl::Duration timeout = absl::Seconds(20));
  // The last `max_bytes` of the daemon's log (stdout + stderr), for failure messages.
  std::string LogTail(size_t max_bytes = 4000) const;

 private:
  explicit DaemonProcess(const DaemonOptions& options);

  DaemonOptions options_;
  std::string socket_path_;
  std::string log_path_;
  pid_t pid_ = -1;
  bool reaped_ = false;
  int exit_status_ = 0;
};

// Names under /dev/shm that start with `prefix`.
std::vector<std::string> ShmNames(const std::string& prefix);

// Largest |a - b| / (1 + |b|) over two equally long arrays (infinity when the sizes differ).
double MaxRelDiff(const std::vector<float>& a, const std::vector<float>& b);

}  // namespace headwise::testing

#endif  // HEADWISE_TESTS_E2E_DAEMON_PROCESS_H_
