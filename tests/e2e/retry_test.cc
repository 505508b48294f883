// Client step ids against a real daemon killed with -9 and restarted while a writer keeps
// stepping a durable sequence: the C++ client retries its in-flight Append / DecodeStep (same
// step id) until the new daemon answers, and the sequence ends with every step exactly once,
// whether or not the step in flight had reached the log before the kill.
#include <atomic>
#include <random>
#include <string>
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

// One acknowledged step: an Append of `tokens` tokens, or (q non-empty) a DecodeStep.
struct Step {
  int layer = 0;
  int tokens = 0;
  std::vector<std::byte> k, v;
  std::vector<float> q;
  AttendOutput out;
};

// Appends (even rounds, random chunks) and decode steps (odd rounds) on every layer, recording
// each acknowledged step; returns the first error.
absl::Status WriteSteps(Client& client, const Sequence& seq, const ModelLayout& layout, int rounds,
                        std::vector<Step>& acked, std::atomic<int>& acked_count) {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> chunk(1, 8);
  for (int round = 0; round < rounds; ++round) {
    const bool decode = round % 2 == 1;
    const int tokens = decode ? 1 : chunk(rng);
    for (int layer = 0; layer < layout.num_layers; ++layer) {
      Step step;
      step.layer = layer;
      step.tokens = tokens;
      step.k = RandomKv(rng, layout, tokens);
      step.v = RandomKv(rng, layout, tokens);
      if (decode) {
        step.q = RandomQ(rng, layout);
        absl::StatusOr<AttendOutput> out = client.DecodeStep(seq, layer, step.q, step.k, step.v);
        if (!out.ok()) return out.status();
        step.out = *std::move(out);
      } else {
        absl::StatusOr<int64_t> length = client.Append(seq, layer, step.k, step.v, tokens);
        if (!length.ok()) return length.status();
      }
      acked.push_back(std::move(step));
      acked_count.fetch_add(1);
    }
  }
  return absl::OkStatus();
}

TEST(RetryTest, StepsInFlightAcrossAKillNineApplyExactlyOnce) {
  const ModelLayout layout = TestLayout();
  TempDir dir;
  DaemonOptions options;
  options.work_dir = dir.path();
  auto first = DaemonProcess::Start(options);
  ASSERT_TRUE(first.ok()) << first.status();
  client::ClientOptions client_options = (*first)->ClientOptionsFor("e2e-token");
  client_options.reconnect_deadline = absl::Seconds(60);  // Covers the restart.
  auto connected = Client::Connect(client_options);
  ASSERT_TRUE(connected.ok()) << connected.status();
  std::unique_ptr<Client> client = *std::move(connected);
  ASSERT_TRUE(client->RegisterLayout(kLayoutName, layout).ok());
  auto created = client->CreateSequence(kLayoutName, v1::PolicySpec(), /*durable=*/true);
  ASSERT_TRUE(created.ok()) << created.status();
  const Sequence seq = *created;

  constexpr int kRounds = 60;
  std::vector<Step> acked;
  std::atomic<int> acked_count{0};
  absl::Status writer_error;
  std::thread writer(
      [&] { writer_error = WriteSteps(*client, seq, layout, kRounds, acked, acked_count); });
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  while (acked_count.load() < 30 && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(2));
  (*first)->Kill9();
  auto second = DaemonProcess::Start(options);  // Same socket and data dir.
  ASSERT_TRUE(second.ok()) << second.status();
  writer.join();
  ASSERT_TRUE(writer_error.ok()) << writer_error << "\n" << (*second)->LogTail();
  ASSERT_EQ(acked.size(), size_t{kRounds} * layout.num_layers);

  // Every step exactly once: the lengths and the outputs of an in-process engine fed the
  // acknowledged steps once each.
  absl::StatusOr<v1::SequenceInfo> info = client->GetSequence(seq);
  ASSERT_TRUE(info.ok()) << info.status();
  std::vector<int64_t> want_lengths(layout.num_layers, 0);
  for (const Step& step : acked) want_lengths[step.layer] += step.tokens;
  EXPECT_EQ(std::vector<int64_t>(info->layer_lengths().begin(), info->layer_lengths().end()),
            want_lengths);
  std::unique_ptr<Engine> engine = NewReferenceEngine(layout);
  ASSERT_NE(engine, nullptr);
  absl::StatusOr<SequenceId> ref = engine->CreateSequence(kLayoutName, v1::PolicySpec());
  ASSERT_TRUE(ref.ok());
  double worst = 0;
  for (const Step& step : acked) {
    EngineAppend(*engine, *ref, layout, step.layer, step.k, step.v, step.tokens);
    if (step.q.empty()) continue;
    const AttendOutput want = EngineAttend(*engine, *ref, layout, step.layer, step.q);
    worst = std::max({worst, MaxRelDiff(step.out.o, want.o), MaxRelDiff(step.out.lse, want.lse)});
  }
  EXPECT_LT(worst, 1e-5);
}

}  // namespace
}  // namespace headwise::testing
