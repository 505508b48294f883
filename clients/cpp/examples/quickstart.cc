// headwise_client_example: connects to a running headwised, registers a small layout, creates a
// sequence, appends random K/V to every layer, attends one random query per layer and prints
// the outputs' first values and the daemon's stats. docs/client.md walks through it.
//
//   headwise_client_example [target [token]]
// Defaults: unix://./var/headwised.sock and $HEADWISE_TOKEN or dev-token.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/random/random.h"
#include "absl/status/status.h"
#include "cachesvc/base/dtype.h"
#include "cachesvc/base/layout.h"
#include "cachesvc/base/status_macros.h"
#include "clients/cpp/client.h"

namespace {

using headwise::client::Client;
using headwise::client::ClientOptions;

// `count` random values in [-1, 1) stored as `dtype`.
std::vector<std::byte> RandomTensor(absl::BitGen& gen, headwise::DType dtype, size_t count) {
  std::vector<std::byte> bytes(count * headwise::DTypeSize(dtype));
  for (size_t i = 0; i < count; ++i) {
    headwise::StoreFromFloat(bytes.data(), dtype, i, absl::Uniform(gen, -1.0f, 1.0f));
  }
  return bytes;
}

absl::Status Run(const ClientOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<Client> client, Client::Connect(options));
  ASSIGN_OR_RETURN(headwise::v1::HealthResponse health, client->Health());
  std::printf("connected to %s: %s, version %s\n", options.target.c_str(), health.status().c_str(),
              health.version().c_str());

  // A small GQA model: 2 layers, 8 query heads sharing 2 KV heads of 64 dims, f16 pages.
  headwise::ModelLayout layout;
  layout.num_layers = 2;
  layout.num_q_heads = 8;
  layout.num_kv_heads = 2;
  layout.head_dim = 64;
  layout.dtype = headwise::DType::kF16;
  layout.page_tokens = 16;
  RETURN_IF_ERROR(client->RegisterLayout("quickstart", layout));
  ASSIGN_OR_RETURN(headwise::client::Sequence seq,
                   client->CreateSequence("quickstart", headwise::v1::PolicySpec(),
                                          /*durable=*/false));
  std::printf("sequence %s\n", seq.handle().c_str());

  // Appends advance every layer in step: 100 tokens to layer 0, then 100 to layer 1.
  absl::BitGen gen;
  constexpr int kTokens = 100;
  const size_t kv_count = static_cast<size_t>(kTokens) * layout.num_kv_heads * layout.head_dim;
  for (int layer = 0; layer < layout.num_layers; ++layer) {
    const std::vector<std::byte> k = RandomTensor(gen, layout.dtype, kv_count);
    const std::vector<std::byte> v = RandomTensor(gen, layout.dtype, kv_count);
    ASSIGN_OR_RETURN(int64_t length, client->Append(seq, layer, k, v, kTokens));
    std::printf("layer %d: %lld tokens\n", layer, static_cast<long long>(length));
  }

  for (int layer = 0; layer < layout.num_layers; ++layer) {
    std::vector<float> q(static_cast<size_t>(layout.num_q_heads) * layout.head_dim);
    for (float& x : q) x = absl::Uniform(gen, -1.0f, 1.0f);
    ASSIGN_OR_RETURN(headwise::client::AttendOutput out, client->Attend(seq, layer, q));
    std::printf("layer %d: o[0..3] = %.4f %.4f %.4f %.4f, lse[0] = %.4f\n", layer, out.o[0],
                out.o[1], out.o[2], out.o[3], out.lse[0]);
  }

  ASSIGN_OR_RETURN(headwise::v1::SequenceInfo info, client->GetSequence(seq));
  std::printf("sequence: %llu pages, %llu device bytes\n",
              static_cast<unsigned long long>(info.pages()),
              static_cast<unsigned long long>(info.device_bytes()));
  ASSIGN_OR_RETURN(headwise::v1::StatsResponse stats, client->Stats());
  for (const headwise::v1::TierStats& tier : stats.tiers()) {
    std::printf("tier %-6s used %llu of %llu bytes%s\n", tier.tier().c_str(),
                static_cast<unsigned long long>(tier.used_bytes()),
                static_cast<unsigned long long>(tier.budget_bytes()),
                tier.emulated() ? " (emulated)" : "");
  }
  std::printf("daemon: %llu sequences, %llu pages\n",
              static_cast<unsigned long long>(stats.sequences()),
              static_cast<unsigned long long>(stats.pages()));
  return client->Release(seq);
}

}  // namespace

int main(int argc, char** argv) {
  ClientOptions options;
  if (argc > 1) options.target = argv[1];
  if (argc > 2) {
    options.token = argv[2];
  } else if (const char* token = std::getenv("HEADWISE_TOKEN"); token != nullptr && *token) {
    options.token = token;
  }
  const absl::Status status = Run(options);
  if (!status.ok()) {
    std::fprintf(stderr, "headwise_client_example: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
