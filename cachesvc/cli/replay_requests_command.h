// `headwise replay-requests`: replays a request-level trace (Mooncake JSONL, Azure CSV) through
// the prefix-cache eviction policies at several capacities and prints hit ratios, bytes and a
// modelled TTFT saving (cachesvc/replay/request_replay.h) as a table, JSON or CSV.
#ifndef HEADWISE_CACHESVC_CLI_REPLAY_REQUESTS_COMMAND_H_
#define HEADWISE_CACHESVC_CLI_REPLAY_REQUESTS_COMMAND_H_

#include <ostream>
#include <string>
#include <vector>

namespace headwise {

// The text of `headwise replay-requests --help`.
std::string ReplayRequestsUsage();

// Runs `headwise replay-requests` with `args` (the arguments after the command name). The
// report goes to `out`, errors (one line each, prefixed "headwise replay-requests: ") to `err`.
// Returns an exit code of plan_command.h (kExitOk, kExitFailure for an unreadable or bad trace,
// kExitUsage for a bad command line).
int RunReplayRequestsCommand(const std::vector<std::string>& args, std::ostream& out,
                             std::ostream& err);

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_CLI_REPLAY_REQUESTS_COMMAND_H_
