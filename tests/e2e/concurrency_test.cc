// 16 client threads drive 16 sequences of one daemon for a bounded time: no call fails, no
// append is lost (final lengths and a final attend equal an engine fed the same appends).
#include <atomic>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/e2e/daemon_process.h"
#include "tests/e2e/e2e_helpers.h"

namespace headwise::testing {
namespace {

using client::AttendOutput;
using client::Client;
using client::Sequence;

struct Appended {
  int layer;
  int tokens;
  std::vector<std::byte> k, v;
};

TEST(ConcurrencyTest, SixteenThreadsSixteenSequencesLoseNothing) {
  constexpr int kThreads = 16;
  constexpr int kMaxTokens = 8192;  // Per sequence (8 MiB), so memory stays bounded.
  const absl::Duration kRunFor = absl::Seconds(3);
  const ModelLayout layout = TestLayout();

  TempDir dir;
  DaemonOptions options;
  options.work_dir = dir.path();
  options.config_textproto = "worker_threads: 8\n";
  absl::StatusOr<std::unique_ptr<DaemonProcess>> daemon = DaemonProcess::Start(options);
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  // One client shared by all threads (Client is thread-safe).
  absl::StatusOr<std::unique_ptr<Client>> client = (*daemon)->Connect("");
  ASSERT_TRUE(client.ok()) << client.status();
  ASSERT_TRUE((*client)->RegisterLayout(kLayoutName, layout).ok());

  std::vector<Sequence> seqs(kThreads);
  std::vector<std::vector<Appended>> logs(kThreads);
  std::vector<std::string> errors(kThreads);
  std::atomic<int64_t> calls{0};
  const absl::Time stop_at = absl::Now() + kRunFor;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(1000 + t);
      absl::StatusOr<Sequence> seq =
          (*client)->CreateSequence(kLayoutName, v1::PolicySpec(), /*durable=*/false);
      if (!seq.ok()) {
        errors[t] = seq.status().ToString();
        return;
      }
      seqs[t] = *seq;
      int64_t length = 0;
      std::uniform_int_distribution<int> chunk(1, 40);
      while (absl::Now() < stop_at && length < kMaxTokens) {
        const int tokens = chunk(rng);
        for (int layer = 0; layer < layout.num_layers; ++layer) {
          Appended a{layer, tokens, RandomKv(rng, layout, tokens), RandomKv(rng, layout, tokens)};
          absl::StatusOr<int64_t> got = (*client)->Append(*seq, layer, a.k, a.v, tokens);
          calls.fetch_add(1, std::memory_order_relaxed);
          if (!got.ok()) {
            errors[t] = got.status().ToString();
            return;
          }
          if (*got != length + tokens) {
            errors[t] = "append returned length " + std::to_string(*got);
            return;
          }
          logs[t].push_back(std::move(a));
        }
        length += tokens;
        // Interleave reads with the writes.
        absl::StatusOr<AttendOutput> out =
            (*client)->Attend(*seq, tokens % 2, RandomQ(rng, layout));
        calls.fetch_add(1, std::memory_order_relaxed);
        if (!out.ok()) {
          errors[t] = out.status().ToString();
          return;
        }
      }
    });
  }
  for (std::thread& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) ASSERT_EQ(errors[t], "") << "thread " << t;
  EXPECT_GT(calls.load(), 16 * 10) << "too few calls to mean anything";

  // Replay each log into the engine; compare lengths and one attend per layer.
  std::unique_ptr<Engine> engine = NewReferenceEngine(layout);
  ASSERT_NE(engine, nullptr);
  std::mt19937 rng(7);
  for (int t = 0; t < kThreads; ++t) {
    absl::StatusOr<SequenceId> ref = engine->CreateSequence(kLayoutName, v1::PolicySpec());
    ASSERT_TRUE(ref.ok());
    for (const Appended& a : logs[t])
      EngineAppend(*engine, *ref, layout, a.layer, a.k, a.v, a.tokens);
    absl::StatusOr<v1::SequenceInfo> info = (*client)->GetSequence(seqs[t]);
    ASSERT_TRUE(info.ok()) << info.status();
    const std::vector<int64_t> lengths(info->layer_lengths().begin(), info->layer_lengths().end());
    EXPECT_EQ(lengths, engine->GetSequenceStats(*ref)->layer_lengths) << "thread " << t;
    for (int layer = 0; layer < layout.num_layers; ++layer) {
      const std::vector<float> q = RandomQ(rng, layout);
      absl::StatusOr<AttendOutput> got = (*client)->Attend(seqs[t], layer, q);
      ASSERT_TRUE(got.ok()) << got.status();
      const AttendOutput want = EngineAttend(*engine, *ref, layout, layer, q);
      EXPECT_LE(MaxRelDiff(got->o, want.o), 1e-5) << "thread " << t << " layer " << layer;
      EXPECT_LE(MaxRelDiff(got->lse, want.lse), 1e-5) << "thread " << t << " layer " << layer;
    }
  }
  absl::StatusOr<std::vector<v1::SequenceInfo>> list = (*client)->ListSequences();
  ASSERT_TRUE(list.ok());
  EXPECT_EQ(list->size(), static_cast<size_t>(kThreads));
  EXPECT_TRUE((*daemon)->Running());
}

}  // namespace
}  // namespace headwise::testing
