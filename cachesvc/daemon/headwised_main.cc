// `headwised`: the Headwise daemon. Reads a DaemonConfig (--config, text-format protobuf; see
// docs/daemon.md), lets flags override it, serves until SIGTERM or SIGINT, then shuts down
// gracefully. With no config file it runs on embedded defaults: a Unix socket under ./var/, a
// loopback metrics port, RocksDB under ./var/data and one tenant "default" whose token is read
// from --token_file, else $HEADWISE_TOKEN, else "dev-token" (for local use only). --token still
// works but warns: a command line is readable by every local user.
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "cachesvc/service/config.h"
#include "cachesvc/service/server.h"
#include "spdlog/spdlog.h"

ABSL_FLAG(std::string, config, "", "Path of a text-format DaemonConfig; empty: embedded defaults.");
ABSL_FLAG(std::optional<std::string>, socket, std::nullopt,
          "Unix socket path (overrides unix_socket); 'none' disables the Unix socket.");
ABSL_FLAG(std::optional<std::string>, tcp, std::nullopt,
          "TCP host:port (overrides tcp_address); 'none' disables TCP.");
ABSL_FLAG(std::optional<std::string>, metrics, std::nullopt,
          "Metrics host:port (overrides metrics_address); port 0 picks one; 'none' disables.");
ABSL_FLAG(std::optional<std::string>, data_dir, std::nullopt,
          "RocksDB data directory (overrides data_dir); 'none': no disk, no durable sequences.");
ABSL_FLAG(std::optional<std::string>, pattern_dir, std::nullopt,
          "DuoAttention pattern directory clients name patterns in (overrides pattern_dir); "
          "'none': no named patterns.");
ABSL_FLAG(std::optional<std::string>, device_budget, std::nullopt,
          "Device tier bytes, e.g. 8GiB (overrides device_budget_bytes).");
ABSL_FLAG(std::optional<std::string>, host_budget, std::nullopt,
          "Host tier bytes, e.g. 32GiB (overrides host_budget_bytes).");
ABSL_FLAG(std::optional<std::string>, token_file, std::nullopt,
          "File holding the token of the built-in 'default' tenant (used only when the config has "
          "no tenants; surrounding whitespace stripped). Default: $HEADWISE_TOKEN, else "
          "'dev-token' (local use only).");
ABSL_FLAG(std::optional<std::string>, token, std::nullopt,
          "The default tenant's token on the command line: visible to every local user, so it "
          "warns; use --token_file or $HEADWISE_TOKEN.");

namespace {

std::string NoneToEmpty(const std::string& value) { return value == "none" ? "" : value; }

int Fail(const std::string& message) {
  spdlog::critical("headwised: {}", message);
  return 1;
}

// The default tenant's token: --token_file, else --token (with a warning), else $HEADWISE_TOKEN,
// else kDevToken. Both flags at once is an error.
absl::StatusOr<std::string> DefaultToken(bool config_has_tenants) {
  const std::optional<std::string> file = absl::GetFlag(FLAGS_token_file);
  const std::optional<std::string> flag = absl::GetFlag(FLAGS_token);
  if (file && flag) return absl::InvalidArgumentError("give --token_file or --token, not both");
  if (config_has_tenants && (file || flag)) {
    spdlog::warn("--token{} is ignored: the config names its tenants", file ? "_file" : "");
  }
  if (file) return headwise::ReadTokenFile(*file);
  if (flag) {
    spdlog::warn("headwised: {}", headwise::kTokenFlagWarning);
    return *flag;
  }
  if (const char* env = std::getenv("HEADWISE_TOKEN"); env != nullptr && *env != '\0') {
    return std::string(env);
  }
  return std::string(headwise::kDevToken);
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "headwised [--config=FILE] [--socket=PATH] [--tcp=HOST:PORT] [--metrics=HOST:PORT] "
      "[--data_dir=DIR] [--pattern_dir=DIR] [--device_budget=BYTES] [--host_budget=BYTES] "
      "[--token_file=FILE]");
  absl::ParseCommandLine(argc, argv);

  // Block the stop signals in every thread (threads inherit the mask), so that only sigwait
  // below sees them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  headwise::v1::DaemonConfig config;
  const std::string config_path = absl::GetFlag(FLAGS_config);
  if (!config_path.empty()) {
    auto loaded = headwise::LoadConfigFile(config_path);
    if (!loaded.ok()) return Fail(std::string(loaded.status().message()));
    config = *std::move(loaded);
  }
  if (auto v = absl::GetFlag(FLAGS_socket)) config.set_unix_socket(NoneToEmpty(*v));
  if (auto v = absl::GetFlag(FLAGS_tcp)) config.set_tcp_address(NoneToEmpty(*v));
  if (auto v = absl::GetFlag(FLAGS_metrics)) config.set_metrics_address(NoneToEmpty(*v));
  if (auto v = absl::GetFlag(FLAGS_data_dir)) config.set_data_dir(NoneToEmpty(*v));
  if (auto v = absl::GetFlag(FLAGS_pattern_dir)) config.set_pattern_dir(NoneToEmpty(*v));
  if (auto v = absl::GetFlag(FLAGS_device_budget)) {
    auto bytes = headwise::ParseByteSize(*v);
    if (!bytes.ok()) return Fail(absl::StrCat("--device_budget: ", bytes.status().message()));
    config.set_device_budget_bytes(*bytes);
  }
  if (auto v = absl::GetFlag(FLAGS_host_budget)) {
    auto bytes = headwise::ParseByteSize(*v);
    if (!bytes.ok()) return Fail(absl::StrCat("--host_budget: ", bytes.status().message()));
    config.set_host_budget_bytes(*bytes);
  }
  absl::StatusOr<std::string> token = DefaultToken(config.tenants_size() > 0);
  if (!token.ok()) return Fail(std::string(token.status().message()));

  auto resolved = headwise::ResolveConfig(std::move(config), *token);
  if (!resolved.ok()) return Fail(std::string(resolved.status().message()));
  spdlog::set_level(spdlog::level::from_str(resolved->log_level()));
  if (resolved->tenants_size() == 1 && resolved->tenants(0).token() == headwise::kDevToken) {
    spdlog::warn("tenant '{}' uses the development token '{}': for local use only",
                 resolved->tenants(0).name(), headwise::kDevToken);
  }

  auto server = headwise::HeadwiseServer::Start(*resolved);
  if (!server.ok()) return Fail(std::string(server.status().message()));
  // The two lines scripts and people look for.
  std::printf("headwised listening on unix:%s%s\n",
              (*server)->unix_socket().empty() ? "(none)" : (*server)->unix_socket().c_str(),
              (*server)->tcp_port() == 0 ? ""
                                         : absl::StrCat(" tcp:", resolved->tcp_address(), " (port ",
                                                        (*server)->tcp_port(), ")")
                                               .c_str());
  std::printf("headwised metrics at %s\n",
              (*server)->metrics_url().empty() ? "(disabled)" : (*server)->metrics_url().c_str());
  std::fflush(stdout);

  int signal_number = 0;
  sigwait(&stop_signals, &signal_number);
  spdlog::info("headwised: signal {} received, shutting down", signal_number);
  (*server)->Shutdown(absl::Milliseconds(resolved->shutdown_grace_ms()));
  return 0;
}
