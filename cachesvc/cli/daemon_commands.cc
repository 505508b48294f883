#include "cachesvc/cli/daemon_commands.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <optional>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "cachesvc/cli/plan_command.h"
#include "cachesvc/planner/byte_size.h"
#include "cachesvc/service/config.h"
#include "clients/cpp/client.h"
#include "nlohmann/json.hpp"

namespace headwise {
namespace {

namespace v1 = ::headwise::v1;
using client::Client;
using client::ClientOptions;
using nlohmann::json;

struct Invocation {
  ClientOptions options;
  bool json = false;
  bool help = false;
  std::string token_file;   // --token_file: read by Prepare.
  bool token_flag = false;  // --token was given (Prepare warns).
};

// `--name=value`, `--name value`, boolean `--json`/`--help`/`-h`.
absl::StatusOr<Invocation> ParseArgs(const std::vector<std::string>& args) {
  Invocation inv;
  if (const char* token = std::getenv("HEADWISE_TOKEN"); token != nullptr && *token != '\0') {
    inv.options.token = token;
  }
  inv.options.deadline = absl::Seconds(5);
  inv.options.reconnect_deadline = absl::Seconds(2);
  std::map<std::string, std::string> seen;
  for (size_t i = 0; i < args.size(); ++i) {
    std::string arg = args[i];
    if (arg == "-h") arg = "--help";
    absl::string_view rest = arg;
    if (!absl::ConsumePrefix(&rest, "--")) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", args[i], "'"));
    }
    std::string name(rest), value;
    bool has_value = false;
    if (const size_t eq = rest.find('='); eq != absl::string_view::npos) {
      name = std::string(rest.substr(0, eq));
      value = std::string(rest.substr(eq + 1));
      has_value = true;
    }
    const bool boolean = name == "json" || name == "help";
    if (!boolean && name != "target" && name != "token" && name != "token_file" &&
        name != "timeout") {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    }
    if (boolean && has_value) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " takes no value"));
    }
    if (!boolean && !has_value) {
      if (i + 1 >= args.size()) {
        return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
      }
      value = args[++i];
    }
    if (!seen.emplace(name, value).second) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " given twice"));
    }
    if (name == "json") inv.json = true;
    if (name == "help") inv.help = true;
    if (name == "target") inv.options.target = value;
    if (name == "token") {
      inv.options.token = value;
      inv.token_flag = true;
    }
    if (name == "token_file") inv.token_file = value;
    if (name == "timeout") {
      double seconds = 0;
      if (!absl::SimpleAtod(value, &seconds) || !(seconds > 0)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--timeout=", value, ": expected a positive number of seconds"));
      }
      inv.options.deadline = absl::Seconds(seconds);
    }
  }
  if (inv.options.target.empty()) return absl::InvalidArgumentError("--target is empty");
  if (inv.token_flag && seen.contains("token_file")) {
    return absl::InvalidArgumentError("give --token_file or --token, not both");
  }
  if (seen.contains("token_file") && inv.token_file.empty()) {
    return absl::InvalidArgumentError("--token_file is empty");
  }
  if (inv.options.token.empty()) return absl::InvalidArgumentError("--token is empty");
  return inv;
}

std::string CommonFlags() {
  return absl::StrCat(
      "  --target=TARGET   the daemon: unix:///abs.sock, unix://rel.sock or host:port\n"
      "                    (default ",
      client::kDefaultTarget,
      ")\n"
      "  --token_file=FILE file holding the tenant's bearer token (default $HEADWISE_TOKEN,\n"
      "                    else ",
      client::kDefaultToken,
      ")\n"
      "  --token=TOKEN     the token itself; warns: other local users can read command lines\n"
      "  --timeout=SECONDS deadline of each call (default 5)\n"
      "  --json            one JSON object instead of the table\n"
      "  --help            this text\n");
}

std::string Bytes(uint64_t bytes) { return FormatBytes(static_cast<int64_t>(bytes)); }

json TierJson(const v1::TierStats& tier) {
  return {{"tier", tier.tier()},
          {"used_bytes", tier.used_bytes()},
          {"peak_bytes", tier.peak_bytes()},
          {"budget_bytes", tier.budget_bytes()},
          {"emulated", tier.emulated()}};
}

void PrintTiers(const v1::StatsResponse& stats, std::ostream& out) {
  out << absl::StrFormat("%-8s %14s %14s %14s %6s\n", "tier", "used", "peak", "budget", "used%");
  for (const v1::TierStats& tier : stats.tiers()) {
    const std::string percent =
        tier.budget_bytes() == 0
            ? "-"
            : absl::StrFormat("%.1f", 100.0 * tier.used_bytes() / tier.budget_bytes());
    out << absl::StrFormat("%-8s %14s %14s %14s %6s%s\n", tier.tier(), Bytes(tier.used_bytes()),
                           Bytes(tier.peak_bytes()),
                           tier.budget_bytes() == 0 ? "-" : Bytes(tier.budget_bytes()), percent,
                           tier.emulated() ? "  (emulated: no GPU)" : "");
  }
}

// Connects (without the Health probe: each command makes its own calls) or reports why not.
std::unique_ptr<Client> ConnectOrReport(const Invocation& inv, const std::string& command,
                                        std::ostream& err) {
  ClientOptions options = inv.options;
  options.check_health = false;
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(options);
  if (!client.ok()) {
    err << "headwise " << command << ": " << client.status() << "\n";
    return nullptr;
  }
  return *std::move(client);
}

int Report(const std::string& command, const Invocation& inv, const absl::Status& status,
           std::ostream& err) {
  err << "headwise " << command << ": " << inv.options.target << ": " << status << "\n";
  if (status.code() == absl::StatusCode::kUnavailable) {
    err << "headwise " << command << ": is headwised running? (start it with `headwised`, or "
        << "pass --target)\n";
  }
  return kExitFailure;
}

// Parses flags, handles --help and usage errors. Returns the invocation, or nullopt with
// *exit_code set.
std::optional<Invocation> Prepare(const std::string& command, const std::string& usage,
                                  const std::vector<std::string>& args, std::ostream& out,
                                  std::ostream& err, int* exit_code) {
  absl::StatusOr<Invocation> inv = ParseArgs(args);
  if (!inv.ok()) {
    err << "headwise " << command << ": " << inv.status().message() << "\n\n" << usage;
    *exit_code = kExitUsage;
    return std::nullopt;
  }
  if (inv->help) {
    out << usage;
    *exit_code = kExitOk;
    return std::nullopt;
  }
  if (inv->token_flag) err << "headwise " << command << ": warning: " << kTokenFlagWarning << "\n";
  if (!inv->token_file.empty()) {
    absl::StatusOr<std::string> token = ReadTokenFile(inv->token_file);
    if (!token.ok()) {
      err << "headwise " << command << ": " << token.status().message() << "\n";
      *exit_code = kExitFailure;
      return std::nullopt;
    }
    inv->options.token = *std::move(token);
  }
  return *std::move(inv);
}

}  // namespace

std::string StatusUsage() {
  return absl::StrCat(
      "usage: headwise status [flags]\n"
      "\n"
      "Health of a running headwised and a summary of its tiers (used, peak, budget).\n"
      "Exit status 0 when it answers SERVING, 1 when it cannot be reached or refuses the token.\n"
      "\n"
      "flags:\n",
      CommonFlags());
}

std::string ListUsage() {
  return absl::StrCat(
      "usage: headwise list [flags]\n"
      "\n"
      "The sequences of the token's tenant: handle, layout, durability, length, pages and\n"
      "bytes per tier.\n"
      "\n"
      "flags:\n",
      CommonFlags());
}

std::string StatsUsage() {
  return absl::StrCat(
      "usage: headwise stats [flags]\n"
      "\n"
      "Every figure of the daemon's Stats call: tiers, sequences, pages, evictions, bytes moved\n"
      "between tiers, copy stall and overlap time, and the tenant's usage.\n"
      "\n"
      "flags:\n",
      CommonFlags());
}

int RunStatusCommand(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  int code = kExitOk;
  std::optional<Invocation> inv = Prepare("status", StatusUsage(), args, out, err, &code);
  if (!inv) return code;
  std::unique_ptr<Client> client = ConnectOrReport(*inv, "status", err);
  if (client == nullptr) return kExitFailure;
  absl::StatusOr<v1::HealthResponse> health = client->Health();
  if (!health.ok()) return Report("status", *inv, health.status(), err);
  absl::StatusOr<v1::StatsResponse> stats = client->Stats();
  if (!stats.ok()) return Report("status", *inv, stats.status(), err);

  if (inv->json) {
    json tiers = json::array();
    for (const v1::TierStats& tier : stats->tiers()) tiers.push_back(TierJson(tier));
    const json report = {{"target", inv->options.target},
                         {"status", health->status()},
                         {"version", health->version()},
                         {"sequences", stats->sequences()},
                         {"pages", stats->pages()},
                         {"tenant_sequences", stats->tenant_sequences()},
                         {"tenant_bytes", stats->tenant_bytes()},
                         {"tiers", tiers}};
    out << report.dump(2) << "\n";
  } else {
    out << "headwised at " << inv->options.target << ": " << health->status() << " (version "
        << health->version() << ")\n"
        << "sequences: " << stats->sequences() << " (" << stats->tenant_sequences()
        << " of this tenant, " << Bytes(stats->tenant_bytes()) << ")\n"
        << "pages: " << stats->pages() << "\n\n";
    PrintTiers(*stats, out);
  }
  return health->status() == "SERVING" ? kExitOk : kExitFailure;
}

int RunListCommand(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  int code = kExitOk;
  std::optional<Invocation> inv = Prepare("list", ListUsage(), args, out, err, &code);
  if (!inv) return code;
  std::unique_ptr<Client> client = ConnectOrReport(*inv, "list", err);
  if (client == nullptr) return kExitFailure;
  absl::StatusOr<std::vector<v1::SequenceInfo>> sequences = client->ListSequences();
  if (!sequences.ok()) return Report("list", *inv, sequences.status(), err);
  std::sort(
      sequences->begin(), sequences->end(),
      [](const v1::SequenceInfo& a, const v1::SequenceInfo& b) { return a.handle() < b.handle(); });
  auto length_of = [](const v1::SequenceInfo& s) -> int64_t {
    if (s.layer_lengths().empty()) return 0;
    return *std::min_element(s.layer_lengths().begin(), s.layer_lengths().end());
  };

  if (inv->json) {
    json list = json::array();
    for (const v1::SequenceInfo& s : *sequences) {
      list.push_back({{"handle", s.handle()},
                      {"layout_name", s.layout_name()},
                      {"durable", s.durable()},
                      {"length", length_of(s)},
                      {"layer_lengths",
                       std::vector<int64_t>(s.layer_lengths().begin(), s.layer_lengths().end())},
                      {"device_bytes", s.device_bytes()},
                      {"host_bytes", s.host_bytes()},
                      {"disk_bytes", s.disk_bytes()},
                      {"pages", s.pages()},
                      {"shared_pages", s.shared_pages()},
                      {"evicted_pages", s.evicted_pages()}});
    }
    out << json{{"sequences", list}}.dump(2) << "\n";
    return kExitOk;
  }
  if (sequences->empty()) {
    out << "no sequences\n";
    return kExitOk;
  }
  out << absl::StrFormat("%-32s  %-16s %-7s %9s %8s %12s %12s %12s\n", "handle", "layout",
                         "durable", "length", "pages", "device", "host", "disk");
  for (const v1::SequenceInfo& s : *sequences) {
    out << absl::StrFormat("%-32s  %-16s %-7s %9d %8d %12s %12s %12s\n", s.handle(),
                           s.layout_name(), s.durable() ? "yes" : "no", length_of(s), s.pages(),
                           Bytes(s.device_bytes()), Bytes(s.host_bytes()), Bytes(s.disk_bytes()));
  }
  out << sequences->size() << " sequence" << (sequences->size() == 1 ? "" : "s") << "\n";
  return kExitOk;
}

int RunStatsCommand(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  int code = kExitOk;
  std::optional<Invocation> inv = Prepare("stats", StatsUsage(), args, out, err, &code);
  if (!inv) return code;
  std::unique_ptr<Client> client = ConnectOrReport(*inv, "stats", err);
  if (client == nullptr) return kExitFailure;
  absl::StatusOr<v1::StatsResponse> stats = client->Stats();
  if (!stats.ok()) return Report("stats", *inv, stats.status(), err);

  if (inv->json) {
    json tiers = json::array();
    for (const v1::TierStats& tier : stats->tiers()) tiers.push_back(TierJson(tier));
    const json report = {{"tiers", tiers},
                         {"sequences", stats->sequences()},
                         {"pages", stats->pages()},
                         {"evicted_pages", stats->evicted_pages()},
                         {"bytes_device_to_host", stats->bytes_device_to_host()},
                         {"bytes_host_to_device", stats->bytes_host_to_device()},
                         {"bytes_host_to_disk", stats->bytes_host_to_disk()},
                         {"bytes_disk_to_host", stats->bytes_disk_to_host()},
                         {"stall_seconds", stats->stall_seconds()},
                         {"overlapped_seconds", stats->overlapped_seconds()},
                         {"tenant_sequences", stats->tenant_sequences()},
                         {"tenant_bytes", stats->tenant_bytes()}};
    out << report.dump(2) << "\n";
    return kExitOk;
  }
  PrintTiers(*stats, out);
  out << "\n";
  auto row = [&out](const char* name, const std::string& value) {
    out << absl::StrFormat("%-22s %s\n", name, value);
  };
  row("sequences", absl::StrCat(stats->sequences()));
  row("pages", absl::StrCat(stats->pages()));
  row("evicted pages", absl::StrCat(stats->evicted_pages()));
  row("device -> host", Bytes(stats->bytes_device_to_host()));
  row("host -> device", Bytes(stats->bytes_host_to_device()));
  row("host -> disk", Bytes(stats->bytes_host_to_disk()));
  row("disk -> host", Bytes(stats->bytes_disk_to_host()));
  row("copy stall", absl::StrFormat("%.6f s", stats->stall_seconds()));
  row("copy overlapped", absl::StrFormat("%.6f s", stats->overlapped_seconds()));
  row("tenant sequences", absl::StrCat(stats->tenant_sequences()));
  row("tenant bytes", Bytes(stats->tenant_bytes()));
  return kExitOk;
}

}  // namespace headwise
