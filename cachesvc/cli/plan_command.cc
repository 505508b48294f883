#include "cachesvc/cli/plan_command.h"

#include <cmath>
#include <map>
#include <optional>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "cachesvc/planner/byte_size.h"
#include "cachesvc/planner/device_profile.h"
#include "cachesvc/planner/layout_presets.h"
#include "cachesvc/planner/plan_report.h"
#include "cachesvc/planner/planner.h"

namespace headwise {
namespace {

// Flags are subcommand-scoped and spelled with dashes (--device-budget), which absl::flags
// (global, identifier names) cannot express; this is a small parser for `--name=value`,
// `--name value` and boolean `--name`.
struct FlagDef {
  const char* name;
  bool takes_value;
};

constexpr FlagDef kFlags[] = {
    {"layout", true},
    {"layout-file", true},
    {"context", true},
    {"policy", true},
    {"placement", true},
    {"device-budget", true},
    {"host-budget", true},
    {"sink", true},
    {"recent", true},
    {"duo-tsv", true},
    {"sparsity", true},
    {"seed", true},
    {"device-head-groups", true},
    {"prefetch-depth", true},
    {"pin-spare", false},
    {"profile", true},
    {"device-bw", true},
    {"link-bw", true},
    {"disk-bw", true},
    {"flops", true},
    {"json", false},
    {"help", false},
};

using FlagValues = std::map<std::string, std::string>;

absl::StatusOr<FlagValues> ParseFlags(const std::vector<std::string>& args) {
  FlagValues values;
  for (size_t i = 0; i < args.size(); ++i) {
    absl::string_view arg = args[i];
    if (arg == "-h") arg = "--help";
    if (!absl::ConsumePrefix(&arg, "--")) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", args[i], "'"));
    }
    std::string name(arg), value;
    bool has_value = false;
    if (const size_t eq = arg.find('='); eq != absl::string_view::npos) {
      name = std::string(arg.substr(0, eq));
      value = std::string(arg.substr(eq + 1));
      has_value = true;
    }
    const FlagDef* def = nullptr;
    for (const FlagDef& f : kFlags) {
      if (name == f.name) def = &f;
    }
    if (def == nullptr) return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    if (!def->takes_value) {
      if (has_value) {
        return absl::InvalidArgumentError(absl::StrCat("--", name, " takes no value"));
      }
      value = "true";
    } else if (!has_value) {
      if (i + 1 >= args.size()) {
        return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
      }
      value = args[++i];
    }
    if (values.count(name) > 0) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " given twice"));
    }
    values[name] = value;
  }
  return values;
}

absl::Status BadValue(absl::string_view flag, absl::string_view value, absl::string_view want) {
  return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", value, ": expected ", want));
}

template <typename Int>
absl::Status ParseInt(const FlagValues& flags, const char* name, Int* out) {
  const auto it = flags.find(name);
  if (it == flags.end()) return absl::OkStatus();
  bool negative = false;
  if constexpr (std::is_signed_v<Int>) negative = !it->second.empty() && *out < 0;
  if (!absl::SimpleAtoi(it->second, out) || negative || (std::is_signed_v<Int> && *out < Int{0})) {
    return BadValue(name, it->second, "a non-negative integer");
  }
  return absl::OkStatus();
}

absl::Status ParseDouble(const FlagValues& flags, const char* name, double* out) {
  const auto it = flags.find(name);
  if (it == flags.end()) return absl::OkStatus();
  if (!absl::SimpleAtod(it->second, out) || !std::isfinite(*out)) {
    return BadValue(name, it->second, "a number");
  }
  return absl::OkStatus();
}

// "1GiB", "unlimited". -1 for unlimited.
absl::Status ParseBudget(const FlagValues& flags, const char* name, int64_t* out) {
  const auto it = flags.find(name);
  if (it == flags.end()) return absl::OkStatus();
  if (it->second == "unlimited") {
    *out = -1;
    return absl::OkStatus();
  }
  absl::StatusOr<int64_t> bytes = ParseByteSize(it->second);
  if (!bytes.ok())
    return absl::InvalidArgumentError(absl::StrCat("--", name, ": ", bytes.status().message()));
  *out = *bytes;
  return absl::OkStatus();
}

// "55GB/s", "55GB", "5.5e10".
absl::Status ParseRate(const FlagValues& flags, const char* name, double* out) {
  const auto it = flags.find(name);
  if (it == flags.end()) return absl::OkStatus();
  absl::string_view text = it->second;
  absl::ConsumeSuffix(&text, "/s");
  double plain = 0;
  if (absl::SimpleAtod(text, &plain) && std::isfinite(plain) && plain > 0) {
    *out = plain;
    return absl::OkStatus();
  }
  absl::StatusOr<int64_t> bytes = ParseByteSize(std::string_view(text.data(), text.size()));
  if (!bytes.ok() || *bytes <= 0) {
    return BadValue(name, it->second, "a positive rate such as 55GB/s or 5.5e10");
  }
  *out = static_cast<double>(*bytes);
  return absl::OkStatus();
}

struct Invocation {
  PlanOptions options;
  PlanLabels labels;
  bool json = false;
};

// Usage errors come back as INVALID_ARGUMENT; failures to read or use input files as other codes
// (the caller maps them to kExitFailure).
struct Failure {
  int exit_code;
  std::string message;
};

std::optional<Failure> BuildInvocation(const FlagValues& flags, Invocation* inv) {
  auto usage = [](const absl::Status& s) { return Failure{kExitUsage, std::string(s.message())}; };
  auto has = [&](const char* name) { return flags.count(name) > 0; };
  inv->json = has("json");

  // Layout.
  if (has("layout") == has("layout-file")) {
    return Failure{kExitUsage, "give exactly one of --layout (a preset: " +
                                   absl::StrJoin(LayoutPresetNames(), ", ") + ") or --layout-file"};
  }
  if (has("layout")) {
    absl::StatusOr<ModelLayout> layout = LayoutPreset(flags.at("layout"));
    if (!layout.ok()) return usage(layout.status());
    inv->options.layout = *layout;
    inv->labels.layout = flags.at("layout");
  } else {
    absl::StatusOr<ModelLayout> layout = LoadLayoutFile(flags.at("layout-file"));
    if (!layout.ok()) return Failure{kExitFailure, std::string(layout.status().message())};
    inv->options.layout = *layout;
    inv->labels.layout = flags.at("layout-file");
  }

  // Context.
  if (!has("context")) return Failure{kExitUsage, "--context (tokens) is required"};
  if (absl::Status s = ParseInt(flags, "context", &inv->options.context_tokens); !s.ok()) {
    return usage(s);
  }

  // Policy.
  PolicyChoice choice;
  if (has("policy")) choice.name = flags.at("policy");
  if (has("placement")) choice.placement = flags.at("placement");
  const bool evicts = choice.name == "streaming_llm" || choice.name == "duo_attention";
  for (const char* flag : {"sink", "recent"}) {
    if (has(flag) && !evicts) {
      return Failure{kExitUsage, absl::StrCat("--", flag,
                                              " applies to --policy streaming_llm or "
                                              "duo_attention only")};
    }
  }
  for (const char* flag : {"duo-tsv", "sparsity", "seed"}) {
    if (has(flag) && choice.name != "duo_attention") {
      return Failure{kExitUsage,
                     absl::StrCat("--", flag, " applies to --policy duo_attention only")};
    }
  }
  if (has("duo-tsv")) {
    // A file on the user's own machine, read size-bounded; it reaches the plan as inline gates.
    absl::StatusOr<DuoAttentionGates> gates = LoadDuoAttentionGates(flags.at("duo-tsv"));
    if (!gates.ok()) return Failure{kExitFailure, std::string(gates.status().message())};
    choice.duo_gates = *std::move(gates);
  }
  for (absl::Status s : {ParseInt(flags, "sink", &choice.sink_tokens),
                         ParseInt(flags, "recent", &choice.recent_tokens),
                         ParseDouble(flags, "sparsity", &choice.sparsity),
                         ParseInt(flags, "seed", &choice.tie_break_seed),
                         ParseInt(flags, "device-head-groups", &choice.device_head_groups),
                         ParseInt(flags, "prefetch-depth", &choice.prefetch_depth)}) {
    if (!s.ok()) return usage(s);
  }
  absl::StatusOr<headwise::v1::PolicySpec> spec = BuildPolicySpec(choice, inv->options.layout);
  if (!spec.ok()) return usage(spec.status());
  inv->options.policy = *std::move(spec);
  inv->options.pin_spare = has("pin-spare");
  inv->labels.policy = choice.name;

  // Profile.
  const std::string profile_name = has("profile") ? flags.at("profile") : "H100-PCIe5";
  const bool bw_given = has("device-bw");
  absl::StatusOr<DeviceProfile> profile =
      DeviceProfileByName(profile_name, /*measure_cpu=*/!bw_given);
  if (!profile.ok()) return usage(profile.status());
  DeviceProfile& p = *profile;
  for (absl::Status s : {ParseRate(flags, "device-bw", &p.device_bytes_per_s),
                         ParseRate(flags, "link-bw", &p.link_bytes_per_s),
                         ParseRate(flags, "disk-bw", &p.disk_bytes_per_s),
                         ParseRate(flags, "flops", &p.flops_per_s)}) {
    if (!s.ok()) return usage(s);
  }
  if (p.name == "cpu" && bw_given && !has("link-bw")) p.link_bytes_per_s = p.device_bytes_per_s / 2;
  if (bw_given || has("link-bw") || has("disk-bw") || has("flops")) {
    absl::StrAppend(&p.description,
                    " [overridden on the command line:", bw_given ? " --device-bw" : "",
                    has("link-bw") ? " --link-bw" : "", has("disk-bw") ? " --disk-bw" : "",
                    has("flops") ? " --flops" : "", "]");
  }
  inv->options.profile = p;

  // Budgets: the device's memory by default, the host unlimited.
  inv->options.device_budget_bytes = p.device_memory_bytes;
  inv->options.host_budget_bytes = -1;
  for (absl::Status s : {ParseBudget(flags, "device-budget", &inv->options.device_budget_bytes),
                         ParseBudget(flags, "host-budget", &inv->options.host_budget_bytes)}) {
    if (!s.ok()) return usage(s);
  }
  return std::nullopt;
}

}  // namespace

std::string PlanUsage() {
  return absl::StrCat(
      "usage: headwise plan (--layout NAME | --layout-file PATH) --context TOKENS [flags]\n"
      "\n"
      "Prints the KV bytes a sequence keeps in each tier (device, host, disk) and a modelled\n"
      "decode time per token. Bytes come from the engine's accounting (page-granular); the time\n"
      "model is described in docs/planner.md.\n"
      "\n"
      "model\n"
      "  --layout NAME            preset: ",
      absl::StrJoin(LayoutPresetNames(), ", "),
      "\n"
      "  --layout-file PATH       JSON: {\"layers\", \"q_heads\", \"kv_heads\", \"head_dim\",\n"
      "                           \"dtype\" (f32|f16|bf16, default f16), \"page_tokens\" (64)}\n"
      "  --context TOKENS         sequence length in tokens (required)\n"
      "\n"
      "policy\n"
      "  --policy NAME            device_only (default), layer_offload, head_offload,\n"
      "                           streaming_llm, duo_attention\n"
      "  --placement MODE         placement for streaming_llm / duo_attention: device_only\n"
      "                           (default), layer_offload, head_offload\n"
      "  --sink N --recent N      streaming_llm / duo_attention window (default 64 + 256)\n"
      "  --duo-tsv PATH           duo_attention gates (full_attention_heads.tsv); without it,\n"
      "                           an even split of retrieval heads over the layers\n"
      "  --sparsity S             duo_attention: fraction of streaming heads (default 0.5)\n"
      "  --seed N                 duo_attention: tie-breaking noise seed (default 0)\n"
      "  --device-head-groups N   head_offload: (layer, kv head) staging buffers (default 2)\n"
      "  --prefetch-depth N       offload modes: units prefetched ahead (default 1; 0 = no\n"
      "                           overlap of transfers with compute)\n"
      "  --pin-spare              offload modes: keep units in the device budget left after\n"
      "                           the staging buffers (not yet done by the engine)\n"
      "\n"
      "budgets (1GiB, 512MiB, 1.5GB, 4096, or unlimited)\n"
      "  --device-budget SIZE     device KV budget (default: the profile's device memory)\n"
      "  --host-budget SIZE       host KV budget; the rest spills to disk (default unlimited)\n"
      "\n"
      "device profile\n"
      "  --profile NAME           ",
      absl::StrJoin(DeviceProfileNames(), ", "),
      " (default H100-PCIe5;\n"
      "                           cpu measures this machine's memory bandwidth)\n"
      "  --device-bw RATE --link-bw RATE --disk-bw RATE   override, e.g. 55GB/s or 5.5e10\n"
      "  --flops RATE             override the FLOP rate, e.g. 989e12\n"
      "\n"
      "output\n"
      "  --json                   one JSON object instead of the table\n"
      "  --help                   this text\n"
      "\n"
      "exit status: 0 ok, 1 an input file could not be used, 2 bad command line\n");
}

int RunPlanCommand(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  absl::StatusOr<FlagValues> flags = ParseFlags(args);
  if (!flags.ok()) {
    err << "headwise plan: " << flags.status().message() << " (see headwise plan --help)\n";
    return kExitUsage;
  }
  if (flags->count("help") > 0) {
    out << PlanUsage();
    return kExitOk;
  }
  Invocation inv;
  if (std::optional<Failure> failure = BuildInvocation(*flags, &inv)) {
    err << "headwise plan: " << failure->message;
    if (failure->exit_code == kExitUsage) err << " (see headwise plan --help)";
    err << "\n";
    return failure->exit_code;
  }
  absl::StatusOr<Plan> plan = MakePlan(inv.options);
  if (!plan.ok()) {
    err << "headwise plan: " << plan.status().message() << "\n";
    return kExitFailure;
  }
  out << (inv.json ? FormatPlanJson(*plan, inv.labels) : FormatPlanTable(*plan, inv.labels));
  return kExitOk;
}

}  // namespace headwise
