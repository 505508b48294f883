// `headwise plan`: prints what a sequence's KV cache costs per tier and a modelled decode time
// per token (cachesvc/planner/planner.h), as a table or as JSON.
#ifndef HEADWISE_CACHESVC_CLI_PLAN_COMMAND_H_
#define HEADWISE_CACHESVC_CLI_PLAN_COMMAND_H_

#include <ostream>
#include <string>
#include <vector>

namespace headwise {

// Exit codes of every `headwise` subcommand.
inline constexpr int kExitOk = 0;
// The command ran but failed: a file could not be read or holds bad data.
inline constexpr int kExitFailure = 1;
// The command line is wrong: an unknown flag, a missing or malformed value.
inline constexpr int kExitUsage = 2;

// The text of `headwise plan --help`.
std::string PlanUsage();

// Runs `headwise plan` with `args` (the arguments after "plan"). The report goes to `out`,
// errors (one line each, prefixed "headwise plan: ") to `err`. Returns an exit code above.
int RunPlanCommand(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_CLI_PLAN_COMMAND_H_
