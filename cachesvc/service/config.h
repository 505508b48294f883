// Loading and checking the daemon's configuration (proto/headwise/v1/config.proto).
//
// A DaemonConfig as read from a file leaves unset what the user did not write; ResolveConfig
// fills every default in explicitly, so the rest of the daemon reads plain values and never
// repeats a default.
#ifndef HEADWISE_CACHESVC_SERVICE_CONFIG_H_
#define HEADWISE_CACHESVC_SERVICE_CONFIG_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "headwise/v1/config.pb.h"

namespace headwise {

// Defaults of DaemonConfig (config.proto documents each).
inline constexpr char kDefaultUnixSocket[] = "./var/headwised.sock";
inline constexpr char kDefaultMetricsAddress[] = "127.0.0.1:9464";
inline constexpr char kDefaultDataDir[] = "./var/data";
inline constexpr uint64_t kDefaultDeviceBudgetBytes = uint64_t{1} << 30;
inline constexpr uint64_t kDefaultHostBudgetBytes = uint64_t{1} << 30;
inline constexpr uint64_t kDefaultMaxMessageBytes = uint64_t{64} << 20;
inline constexpr uint64_t kDefaultMaxStagingRegionBytes = uint64_t{1} << 30;
inline constexpr int kDefaultWorkerThreads = 4;
inline constexpr int kDefaultShutdownGraceMs = 5000;
inline constexpr char kDefaultLogLevel[] = "info";
inline constexpr int kDefaultCopyThreads = 2;
// AdmissionConfig defaults.
inline constexpr uint32_t kDefaultMaxCallsPerTenant = 64;
inline constexpr uint64_t kDefaultMaxQueuedBytesPerTenant = uint64_t{256} << 20;
inline constexpr uint32_t kDefaultMaxQueuedCalls = 1024;
inline constexpr uint32_t kDefaultMaxPrefillTokensPerCall = 32768;
inline constexpr uint32_t kDefaultMaxAppendTokensPerCall = 65536;
// Largest config file LoadConfigFile reads.
inline constexpr uint64_t kMaxConfigFileBytes = uint64_t{1} << 20;
// Largest TLS file (tls.cert_path, key_path, client_ca_path) the server reads.
inline constexpr uint64_t kMaxTlsFileBytes = uint64_t{1} << 20;
// The token of the built-in "default" tenant when neither --token_file, --token nor
// $HEADWISE_TOKEN is given. For local use only.
inline constexpr char kDevToken[] = "dev-token";
// Largest token file ReadTokenFile reads.
inline constexpr uint64_t kMaxTokenFileBytes = 4096;
// What the daemon and the CLI print when a token is given with --token: the command line is
// readable by every local user (ps, /proc/<pid>/cmdline).
inline constexpr char kTokenFlagWarning[] =
    "--token puts the token on the command line, where every local user can read it (ps, "
    "/proc/<pid>/cmdline); use --token_file=FILE or $HEADWISE_TOKEN instead";

// Parses a text-format DaemonConfig. INVALID_ARGUMENT with the parser's line and column on a
// syntax error or unknown field, and what was expected ("unknown field name", "expected
// integer"), never the text found there.
absl::StatusOr<headwise::v1::DaemonConfig> ParseConfigText(const std::string& text);

// Reads (a regular file of at most kMaxConfigFileBytes; symbolic links followed, since the
// operator names it) and parses the file at `path`. NOT_FOUND when it does not exist,
// PERMISSION_DENIED when it cannot be read, FAILED_PRECONDITION when it is not a regular file or
// is too large, INVALID_ARGUMENT (line and column, no text quoted) when it does not parse.
absl::StatusOr<headwise::v1::DaemonConfig> LoadConfigFile(const std::string& path);

// Reads a bearer token from the file at `path` (--token_file): a regular file of at most
// kMaxTokenFileBytes (a symbolic link is followed: secret stores link their files), surrounding
// whitespace such as the trailing newline stripped. INVALID_ARGUMENT when what remains is empty or
// holds a byte outside printable ASCII (0x21..0x7e); the errors of ReadBoundedFile otherwise. No
// message quotes the file's contents.
absl::StatusOr<std::string> ReadTokenFile(const std::string& path);

// Returns `config` with every optional field set to its value or default, and, when it has no
// tenants, the "default" tenant (an admin) with `default_token` (callers pass --token_file,
// --token, $HEADWISE_TOKEN or kDevToken). Then checks it: INVALID_ARGUMENT for zero budgets or
// sizes, no listener at all, a non-loopback address without allow_non_loopback, half a TLS key
// pair, duplicate or empty tenant names/tokens, an unknown log level.
absl::StatusOr<headwise::v1::DaemonConfig> ResolveConfig(headwise::v1::DaemonConfig config,
                                                         const std::string& default_token);

// "1073741824", "512K", "64MiB", "1G", "1GiB" (K/M/G/T are powers of 1024). INVALID_ARGUMENT
// otherwise or on overflow.
absl::StatusOr<uint64_t> ParseByteSize(const std::string& text);

// True for hosts that name the loopback interface: 127.x.y.z, ::1, [::1], localhost.
bool IsLoopbackHost(const std::string& host);

// Splits "host:port" / "[v6]:port". INVALID_ARGUMENT when there is no port or it is not a number
// in 0..65535.
absl::Status SplitHostPort(const std::string& address, std::string* host, int* port);

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_SERVICE_CONFIG_H_
