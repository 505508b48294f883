// Shared pieces of the end-to-end suites: the test layout, random tensors (never zeros) and an
// in-process Engine (cachesvc/engine.h) that mirrors what the daemon was asked to do, so the
// daemon's answers can be compared with the engine's.
#ifndef HEADWISE_TESTS_E2E_E2E_HELPERS_H_
#define HEADWISE_TESTS_E2E_E2E_HELPERS_H_

#include <sys/wait.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cachesvc/base/dtype.h"
#include "cachesvc/base/layout.h"
#include "cachesvc/engine.h"
#include "clients/cpp/client.h"
#include "gtest/gtest.h"

namespace headwise::testing {

inline constexpr char kLayoutName[] = "e2e";

// 2 layers, GQA 8 query heads over 2 KV heads, head_dim 64, f16, 16-token pages.
inline ModelLayout TestLayout() {
  ModelLayout layout;
  layout.num_layers = 2;
  layout.num_q_heads = 8;
  layout.num_kv_heads = 2;
  layout.head_dim = 64;
  layout.dtype = DType::kF16;
  layout.page_tokens = 16;
  return layout;
}

// [tokens][num_kv_heads][head_dim] of U(-1, 1) in the layout dtype, no element exactly zero.
inline std::vector<std::byte> RandomKv(std::mt19937& rng, const ModelLayout& layout, int tokens) {
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  const size_t n = static_cast<size_t>(tokens) * layout.num_kv_heads * layout.head_dim;
  std::vector<std::byte> out(n * DTypeSize(layout.dtype));
  for (size_t i = 0; i < n; ++i) {
    float x = dist(rng);
    if (x == 0.0f) x = 0.5f;
    StoreFromFloat(out.data(), layout.dtype, i, x);
  }
  return out;
}

// [rows][num_q_heads][head_dim] f32 of U(-2, 2).
inline std::vector<float> RandomQ(std::mt19937& rng, const ModelLayout& layout, int rows = 1) {
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  std::vector<float> q(static_cast<size_t>(rows) * layout.num_q_heads * layout.head_dim);
  for (float& x : q) {
    x = dist(rng);
    if (x == 0.0f) x = 0.25f;
  }
  return q;
}

// An in-process engine with the test layout registered under kLayoutName.
inline std::unique_ptr<Engine> NewReferenceEngine(const ModelLayout& layout) {
  EngineOptions options;
  options.device_budget_bytes = uint64_t{256} << 20;
  options.host_budget_bytes = uint64_t{256} << 20;
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(options);
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return nullptr;
  EXPECT_TRUE((*engine)->RegisterLayout(kLayoutName, layout).ok());
  return *std::move(engine);
}

// The engine's Attend as the client's AttendOutput.
inline client::AttendOutput EngineAttend(Engine& engine, const SequenceId& seq,
                                         const ModelLayout& layout, int layer,
                                         const std::vector<float>& q) {
  client::AttendOutput out;
  out.o.resize(static_cast<size_t>(layout.num_q_heads) * layout.head_dim);
  out.lse.resize(layout.num_q_heads);
  const absl::Status status =
      engine.Attend(seq, LayerId(layer), q, absl::MakeSpan(out.o), absl::MakeSpan(out.lse));
  EXPECT_TRUE(status.ok()) << status;
  return out;
}

inline void EngineAppend(Engine& engine, const SequenceId& seq, const ModelLayout& layout,
                         int layer, const std::vector<std::byte>& k,
                         const std::vector<std::byte>& v, int tokens) {
  const absl::Status status = engine.Append(seq, LayerId(layer), k, v, tokens, layout.dtype);
  ASSERT_TRUE(status.ok()) << status;
}

// What a shell command printed on stdout, and its exit code (-1 when it could not run or did not
// exit normally).
struct CommandResult {
  int exit_code = -1;
  std::string out;
};

// Runs `command` through the shell with stdout captured (redirect stderr in `command` to get it).
inline CommandResult RunCommand(const std::string& command) {
  CommandResult result;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return result;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) result.out.append(buffer, n);
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

}  // namespace headwise::testing

#endif  // HEADWISE_TESTS_E2E_E2E_HELPERS_H_
