#include "cachesvc/cli/replay_requests_command.h"

#include <cmath>
#include <map>
#include <optional>
#include <utility>

#include "absl/algorithm/container.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "cachesvc/cli/plan_command.h"
#include "cachesvc/planner/byte_size.h"
#include "cachesvc/planner/device_profile.h"
#include "cachesvc/planner/layout_presets.h"
#include "cachesvc/replay/replay_report.h"
#include "cachesvc/replay/request_replay.h"

namespace headwise {
namespace {

// Parameter counts of the layout presets (the models' published sizes), for the prefill FLOPs.
const std::map<std::string, double>& PresetParams() {
  static const auto* params = new std::map<std::string, double>{{"llama-3-8b", 8.03e9},
                                                                {"llama-2-7b", 6.74e9},
                                                                {"mistral-7b", 7.24e9},
                                                                {"qwen2.5-7b", 7.62e9}};
  return *params;
}

// Every flag takes a value except these; only --policy may repeat.
constexpr const char* kValueFlags[] = {"trace",    "format",       "policy",
                                       "capacity", "layout",       "model-params",
                                       "device",   "block-tokens", "max-trace-bytes"};
constexpr const char* kSwitches[] = {"json", "csv", "no-unlimited", "help"};

struct Args {
  std::multimap<std::string, std::string> values;
  bool has(const std::string& name) const { return values.count(name) > 0; }
  std::string get(const std::string& name, const std::string& fallback) const {
    const auto it = values.find(name);
    return it == values.end() ? fallback : it->second;
  }
};

absl::StatusOr<Args> Parse(const std::vector<std::string>& raw) {
  Args args;
  for (size_t i = 0; i < raw.size(); ++i) {
    absl::string_view arg = raw[i];
    if (arg == "-h") arg = "--help";
    if (!absl::ConsumePrefix(&arg, "--")) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", raw[i], "'"));
    }
    const size_t eq = arg.find('=');
    const std::string name(arg.substr(0, eq));
    const bool takes_value = absl::c_linear_search(kValueFlags, name);
    if (!takes_value && !absl::c_linear_search(kSwitches, name)) {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    }
    std::string value = "true";
    if (eq != absl::string_view::npos) {
      if (!takes_value)
        return absl::InvalidArgumentError(absl::StrCat("--", name, " takes no value"));
      value = std::string(arg.substr(eq + 1));
    } else if (takes_value) {
      if (i + 1 >= raw.size())
        return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
      value = raw[++i];
    }
    if (name != "policy" && args.has(name)) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " given twice"));
    }
    args.values.emplace(name, std::move(value));
  }
  return args;
}

// "5%,10%,0.25" -> {0.05, 0.10, 0.25}.
absl::StatusOr<std::vector<double>> ParseCapacities(const std::string& text) {
  std::vector<double> fractions;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    part = absl::StripAsciiWhitespace(part);
    const bool percent = absl::ConsumeSuffix(&part, "%");
    double value = 0;
    if (!absl::SimpleAtod(part, &value) || !std::isfinite(value)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--capacity: '", part, "' is not a fraction (0.05) or a percentage (5%)"));
    }
    if (percent) value /= 100;
    if (!(value > 0 && value <= 1)) {
      return absl::InvalidArgumentError("--capacity: each capacity must be in (0, 100%]");
    }
    fractions.push_back(value);
  }
  return fractions;
}

absl::Status Usage(absl::string_view message) { return absl::InvalidArgumentError(message); }

// The replay options from the flags (everything but the trace).
absl::StatusOr<RequestReplayOptions> BuildOptions(const Args& args) {
  RequestReplayOptions options;
  const auto policies = args.values.equal_range("policy");
  if (policies.first != policies.second) {
    options.policies.clear();
    for (auto it = policies.first; it != policies.second; ++it) {
      for (absl::string_view name : absl::StrSplit(it->second, ',', absl::SkipWhitespace())) {
        options.policies.emplace_back(absl::StripAsciiWhitespace(name));
      }
    }
  }
  if (args.has("capacity")) {
    absl::StatusOr<std::vector<double>> fractions = ParseCapacities(args.get("capacity", ""));
    if (!fractions.ok()) return fractions.status();
    options.capacity_fractions = *std::move(fractions);
  }
  options.unlimited = !args.has("no-unlimited");

  const std::string layout_name = absl::AsciiStrToLower(args.get("layout", "llama-3-8b"));
  absl::StatusOr<ModelLayout> layout = LayoutPreset(layout_name);
  if (!layout.ok()) return layout.status();
  options.token_kv_bytes = layout->token_bytes();
  options.model_params = PresetParams().at(layout_name);
  if (args.has("model-params")) {
    const std::string text = args.get("model-params", "");
    if (!absl::SimpleAtod(text, &options.model_params) || !std::isfinite(options.model_params) ||
        options.model_params <= 0) {
      return Usage(absl::StrCat("--model-params=", text, ": expected a positive number (8.03e9)"));
    }
  }
  absl::StatusOr<DeviceProfile> device = DeviceProfileByName(args.get("device", "H100-PCIe5"));
  if (!device.ok()) return device.status();
  options.device = *std::move(device);
  return options;
}

absl::StatusOr<RequestTraceLimits> BuildLimits(const Args& args) {
  RequestTraceLimits limits;
  if (args.has("block-tokens")) {
    const std::string text = args.get("block-tokens", "");
    if (!absl::SimpleAtoi(text, &limits.block_tokens) || limits.block_tokens < 1) {
      return Usage(absl::StrCat("--block-tokens=", text, ": expected a positive integer"));
    }
  }
  if (args.has("max-trace-bytes")) {
    absl::StatusOr<int64_t> bytes = ParseByteSize(args.get("max-trace-bytes", ""));
    if (!bytes.ok() || *bytes <= 0) {
      return Usage("--max-trace-bytes: expected a positive size such as 2GiB");
    }
    limits.max_file_bytes = static_cast<uint64_t>(*bytes);
  }
  return limits;
}

// Runs the command; a non-OK status is a usage error when INVALID_ARGUMENT came from the flags
// (`usage_error` set), a failure otherwise.
absl::Status Run(const Args& args, std::ostream& out, bool* usage_error) {
  *usage_error = true;
  if (!args.has("trace"))
    return Usage("--trace (a Mooncake .jsonl or Azure .csv file) is required");
  if (args.has("json") && args.has("csv")) return Usage("give at most one of --json and --csv");
  const std::string path = args.get("trace", "");
  absl::StatusOr<RequestTraceFormat> format = args.has("format")
                                                  ? ParseRequestTraceFormat(args.get("format", ""))
                                                  : RequestTraceFormatForPath(path);
  if (!format.ok()) return format.status();
  absl::StatusOr<RequestReplayOptions> options = BuildOptions(args);
  if (!options.ok()) return options.status();
  absl::StatusOr<RequestTraceLimits> limits = BuildLimits(args);
  if (!limits.ok()) return limits.status();
  for (const std::string& name : options->policies) {
    if (absl::Status s = MakeBlockCache(name, 1).status(); !s.ok()) return s;
  }

  *usage_error = false;
  absl::StatusOr<RequestTrace> trace = LoadRequestTrace(path, *format, *limits);
  if (!trace.ok()) return trace.status();
  absl::StatusOr<RequestReplayReport> report = ReplayRequests(*trace, *options);
  if (!report.ok()) return report.status();
  if (args.has("json")) {
    out << ReplayReportJson(*report);
  } else if (args.has("csv")) {
    out << ReplayReportCsv(*report);
  } else {
    out << FormatReplayTable(*report);
  }
  return absl::OkStatus();
}

}  // namespace

std::string ReplayRequestsUsage() {
  return absl::StrCat(
      "usage: headwise replay-requests --trace FILE [flags]\n"
      "\n"
      "Replays a request-level trace through prefix-cache eviction policies and reports, per\n"
      "policy and capacity, the block hit ratio, the prefix hit ratio, bytes read from and\n"
      "written to the cache tier and a modelled TTFT saving (docs/replay.md).\n"
      "\n"
      "  --trace FILE           Mooncake JSONL (prefix block ids) or Azure CSV (arrivals and\n"
      "                         lengths only: the token volume is reported, no reuse)\n"
      "  --format F             mooncake | azure (default: from the extension, .jsonl / .csv)\n"
      "  --policy P             a policy, repeatable or comma-separated (default: all of ",
      absl::StrJoin(BlockCachePolicyNames(), ", "),
      ")\n"
      "  --capacity LIST        capacities as shares of the trace's unique blocks\n"
      "                         (default 5%,10%,25%); an unlimited cache is always added\n"
      "  --no-unlimited         leave the unlimited cache out\n"
      "  --layout NAME          KV bytes per token and parameter count: ",
      absl::StrJoin(LayoutPresetNames(), ", "),
      " (default llama-3-8b)\n"
      "  --model-params N       override the parameter count (prefill = 2 N FLOPs per token)\n"
      "  --device NAME          device profile: ",
      absl::StrJoin(DeviceProfileNames(), ", "),
      " (default H100-PCIe5)\n"
      "  --block-tokens N       tokens per prefix block (default 512, Mooncake's)\n"
      "  --max-trace-bytes SIZE largest trace file read (default 1GiB)\n"
      "  --json | --csv         machine-readable output instead of the table\n");
}

int RunReplayRequestsCommand(const std::vector<std::string>& args, std::ostream& out,
                             std::ostream& err) {
  constexpr char kPrefix[] = "headwise replay-requests: ";
  absl::StatusOr<Args> parsed = Parse(args);
  if (!parsed.ok()) {
    err << kPrefix << parsed.status().message() << "\n";
    return kExitUsage;
  }
  if (parsed->has("help")) {
    out << ReplayRequestsUsage();
    return kExitOk;
  }
  bool usage_error = false;
  if (absl::Status s = Run(*parsed, out, &usage_error); !s.ok()) {
    err << kPrefix << s.message() << "\n";
    return usage_error ? kExitUsage : kExitFailure;
  }
  return kExitOk;
}

}  // namespace headwise
