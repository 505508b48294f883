#include "cachesvc/service/config.h"

#include <algorithm>
#include <cctype>
#include <string>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "cachesvc/base/bounded_file.h"
#include "cachesvc/base/status_macros.h"
#include "cachesvc/prefix/prefix_config.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"

namespace headwise {
namespace {

using headwise::v1::DaemonConfig;

// The parser's message without what it quotes from the text: "Expected integer, got: x" becomes
// "expected integer"; an unknown field is "unknown field name"; anything else "syntax error".
// (The file may be anything an operator mistyped, e.g. a key file, and the position suffices.)
std::string WithoutQuotedText(const std::string& message) {
  if (message.find("has no field named") != std::string::npos) return "unknown field name";
  if (message.rfind("Expected ", 0) == 0) {
    const size_t end = std::min(message.find(", got"), message.find(", found"));
    if (end != std::string::npos) return absl::StrCat("expected", message.substr(8, end - 8));
  }
  return "syntax error";
}

// Collects the first parse error with its position; the message never quotes the text.
class ErrorCollector : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, google::protobuf::io::ColumnNumber column,
                const std::string& message) override {
    if (first_.empty()) {
      first_ = absl::StrCat("line ", line + 1, ":", column + 1, ": ", WithoutQuotedText(message));
    }
  }
  const std::string& first() const { return first_; }

 private:
  std::string first_;
};

absl::Status CheckAddress(const std::string& what, const std::string& address,
                          bool allow_non_loopback) {
  std::string host;
  int port = 0;
  absl::Status status = SplitHostPort(address, &host, &port);
  if (!status.ok()) return absl::InvalidArgumentError(absl::StrCat(what, ": ", status.message()));
  if (!allow_non_loopback && !IsLoopbackHost(host)) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " '", address, "' is not a loopback address; set allow_non_loopback to allow it"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<DaemonConfig> ParseConfigText(const std::string& text) {
  DaemonConfig config;
  google::protobuf::TextFormat::Parser parser;
  ErrorCollector errors;
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(text, &config)) {
    return absl::InvalidArgumentError(absl::StrCat("config: ", errors.first()));
  }
  return config;
}

absl::StatusOr<DaemonConfig> LoadConfigFile(const std::string& path) {
  BoundedReadOptions options;
  options.max_bytes = kMaxConfigFileBytes;
  options.follow_final_symlink = true;
  options.description = absl::StrCat("config file '", path, "'");
  ASSIGN_OR_RETURN(const std::string text, ReadBoundedFile(path, options));
  auto config = ParseConfigText(text);
  if (!config.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", config.status().message()));
  }
  return config;
}

absl::StatusOr<std::string> ReadTokenFile(const std::string& path) {
  BoundedReadOptions options;
  options.max_bytes = kMaxTokenFileBytes;
  options.follow_final_symlink = true;
  options.description = absl::StrCat("token file '", path, "'");
  ASSIGN_OR_RETURN(const std::string text, ReadBoundedFile(path, options));
  const std::string token(absl::StripAsciiWhitespace(text));
  if (token.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("token file '", path, "' is empty"));
  }
  for (const char c : token) {
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token file '", path, "' holds a byte outside printable ASCII (a token is one word)"));
    }
  }
  return token;
}

namespace {

void ResolveAdmission(headwise::v1::AdmissionConfig& a) {
  if (!a.has_max_calls_per_tenant()) a.set_max_calls_per_tenant(kDefaultMaxCallsPerTenant);
  if (!a.has_max_queued_bytes_per_tenant()) {
    a.set_max_queued_bytes_per_tenant(kDefaultMaxQueuedBytesPerTenant);
  }
  if (!a.has_max_queued_calls()) a.set_max_queued_calls(kDefaultMaxQueuedCalls);
  if (!a.has_max_prefill_tokens_per_call()) {
    a.set_max_prefill_tokens_per_call(kDefaultMaxPrefillTokensPerCall);
  }
  if (!a.has_max_append_tokens_per_call()) {
    a.set_max_append_tokens_per_call(kDefaultMaxAppendTokensPerCall);
  }
}

}  // namespace

absl::StatusOr<DaemonConfig> ResolveConfig(DaemonConfig config, const std::string& default_token) {
  if (!config.has_unix_socket()) config.set_unix_socket(kDefaultUnixSocket);
  if (!config.has_metrics_address()) {
    // Off by default on a multi-tenant daemon: the loopback is shared by every local user.
    config.set_metrics_address(config.tenants().empty() ? kDefaultMetricsAddress : "");
  }
  if (!config.has_data_dir()) config.set_data_dir(kDefaultDataDir);
  if (!config.has_device_budget_bytes()) config.set_device_budget_bytes(kDefaultDeviceBudgetBytes);
  if (!config.has_host_budget_bytes()) config.set_host_budget_bytes(kDefaultHostBudgetBytes);
  if (!config.has_max_message_bytes()) config.set_max_message_bytes(kDefaultMaxMessageBytes);
  if (!config.has_max_staging_region_bytes()) {
    config.set_max_staging_region_bytes(kDefaultMaxStagingRegionBytes);
  }
  if (!config.has_worker_threads()) config.set_worker_threads(kDefaultWorkerThreads);
  if (!config.has_shutdown_grace_ms()) config.set_shutdown_grace_ms(kDefaultShutdownGraceMs);
  if (!config.has_log_level()) config.set_log_level(kDefaultLogLevel);
  if (!config.has_copy_threads()) config.set_copy_threads(kDefaultCopyThreads);
  ResolveAdmission(*config.mutable_admission());
  if (config.tenants().empty()) {
    auto* tenant = config.add_tenants();
    tenant->set_name("default");
    tenant->set_token(default_token.empty() ? kDevToken : default_token);
    tenant->set_admin(true);  // The only tenant: nothing to hide from it.
  }

  if (config.unix_socket().empty() && config.tcp_address().empty()) {
    return absl::InvalidArgumentError("config: neither unix_socket nor tcp_address is set");
  }
  if (!config.tcp_address().empty()) {
    RETURN_IF_ERROR(CheckAddress("tcp_address", config.tcp_address(), config.allow_non_loopback()));
  }
  if (!config.metrics_address().empty()) {
    RETURN_IF_ERROR(
        CheckAddress("metrics_address", config.metrics_address(), config.allow_non_loopback()));
  }
  if (config.tls().cert_path().empty() != config.tls().key_path().empty()) {
    return absl::InvalidArgumentError("config: tls needs both cert_path and key_path");
  }
  if (!config.tls().client_ca_path().empty() && config.tls().cert_path().empty()) {
    return absl::InvalidArgumentError("config: tls.client_ca_path needs cert_path and key_path");
  }
  if (config.device_budget_bytes() == 0 || config.host_budget_bytes() == 0) {
    return absl::InvalidArgumentError("config: device and host budgets must be positive");
  }
  if (config.max_message_bytes() < 1024 || config.max_message_bytes() > (uint64_t{2} << 30) - 1) {
    return absl::InvalidArgumentError("config: max_message_bytes must be in [1 KiB, 2 GiB)");
  }
  if (config.max_staging_region_bytes() == 0) {
    return absl::InvalidArgumentError("config: max_staging_region_bytes must be positive");
  }
  if (config.worker_threads() < 1 || config.copy_threads() < 1) {
    return absl::InvalidArgumentError("config: worker_threads and copy_threads must be >= 1");
  }
  const auto& admission = config.admission();
  if (admission.max_calls_per_tenant() < 1 || admission.max_queued_bytes_per_tenant() < 1 ||
      admission.max_queued_calls() < 1 || admission.max_prefill_tokens_per_call() < 1 ||
      admission.max_append_tokens_per_call() < 1) {
    return absl::InvalidArgumentError("config: every admission limit must be >= 1");
  }
  if (config.shutdown_grace_ms() < 0) {
    return absl::InvalidArgumentError("config: shutdown_grace_ms must be >= 0");
  }
  static const absl::flat_hash_set<std::string> kLevels = {"trace", "debug",    "info", "warn",
                                                           "error", "critical", "off"};
  if (!kLevels.contains(config.log_level())) {
    return absl::InvalidArgumentError(
        absl::StrCat("config: unknown log_level '", config.log_level(), "'"));
  }
  absl::flat_hash_set<std::string> names, tokens;
  for (const auto& tenant : config.tenants()) {
    if (tenant.name().empty() || tenant.token().empty()) {
      return absl::InvalidArgumentError("config: every tenant needs a name and a token");
    }
    if (!names.insert(tenant.name()).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("config: duplicate tenant name '", tenant.name(), "'"));
    }
    if (!tokens.insert(tenant.token()).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("config: tenant '", tenant.name(), "' reuses another tenant's token"));
    }
  }
  RETURN_IF_ERROR(ResolvePrefixCacheConfig(config));
  return config;
}

absl::StatusOr<uint64_t> ParseByteSize(const std::string& text) {
  size_t i = 0;
  uint64_t value = 0;
  while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) {
    const uint64_t digit = static_cast<uint64_t>(text[i] - '0');
    if (value > (UINT64_MAX - digit) / 10) {
      return absl::InvalidArgumentError(absl::StrCat("byte size '", text, "' overflows"));
    }
    value = value * 10 + digit;
    ++i;
  }
  if (i == 0) return absl::InvalidArgumentError(absl::StrCat("bad byte size '", text, "'"));
  std::string suffix = text.substr(i);
  int shift = 0;
  if (suffix.empty() || suffix == "B") {
    shift = 0;
  } else if (suffix == "K" || suffix == "KiB") {
    shift = 10;
  } else if (suffix == "M" || suffix == "MiB") {
    shift = 20;
  } else if (suffix == "G" || suffix == "GiB") {
    shift = 30;
  } else if (suffix == "T" || suffix == "TiB") {
    shift = 40;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("bad byte size suffix in '", text, "'"));
  }
  if (shift > 0 && value > (UINT64_MAX >> shift)) {
    return absl::InvalidArgumentError(absl::StrCat("byte size '", text, "' overflows"));
  }
  return value << shift;
}

bool IsLoopbackHost(const std::string& host) {
  return host == "localhost" || host == "::1" || host == "[::1]" || host.rfind("127.", 0) == 0;
}

absl::Status SplitHostPort(const std::string& address, std::string* host, int* port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon + 1 >= address.size()) {
    return absl::InvalidArgumentError(absl::StrCat("address '", address, "' has no port"));
  }
  *host = address.substr(0, colon);
  if (host->empty())
    return absl::InvalidArgumentError(absl::StrCat("address '", address, "' has no host"));
  const std::string port_text = address.substr(colon + 1);
  int value = 0;
  for (char c : port_text) {
    if (!std::isdigit(static_cast<unsigned char>(c)) || value > 65535) {
      return absl::InvalidArgumentError(absl::StrCat("bad port in address '", address, "'"));
    }
    value = value * 10 + (c - '0');
  }
  if (value > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("bad port in address '", address, "'"));
  }
  *port = value;
  return absl::OkStatus();
}

}  // namespace headwise
