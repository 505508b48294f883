// `headwise status`, `headwise list`, `headwise stats`: ask a running headwised (through the
// C++ client, clients/cpp/client.h) for its health and tier summary, the caller's tenant's
// sequences, and its full statistics. Human-readable tables by default, one JSON object with
// --json (field names are the service.proto field names; docs/cli.md lists them).
//
// Flags common to the three: --target (default unix://./var/headwised.sock), --token (default
// $HEADWISE_TOKEN, else dev-token), --timeout (seconds per call, default 5), --json, --help.
#ifndef HEADWISE_CACHESVC_CLI_DAEMON_COMMANDS_H_
#define HEADWISE_CACHESVC_CLI_DAEMON_COMMANDS_H_

#include <ostream>
#include <string>
#include <vector>

namespace headwise {

// The texts of `headwise status|list|stats --help`.
std::string StatusUsage();
std::string ListUsage();
std::string StatsUsage();

// Each runs its subcommand with `args` (the arguments after the subcommand's name), writes the
// report to `out` and errors (one line, prefixed "headwise <command>: ") to `err`, and returns
// kExitOk, kExitFailure (the daemon could not be reached or refused the call) or kExitUsage
// (plan_command.h).
int RunStatusCommand(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
int RunListCommand(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
int RunStatsCommand(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace headwise

#endif  // HEADWISE_CACHESVC_CLI_DAEMON_COMMANDS_H_
