// A real headwised answers every data call exactly like the in-process engine fed the same
// operations: inline and staged payloads, prefill, fused decode steps, the decode stream, fork
// and truncate.
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "tests/e2e/daemon_process.h"
#include "tests/e2e/e2e_helpers.h"

namespace headwise::testing {
namespace {

using client::AttendOutput;
using client::Client;
using client::Sequence;
using client::StagedOutput;
using client::StagingRegion;

// The daemon runs the same kernels over the same page layout; allow only float noise.
constexpr double kTolerance = 1e-5;

class ParityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    DaemonOptions options;
    options.work_dir = dir_.path();
    absl::StatusOr<std::unique_ptr<DaemonProcess>> daemon = DaemonProcess::Start(options);
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    daemon_ = *std::move(daemon);
    absl::StatusOr<std::unique_ptr<Client>> c = daemon_->Connect("");
    ASSERT_TRUE(c.ok()) << c.status();
    client_ = *std::move(c);
    ASSERT_TRUE(client_->RegisterLayout(kLayoutName, layout_).ok());
    engine_ = NewReferenceEngine(layout_);
    ASSERT_NE(engine_, nullptr);
  }

  // Appends `tokens` random tokens to every layer of both.
  void AppendBoth(const Sequence& seq, const SequenceId& ref, int tokens) {
    for (int layer = 0; layer < layout_.num_layers; ++layer) {
      const auto k = RandomKv(rng_, layout_, tokens);
      const auto v = RandomKv(rng_, layout_, tokens);
      absl::StatusOr<int64_t> length = client_->Append(seq, layer, k, v, tokens);
      ASSERT_TRUE(length.ok()) << length.status();
      EngineAppend(*engine_, ref, layout_, layer, k, v, tokens);
      EXPECT_EQ(*length, engine_->GetSequenceStats(ref)->layer_lengths[layer]);
    }
  }

  void ExpectAttendEqual(const Sequence& seq, const SequenceId& ref) {
    for (int layer = 0; layer < layout_.num_layers; ++layer) {
      const std::vector<float> q = RandomQ(rng_, layout_);
      absl::StatusOr<AttendOutput> got = client_->Attend(seq, layer, q);
      ASSERT_TRUE(got.ok()) << got.status();
      const AttendOutput want = EngineAttend(*engine_, ref, layout_, layer, q);
      EXPECT_LE(MaxRelDiff(got->o, want.o), kTolerance) << "layer " << layer;
      EXPECT_LE(MaxRelDiff(got->lse, want.lse), kTolerance) << "layer " << layer;
    }
  }

  std::vector<float> ReadFloats(const StagingRegion& region, uint64_t offset, size_t count) {
    std::vector<float> out(count);
    std::memcpy(out.data(), region.data() + offset, count * sizeof(float));
    return out;
  }

  TempDir dir_;
  ModelLayout layout_ = TestLayout();
  std::mt19937 rng_{20240611};
  std::unique_ptr<DaemonProcess> daemon_;
  std::unique_ptr<Client> client_;
  std::unique_ptr<Engine> engine_;
};

TEST_F(ParityTest, InlineAppendAttendPrefillDecodeMatchEngine) {
  absl::StatusOr<Sequence> seq = client_->CreateSequence(kLayoutName, v1::PolicySpec(), false);
  ASSERT_TRUE(seq.ok()) << seq.status();
  EXPECT_EQ(seq->handle().size(), 32u);
  absl::StatusOr<SequenceId> ref = engine_->CreateSequence(kLayoutName, v1::PolicySpec());
  ASSERT_TRUE(ref.ok());

  AppendBoth(*seq, *ref, 37);  // Ends inside a page.
  ExpectAttendEqual(*seq, *ref);

  // Prefill of a 20-token chunk over the 37 cached tokens.
  for (int layer = 0; layer < layout_.num_layers; ++layer) {
    constexpr int kChunk = 20;
    const std::vector<float> q = RandomQ(rng_, layout_, kChunk);
    const auto k = RandomKv(rng_, layout_, kChunk);
    const auto v = RandomKv(rng_, layout_, kChunk);
    absl::StatusOr<AttendOutput> got = client_->Prefill(*seq, layer, q, k, v, kChunk);
    ASSERT_TRUE(got.ok()) << got.status();
    AttendOutput want;
    want.o.resize(q.size());
    want.lse.resize(static_cast<size_t>(kChunk) * layout_.num_q_heads);
    ASSERT_TRUE(engine_
                    ->Prefill(*ref, LayerId(layer), q, k, v, kChunk, layout_.dtype,
                              absl::MakeSpan(want.o), absl::MakeSpan(want.lse))
                    .ok());
    EXPECT_LE(MaxRelDiff(got->o, want.o), kTolerance);
    EXPECT_LE(MaxRelDiff(got->lse, want.lse), kTolerance);
  }

  // Fused decode steps, layer by layer.
  for (int step = 0; step < 3; ++step) {
    for (int layer = 0; layer < layout_.num_layers; ++layer) {
      const std::vector<float> q = RandomQ(rng_, layout_);
      const auto k = RandomKv(rng_, layout_, 1);
      const auto v = RandomKv(rng_, layout_, 1);
      absl::StatusOr<AttendOutput> got = client_->DecodeStep(*seq, layer, q, k, v);
      ASSERT_TRUE(got.ok()) << got.status();
      EngineAppend(*engine_, *ref, layout_, layer, k, v, 1);
      const AttendOutput want = EngineAttend(*engine_, *ref, layout_, layer, q);
      EXPECT_EQ(got->layer_length, 37 + 20 + step + 1);
      EXPECT_LE(MaxRelDiff(got->o, want.o), kTolerance);
      EXPECT_LE(MaxRelDiff(got->lse, want.lse), kTolerance);
    }
  }

  // The decode stream: one step per layer on one stream.
  absl::StatusOr<std::unique_ptr<client::DecodeStream>> stream = client_->OpenDecodeStream(*seq);
  ASSERT_TRUE(stream.ok()) << stream.status();
  for (int step = 0; step < 4; ++step) {
    for (int layer = 0; layer < layout_.num_layers; ++layer) {
      const std::vector<float> q = RandomQ(rng_, layout_);
      const auto k = RandomKv(rng_, layout_, 1);
      const auto v = RandomKv(rng_, layout_, 1);
      absl::StatusOr<AttendOutput> got = (*stream)->Step(layer, q, k, v);
      ASSERT_TRUE(got.ok()) << got.status();
      EngineAppend(*engine_, *ref, layout_, layer, k, v, 1);
      const AttendOutput want = EngineAttend(*engine_, *ref, layout_, layer, q);
      EXPECT_LE(MaxRelDiff(got->o, want.o), kTolerance);
      EXPECT_LE(MaxRelDiff(got->lse, want.lse), kTolerance);
    }
  }
  EXPECT_TRUE((*stream)->Finish().ok());

  absl::StatusOr<v1::SequenceInfo> info = client_->GetSequence(*seq);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->handle(), seq->handle());
  EXPECT_EQ(info->layout_name(), kLayoutName);
  const std::vector<int64_t> lengths(info->layer_lengths().begin(), info->layer_lengths().end());
  EXPECT_EQ(lengths, engine_->GetSequenceStats(*ref)->layer_lengths);
  EXPECT_EQ(lengths, std::vector<int64_t>(2, 37 + 20 + 3 + 4));
  EXPECT_TRUE(client_->Release(*seq).ok());
}

TEST_F(ParityTest, StagedPayloadsMatchInline) {
  absl::StatusOr<Sequence> seq = client_->CreateSequence(kLayoutName, v1::PolicySpec(), false);
  ASSERT_TRUE(seq.ok()) << seq.status();
  absl::StatusOr<SequenceId> ref = engine_->CreateSequence(kLayoutName, v1::PolicySpec());
  ASSERT_TRUE(ref.ok());
  absl::StatusOr<StagingRegion> region = client_->OpenStaging(1 << 20);
  ASSERT_TRUE(region.ok()) << region.status();
  EXPECT_GE(region->size(), uint64_t{1} << 20);

  // Staged appends: k at 0, v right after.
  constexpr int kTokens = 70;
  for (int layer = 0; layer < layout_.num_layers; ++layer) {
    const auto k = RandomKv(rng_, layout_, kTokens);
    const auto v = RandomKv(rng_, layout_, kTokens);
    std::memcpy(region->data(), k.data(), k.size());
    std::memcpy(region->data() + k.size(), v.data(), v.size());
    absl::StatusOr<int64_t> length = client_->Append(*seq, layer, *region, 0, k.size(), kTokens);
    ASSERT_TRUE(length.ok()) << length.status();
    EXPECT_EQ(*length, kTokens);
    EngineAppend(*engine_, *ref, layout_, layer, k, v, kTokens);
  }

  // Staged attend: q at 4096, outputs at 65536.
  const size_t q_count = static_cast<size_t>(layout_.num_q_heads) * layout_.head_dim;
  for (int layer = 0; layer < layout_.num_layers; ++layer) {
    const std::vector<float> q = RandomQ(rng_, layout_);
    std::memcpy(region->data() + 4096, q.data(), q.size() * sizeof(float));
    absl::StatusOr<StagedOutput> out = client_->Attend(*seq, layer, *region, 4096, 65536);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(out->o_offset, 65536u);
    EXPECT_EQ(out->lse_offset, 65536u + q_count * sizeof(float));
    const AttendOutput want = EngineAttend(*engine_, *ref, layout_, layer, q);
    EXPECT_LE(MaxRelDiff(ReadFloats(*region, out->o_offset, q_count), want.o), kTolerance);
    EXPECT_LE(MaxRelDiff(ReadFloats(*region, out->lse_offset, layout_.num_q_heads), want.lse),
              kTolerance);
  }

  // Staged decode steps, unary and on a stream.
  absl::StatusOr<std::unique_ptr<client::DecodeStream>> stream = client_->OpenDecodeStream(*seq);
  ASSERT_TRUE(stream.ok()) << stream.status();
  for (int step = 0; step < 4; ++step) {
    for (int layer = 0; layer < layout_.num_layers; ++layer) {
      const std::vector<float> q = RandomQ(rng_, layout_);
      const auto k = RandomKv(rng_, layout_, 1);
      const auto v = RandomKv(rng_, layout_, 1);
      std::memcpy(region->data() + 8192, q.data(), q.size() * sizeof(float));
      std::memcpy(region->data() + 16384, k.data(), k.size());
      std::memcpy(region->data() + 20480, v.data(), v.size());
      absl::StatusOr<StagedOutput> out =
          step % 2 == 0 ? client_->DecodeStep(*seq, layer, *region, 8192, 16384, 20480, 131072)
                        : (*stream)->Step(layer, *region, 8192, 16384, 20480, 131072);
      ASSERT_TRUE(out.ok()) << out.status();
      EXPECT_EQ(out->layer_length, kTokens + step + 1);
      EngineAppend(*engine_, *ref, layout_, layer, k, v, 1);
      const AttendOutput want = EngineAttend(*engine_, *ref, layout_, layer, q);
      EXPECT_LE(MaxRelDiff(ReadFloats(*region, out->o_offset, q_count), want.o), kTolerance);
      EXPECT_LE(MaxRelDiff(ReadFloats(*region, out->lse_offset, layout_.num_q_heads), want.lse),
                kTolerance);
    }
  }
  EXPECT_TRUE((*stream)->Finish().ok());
  ExpectAttendEqual(*seq, *ref);
  EXPECT_TRUE(region->Close().ok());
}

TEST_F(ParityTest, ForkAndTruncateMatchEngine) {
  absl::StatusOr<Sequence> parent = client_->CreateSequence(kLayoutName, v1::PolicySpec(), false);
  ASSERT_TRUE(parent.ok()) << parent.status();
  absl::StatusOr<SequenceId> ref_parent = engine_->CreateSequence(kLayoutName, v1::PolicySpec());
  ASSERT_TRUE(ref_parent.ok());
  AppendBoth(*parent, *ref_parent, 45);

  absl::StatusOr<Sequence> child = client_->Fork(*parent);
  ASSERT_TRUE(child.ok()) << child.status();
  EXPECT_NE(child->handle(), parent->handle());
  absl::StatusOr<SequenceId> ref_child = engine_->Fork(*ref_parent);
  ASSERT_TRUE(ref_child.ok());

  AppendBoth(*child, *ref_child, 10);  // Writes into the shared tail page: copy on write.
  AppendBoth(*parent, *ref_parent, 3);
  ExpectAttendEqual(*parent, *ref_parent);
  ExpectAttendEqual(*child, *ref_child);

  ASSERT_TRUE(client_->Truncate(*parent, 20).ok());
  ASSERT_TRUE(engine_->Truncate(*ref_parent, 20).ok());
  ExpectAttendEqual(*parent, *ref_parent);
  ExpectAttendEqual(*child, *ref_child);
  absl::StatusOr<v1::SequenceInfo> info = client_->GetSequence(*parent);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->layer_lengths(0), 20);

  absl::StatusOr<std::vector<v1::SequenceInfo>> list = client_->ListSequences();
  ASSERT_TRUE(list.ok()) << list.status();
  EXPECT_EQ(list->size(), 2u);
}

}  // namespace
}  // namespace headwise::testing
