// kill -9 during a stream of durable appends: after a restart on the same data dir every
// acknowledged append is there (lengths and attention equal an engine fed exactly those appends,
// plus at most the one append that was in flight), non-durable sequences are gone, the client
// reconnects by itself, and after a clean restart and shutdown /dev/shm holds nothing of the
// killed daemon's staging regions.
#include <signal.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
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
  int layer = 0;
  int tokens = 0;
  std::vector<std::byte> k, v;
};

TEST(CrashTest, KillNineKeepsEveryAcknowledgedDurableAppend) {
  const ModelLayout layout = TestLayout();
  TempDir dir;
  DaemonOptions options;
  options.work_dir = dir.path();
  absl::StatusOr<std::unique_ptr<DaemonProcess>> first = DaemonProcess::Start(options);
  ASSERT_TRUE(first.ok()) << first.status();
  const pid_t killed_pid = (*first)->pid();

  absl::StatusOr<std::unique_ptr<Client>> client = (*first)->Connect("");
  ASSERT_TRUE(client.ok()) << client.status();
  ASSERT_TRUE((*client)->RegisterLayout(kLayoutName, layout).ok());
  absl::StatusOr<Sequence> durable =
      (*client)->CreateSequence(kLayoutName, v1::PolicySpec(), /*durable=*/true);
  ASSERT_TRUE(durable.ok()) << durable.status();
  absl::StatusOr<Sequence> volatile_seq =
      (*client)->CreateSequence(kLayoutName, v1::PolicySpec(), /*durable=*/false);
  ASSERT_TRUE(volatile_seq.ok()) << volatile_seq.status();
  std::mt19937 rng(4242);
  for (int layer = 0; layer < layout.num_layers; ++layer) {
    ASSERT_TRUE(
        (*client)
            ->Append(*volatile_seq, layer, RandomKv(rng, layout, 30), RandomKv(rng, layout, 30), 30)
            .ok());
  }
  // A staging region the killed daemon will never get to unlink.
  absl::StatusOr<client::StagingRegion> region = (*client)->OpenStaging(1 << 16);
  ASSERT_TRUE(region.ok()) << region.status();
  const std::string killed_prefix = absl::StrCat("headwise-", killed_pid, "-");
  // Whatever the daemons leave in /dev/shm, test runs must not pile it up.
  absl::Cleanup unlink_leftovers = [killed_prefix] {
    for (const std::string& name : ShmNames(killed_prefix)) shm_unlink(("/" + name).c_str());
  };
  EXPECT_FALSE(ShmNames(killed_prefix).empty())
      << "staging names changed? expected " << killed_prefix << "*";

  // The writer appends step after step until a call fails (the kill).
  std::vector<Appended> acked;
  std::optional<Appended> in_flight;
  absl::Status writer_error;
  std::atomic<int> acked_count{0};
  std::thread writer([&] {
    std::mt19937 wrng(777);
    std::uniform_int_distribution<int> chunk(1, 24);
    while (true) {
      const int tokens = chunk(wrng);
      for (int layer = 0; layer < layout.num_layers; ++layer) {
        Appended a{layer, tokens, RandomKv(wrng, layout, tokens), RandomKv(wrng, layout, tokens)};
        in_flight = a;
        absl::StatusOr<int64_t> length = (*client)->Append(*durable, layer, a.k, a.v, tokens);
        if (!length.ok()) {
          writer_error = length.status();
          return;
        }
        in_flight.reset();
        acked.push_back(std::move(a));
        acked_count.fetch_add(1);
      }
    }
  });
  const absl::Time give_up = absl::Now() + absl::Seconds(20);
  while (acked_count.load() < 40 && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(5));
  (*first)->Kill9();
  writer.join();
  ASSERT_GE(acked.size(), 40u) << "the writer was too slow: " << writer_error;
  EXPECT_FALSE(writer_error.ok());
  // The mapping of the killed daemon's region stays valid in this process; only the name leaks.
  region->bytes()[0] = std::byte{1};

  // Restart on the same data dir (and the same socket path).
  absl::StatusOr<std::unique_ptr<DaemonProcess>> second = DaemonProcess::Start(options);
  ASSERT_TRUE(second.ok()) << second.status();

  // The old client reconnects by itself for idempotent calls.
  absl::StatusOr<v1::SequenceInfo> info = (*client)->GetSequence(*durable);
  ASSERT_TRUE(info.ok()) << info.status() << "\n" << (*second)->LogTail();
  std::vector<int64_t> want_lengths(layout.num_layers, 0);
  for (const Appended& a : acked) want_lengths[a.layer] += a.tokens;
  std::vector<int64_t> got_lengths(info->layer_lengths().begin(), info->layer_lengths().end());
  if (got_lengths != want_lengths && in_flight.has_value()) {
    // The append in flight at the kill may have reached the log without being acknowledged.
    want_lengths[in_flight->layer] += in_flight->tokens;
    if (got_lengths == want_lengths) acked.push_back(*in_flight);
  }
  ASSERT_EQ(got_lengths, want_lengths) << acked.size() << " acknowledged appends";

  std::unique_ptr<Engine> engine = NewReferenceEngine(layout);
  ASSERT_NE(engine, nullptr);
  absl::StatusOr<SequenceId> ref = engine->CreateSequence(kLayoutName, v1::PolicySpec());
  ASSERT_TRUE(ref.ok());
  for (const Appended& a : acked) EngineAppend(*engine, *ref, layout, a.layer, a.k, a.v, a.tokens);
  for (int layer = 0; layer < layout.num_layers; ++layer) {
    const std::vector<float> q = RandomQ(rng, layout);
    absl::StatusOr<AttendOutput> got = (*client)->Attend(*durable, layer, q);
    ASSERT_TRUE(got.ok()) << got.status();
    const AttendOutput want = EngineAttend(*engine, *ref, layout, layer, q);
    EXPECT_LE(MaxRelDiff(got->o, want.o), 1e-5) << "layer " << layer;
    EXPECT_LE(MaxRelDiff(got->lse, want.lse), 1e-5) << "layer " << layer;
  }

  // The non-durable sequence died with the daemon; the durable one is all the tenant has.
  EXPECT_EQ((*client)->GetSequence(*volatile_seq).status().code(), absl::StatusCode::kNotFound);
  absl::StatusOr<std::vector<v1::SequenceInfo>> list = (*client)->ListSequences();
  ASSERT_TRUE(list.ok()) << list.status();
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].handle(), durable->handle());
  EXPECT_TRUE((*list)[0].durable());

  // The restored sequence keeps working: finish the step the kill interrupted (lagging layers
  // catch up), then one more step of 3 tokens on every layer.
  const int64_t longest = *std::max_element(got_lengths.begin(), got_lengths.end());
  for (int round = 0; round < 2; ++round) {
    for (int layer = 0; layer < layout.num_layers; ++layer) {
      const int tokens = round == 0 ? static_cast<int>(longest - got_lengths[layer]) : 3;
      if (tokens == 0) continue;
      const auto k = RandomKv(rng, layout, tokens);
      const auto v = RandomKv(rng, layout, tokens);
      absl::StatusOr<int64_t> length = (*client)->Append(*durable, layer, k, v, tokens);
      ASSERT_TRUE(length.ok()) << length.status();
      EXPECT_EQ(*length, longest + 3 * round);
      EngineAppend(*engine, *ref, layout, layer, k, v, tokens);
    }
  }
  const std::vector<float> q = RandomQ(rng, layout);
  absl::StatusOr<AttendOutput> got = (*client)->Attend(*durable, 1, q);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_LE(MaxRelDiff(got->o, EngineAttend(*engine, *ref, layout, 1, q).o), 1e-5);

  // A clean shutdown, then nothing of the killed daemon's staging regions is left in /dev/shm.
  region->Close().IgnoreError();  // Its id died with the first daemon; only unmaps here.
  absl::StatusOr<int> exit_status = (*second)->Terminate();
  ASSERT_TRUE(exit_status.ok()) << exit_status.status();
  EXPECT_EQ(*exit_status, 0) << (*second)->LogTail();
  EXPECT_TRUE(ShmNames(killed_prefix).empty())
      << "left behind in /dev/shm: " << ShmNames(killed_prefix)[0];
  EXPECT_TRUE(ShmNames(absl::StrCat("headwise-", (*second)->pid(), "-")).empty());
}

}  // namespace
}  // namespace headwise::testing
