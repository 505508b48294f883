// headwise_llama2: generates text from a llama2.c checkpoint with Headwise holding the KV cache.
// Usage and flags: docs/llama2.md, or run without arguments.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "clients/llama2/checkpoint.h"
#include "clients/llama2/embedded_backend.h"
#include "clients/llama2/policy_compare.h"
#include "clients/llama2/remote_backend.h"
#include "clients/llama2/sampler.h"
#include "clients/llama2/tokenizer.h"
#include "clients/llama2/transformer.h"

namespace headwise::llama2 {
namespace {

constexpr char kUsage[] =
    "Usage: headwise_llama2 <checkpoint.bin> [tokenizer.bin] [options]\n"
    "  -z <path>          tokenizer (also the second positional argument; required)\n"
    "  -n <int>           steps (positions) to run; 0 or > seq_len means seq_len. Default 256\n"
    "  -t <float>         temperature; 0 = greedy. Default 1.0\n"
    "  -p <float>         top-p (nucleus) in [0, 1]. Default 0.9\n"
    "  -s <int>           RNG seed; 0 = current time (as run.c). Default 0\n"
    "  -i <string>        prompt. Default empty\n"
    "  --embedded         in-process Headwise engine (the default)\n"
    "  --target <addr>    use the headwised daemon at <addr> (unix:/path.sock or host:port)\n"
    "  --token <token>    daemon bearer token. Default dev-token\n"
    "  --sink <int>       StreamingLLM: attention-sink tokens kept (enables the policy)\n"
    "  --recent <int>     StreamingLLM: recent tokens kept (enables the policy)\n"
    "  --page-tokens <n>  tokens per KV page, a power of two. Default 16\n"
    "  --compare <n>      compare policies instead of generating: greedy full-cache reference,\n"
    "                     then StreamingLLM and H2O at <n> tokens per head, teacher-forced\n";

struct Flags {
  std::string checkpoint;
  std::string tokenizer;
  int steps = 256;
  float temperature = 1.0f;
  float top_p = 0.9f;
  int64_t seed = 0;
  std::string prompt;
  std::string target;  // Empty: embedded engine.
  std::string token = client::kDefaultToken;
  bool streaming = false;
  int64_t sink = 4;
  int64_t recent = 64;
  int page_tokens = 16;
  int compare_budget = 0;  // > 0: --compare.
};

absl::Status ParseFlags(int argc, char** argv, Flags& flags) {
  int positional = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--embedded") {
      flags.target.clear();
      continue;
    }
    if (arg.empty() || arg[0] != '-') {
      if (positional == 0) {
        flags.checkpoint = argv[i];
      } else if (positional == 1) {
        flags.tokenizer = argv[i];
      } else {
        return absl::InvalidArgumentError(absl::StrCat("unexpected argument ", argv[i]));
      }
      ++positional;
      continue;
    }
    if (i + 1 >= argc) return absl::InvalidArgumentError(absl::StrCat(argv[i], " needs a value"));
    const std::string value = argv[++i];
    bool ok = true;
    if (arg == "-z") {
      flags.tokenizer = value;
    } else if (arg == "-n") {
      ok = absl::SimpleAtoi(value, &flags.steps);
    } else if (arg == "-t") {
      ok = absl::SimpleAtof(value, &flags.temperature);
    } else if (arg == "-p") {
      ok = absl::SimpleAtof(value, &flags.top_p);
    } else if (arg == "-s") {
      ok = absl::SimpleAtoi(value, &flags.seed);
    } else if (arg == "-i") {
      flags.prompt = value;
    } else if (arg == "--sink") {
      ok = absl::SimpleAtoi(value, &flags.sink);
      flags.streaming = true;
    } else if (arg == "--recent") {
      ok = absl::SimpleAtoi(value, &flags.recent);
      flags.streaming = true;
    } else if (arg == "--compare") {
      ok = absl::SimpleAtoi(value, &flags.compare_budget) && flags.compare_budget >= 8;
    } else if (arg == "--page-tokens") {
      ok = absl::SimpleAtoi(value, &flags.page_tokens);
    } else if (arg == "--target") {
      flags.target = value;
    } else if (arg == "--token") {
      flags.token = value;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag ", std::string(arg)));
    }
    if (!ok)
      return absl::InvalidArgumentError(
          absl::StrCat("bad value for ", std::string(arg), ": ", value));
  }
  if (flags.checkpoint.empty()) return absl::InvalidArgumentError("missing checkpoint path");
  if (flags.tokenizer.empty()) return absl::InvalidArgumentError("missing tokenizer path (-z)");
  return absl::OkStatus();
}

absl::Status Run(const Flags& flags) {
  absl::StatusOr<Checkpoint> checkpoint = LoadCheckpoint(flags.checkpoint);
  if (!checkpoint.ok()) return checkpoint.status();
  absl::StatusOr<Tokenizer> tokenizer =
      Tokenizer::Load(flags.tokenizer, checkpoint->config.vocab_size);
  if (!tokenizer.ok()) return tokenizer.status();

  std::unique_ptr<KvBackend> backend;
  if (flags.target.empty()) {
    absl::StatusOr<std::unique_ptr<EmbeddedBackend>> embedded = EmbeddedBackend::Create({});
    if (!embedded.ok()) return embedded.status();
    backend = *std::move(embedded);
  } else {
    client::ClientOptions client_options;
    client_options.target = flags.target;
    client_options.token = flags.token;
    absl::StatusOr<std::unique_ptr<RemoteBackend>> remote = RemoteBackend::Connect(client_options);
    if (!remote.ok()) return remote.status();
    backend = *std::move(remote);
  }
  if (flags.compare_budget > 0) {
    absl::StatusOr<std::vector<ComparisonRow>> rows =
        ComparePolicies(*checkpoint, *backend, flags.steps, flags.page_tokens,
                        DefaultComparison(flags.compare_budget));
    if (!rows.ok()) return rows.status();
    std::printf("%-34s %9s %10s  %s\n", "policy", "argmax", "tok/s", "cache at the end");
    for (const ComparisonRow& row : *rows) {
      const std::string first_line = row.stats.substr(0, row.stats.find('\n'));
      std::printf("%-34s %4d/%-4d %10.1f  %s\n", row.name.c_str(), row.agree, row.positions,
                  row.tokens_per_second, first_line.c_str());
    }
    return absl::OkStatus();
  }
  TransformerOptions options;
  options.page_tokens = flags.page_tokens;
  if (flags.streaming) options.policy = StreamingLlmPolicy(flags.sink, flags.recent);
  absl::StatusOr<std::unique_ptr<Transformer>> transformer =
      Transformer::Create(&*checkpoint, backend.get(), options);
  if (!transformer.ok()) return transformer.status();

  SamplerOptions sampler_options;
  sampler_options.temperature = flags.temperature;
  sampler_options.top_p = flags.top_p;
  // run.c: seed 0 means the current time; a negative seed wraps to unsigned, as in run.c.
  sampler_options.seed = flags.seed != 0
                             ? static_cast<uint64_t>(flags.seed)
                             : static_cast<uint64_t>(static_cast<unsigned>(time(nullptr)));
  Sampler sampler(sampler_options);

  absl::StatusOr<GenerationResult> result = Generate(
      **transformer, *tokenizer, sampler, flags.prompt, flags.steps, [](std::string_view piece) {
        std::fwrite(piece.data(), 1, piece.size(), stdout);
        std::fflush(stdout);
      });
  if (!result.ok()) return result.status();
  std::printf("\n");
  std::fflush(stdout);  // The stats below go to stderr; keep the text first.
  const std::string policy =
      flags.streaming ? absl::StrCat("StreamingLLM sink ", flags.sink, " recent ", flags.recent)
                      : std::string("full cache");
  const std::string where =
      flags.target.empty() ? std::string("embedded engine") : "daemon " + flags.target;
  std::fprintf(stderr, "achieved tok/s: %f (%d positions, seed %llu, %s, page_tokens %d, %s)\n",
               result->tokens_per_second, result->positions,
               static_cast<unsigned long long>(sampler_options.seed), policy.c_str(),
               flags.page_tokens, where.c_str());
  absl::StatusOr<std::string> stats = backend->DescribeStats((*transformer)->sequence());
  if (!stats.ok()) return stats.status();
  std::fprintf(stderr, "%s\n", stats->c_str());
  return absl::OkStatus();
}

}  // namespace
}  // namespace headwise::llama2

int main(int argc, char** argv) {
  headwise::llama2::Flags flags;
  if (absl::Status s = headwise::llama2::ParseFlags(argc, argv, flags); !s.ok()) {
    std::fprintf(stderr, "%s\n%s", std::string(s.message()).c_str(), headwise::llama2::kUsage);
    return 2;
  }
  if (absl::Status s = headwise::llama2::Run(flags); !s.ok()) {
    std::fprintf(stderr, "headwise_llama2: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
