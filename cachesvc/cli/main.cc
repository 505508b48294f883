// `headwise`: the command-line tool. Subcommands: plan, status, list, stats, replay-requests.
#include <iostream>
#include <string>
#include <vector>

#include "cachesvc/cli/daemon_commands.h"
#include "cachesvc/cli/plan_command.h"
#include "cachesvc/cli/replay_requests_command.h"

namespace {

constexpr char kUsage[] =
    "usage: headwise <command> [flags]\n"
    "\n"
    "commands:\n"
    "  plan    KV bytes per tier (device, host, disk) and modelled decode time per token for a\n"
    "          model layout, context length, policy and device profile\n"
    "  status  health of a running headwised and a summary of its tiers\n"
    "  list    the sequences of your tenant in a running headwised\n"
    "  stats   every statistic of a running headwised\n"
    "  replay-requests  prefix-cache hit ratios of eviction policies on a request trace\n"
    "          (Mooncake, Azure) by capacity, with bytes moved and a modelled TTFT saving\n"
    "\n"
    "`headwise <command> --help` describes a command's flags.\n";

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) {
    std::cerr << kUsage;
    return headwise::kExitUsage;
  }
  const std::string& command = args[0];
  if (command == "--help" || command == "-h" || command == "help") {
    std::cout << kUsage;
    return headwise::kExitOk;
  }
  const std::vector<std::string> rest(args.begin() + 1, args.end());
  if (command == "plan") return headwise::RunPlanCommand(rest, std::cout, std::cerr);
  if (command == "status") return headwise::RunStatusCommand(rest, std::cout, std::cerr);
  if (command == "list") return headwise::RunListCommand(rest, std::cout, std::cerr);
  if (command == "stats") return headwise::RunStatsCommand(rest, std::cout, std::cerr);
  if (command == "replay-requests") {
    return headwise::RunReplayRequestsCommand(rest, std::cout, std::cerr);
  }
  std::cerr << "headwise: unknown command '" << command << "'\n\n" << kUsage;
  return headwise::kExitUsage;
}
