#include "cachesvc/engine.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "cachesvc/base/cancellation.h"
#include "gtest/gtest.h"
#include "policies/eviction.h"
#include "policies/head_roles.h"
#include "policies/pattern_directory.h"
#include "tests/engine/engine_fixture.h"
#include "tests/engine/engine_test_base.h"

namespace headwise {
namespace {

using engine_testing::EngineTest;
using engine_testing::ExpectWithinBudgets;
using engine_testing::kTol;
using engine_testing::SmallLayout;
using engine_testing::Spec;
using engine_testing::TempDir;
using testing::KvChunk;
using testing::KvHistory;
using testing::MaxRelDiff;
using testing::MaxRelError;
using testing::RandomFloats;

TEST_F(EngineTest, DeviceOnlyMatchesReference) {
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(dtype));
    MakeEngine(EngineOptions{}, SmallLayout(dtype));
    auto seq = engine_->CreateSequence("small", Spec(headwise::v1::Placement::DEVICE_ONLY));
    ASSERT_TRUE(seq.ok()) << seq.status();
    KvHistory history(layout_);
    uint32_t seed = 1;
    for (int tokens : {1, 3, 4, 7, 1, 9}) {
      AppendStep(*seq, history, tokens, seed++);
      AttendAndCheck(*seq, history, seed++);
    }
    auto stats = engine_->GetSequenceStats(*seq);
    ASSERT_TRUE(stats.ok());
    EXPECT_EQ(stats->length, 25);
    EXPECT_EQ(stats->device_pages, 7 * layout_.num_kv_heads * layout_.num_layers);
    EXPECT_EQ(stats->host_pages, 0);
    EXPECT_TRUE(engine_->GetStats().device_emulated);
  }
}

TEST_F(EngineTest, OffloadModesMatchDeviceOnly) {
  EngineOptions options;
  options.device_budget_bytes = 1 << 20;
  MakeEngine(options, SmallLayout(DType::kF16));
  std::vector<std::vector<float>> outputs;
  for (auto mode : {headwise::v1::Placement::DEVICE_ONLY, headwise::v1::Placement::LAYER_OFFLOAD,
                    headwise::v1::Placement::HEAD_OFFLOAD}) {
    auto seq = engine_->CreateSequence("small", Spec(mode));
    ASSERT_TRUE(seq.ok());
    KvHistory history(layout_);
    std::vector<float> out;
    uint32_t seed = 100;
    for (int tokens : {5, 1, 8, 2}) {
      AppendStep(*seq, history, tokens, seed++);
      const std::vector<float> o = AttendAndCheck(*seq, history, seed++);
      out.insert(out.end(), o.begin(), o.end());
    }
    outputs.push_back(out);
    auto stats = engine_->GetSequenceStats(*seq);
    ASSERT_TRUE(stats.ok());
    if (mode == headwise::v1::Placement::DEVICE_ONLY) {
      EXPECT_EQ(stats->host_pages, 0);
    } else {
      EXPECT_EQ(stats->device_pages, 0);
      EXPECT_EQ(stats->host_pages, 4 * layout_.num_kv_heads * layout_.num_layers);
    }
  }
  EXPECT_LT(MaxRelDiff(outputs[1], outputs[0]), kTol);
  EXPECT_LT(MaxRelDiff(outputs[2], outputs[0]), kTol);
  const EngineStats stats = engine_->GetStats();
  // Two offloaded sequences staged every page of every layer at each of 4 attends.
  EXPECT_GT(stats.bytes_host_to_device, 0u);
  EXPECT_EQ(stats.bytes_host_to_device % layout_.page_bytes(), 0u);
  // Staging copies are released after each attend: what is left on the device is the
  // device_only sequence's pages plus at most the unused rest of one extent per head.
  const uint64_t pb = layout_.page_bytes();
  EXPECT_EQ(stats.device_pages, 4 * layout_.num_kv_heads * layout_.num_layers);
  EXPECT_GE(stats.device.used_bytes, stats.device_pages * pb);
  EXPECT_LE(stats.device.used_bytes,
            (stats.device_pages + uint64_t{15} * layout_.num_kv_heads * layout_.num_layers) * pb);
}

// A cancelled call (ScopedCancellation, as the daemon sets for a call whose client went away)
// stops a prefill before its append: CANCELLED, and the sequence is exactly as it was, in every
// placement. The same prefill without the flag then succeeds and matches the reference.
TEST_F(EngineTest, CancelledPrefillChangesNothing) {
  MakeEngine(EngineOptions{}, SmallLayout(DType::kF32));
  for (auto mode : {headwise::v1::Placement::DEVICE_ONLY, headwise::v1::Placement::LAYER_OFFLOAD,
                    headwise::v1::Placement::HEAD_OFFLOAD}) {
    SCOPED_TRACE(mode);
    auto seq = engine_->CreateSequence("small", Spec(mode));
    ASSERT_TRUE(seq.ok());
    KvHistory history(layout_);
    AppendStep(*seq, history, 5, 3);
    const int hq = layout_.num_q_heads, d = layout_.head_dim, chunk = 7;
    const KvChunk c = history.MakeChunk(chunk, 11);
    const std::vector<float> q = RandomFloats(int64_t{chunk} * hq * d, 12);
    std::vector<float> o(q.size()), lse(int64_t{chunk} * hq);
    const EngineStats before = engine_->GetStats();
    std::atomic<bool> cancelled{true};
    {
      ScopedCancellation scope(&cancelled);
      const absl::Status st = engine_->Prefill(*seq, LayerId(0), q, c.k, c.v, chunk, layout_.dtype,
                                               absl::MakeSpan(o), absl::MakeSpan(lse));
      EXPECT_EQ(st.code(), absl::StatusCode::kCancelled) << st;
    }
    auto info = engine_->GetSequenceStats(*seq);
    ASSERT_TRUE(info.ok());
    EXPECT_EQ(info->layer_lengths[0], 5);
    const EngineStats after = engine_->GetStats();
    EXPECT_EQ(after.device.used_bytes, before.device.used_bytes);
    EXPECT_EQ(after.host.used_bytes, before.host.used_bytes);
    ASSERT_TRUE(engine_
                    ->Prefill(*seq, LayerId(0), q, c.k, c.v, chunk, layout_.dtype,
                              absl::MakeSpan(o), absl::MakeSpan(lse))
                    .ok());
    history.Record(0, c);
    std::vector<double> ro, rlse;
    const std::vector<float> q_last(q.end() - int64_t{hq} * d, q.end());
    history.Reference(0, q_last, &ro, &rlse);
    EXPECT_LT(MaxRelError(o.data() + int64_t{chunk - 1} * hq * d, ro), kTol);
  }
}

TEST_F(EngineTest, PrefillMatchesCausalReferenceInEveryMode) {
  MakeEngine(EngineOptions{}, SmallLayout(DType::kF32));
  for (auto mode : {headwise::v1::Placement::DEVICE_ONLY, headwise::v1::Placement::LAYER_OFFLOAD,
                    headwise::v1::Placement::HEAD_OFFLOAD}) {
    SCOPED_TRACE(mode);
    auto seq = engine_->CreateSequence("small", Spec(mode));
    ASSERT_TRUE(seq.ok());
    KvHistory history(layout_);
    const int hq = layout_.num_q_heads, d = layout_.head_dim;
    uint32_t seed = 7;
    for (int chunk : {6, 5, 1}) {
      for (int l = 0; l < layout_.num_layers; ++l) {
        const KvChunk c = history.MakeChunk(chunk, seed++);
        const std::vector<float> q = RandomFloats(int64_t{chunk} * hq * d, seed++);
        std::vector<float> o(q.size()), lse(int64_t{chunk} * hq);
        const int64_t start = history.length(l);
        ASSERT_TRUE(engine_
                        ->Prefill(*seq, LayerId(l), q, c.k, c.v, chunk, layout_.dtype,
                                  absl::MakeSpan(o), absl::MakeSpan(lse))
                        .ok());
        history.Record(l, c);
        for (int t = 0; t < chunk; ++t) {
          std::vector<float> qt(q.begin() + int64_t{t} * hq * d,
                                q.begin() + int64_t{t + 1} * hq * d);
          std::vector<double> ro, rlse;
          history.Reference(l, qt, &ro, &rlse, [&](int, int64_t p) { return p <= start + t; });
          EXPECT_LT(MaxRelError(o.data() + int64_t{t} * hq * d, ro), kTol);
          EXPECT_LT(MaxRelError(lse.data() + int64_t{t} * hq, rlse), kTol);
        }
      }
    }
    AttendAndCheck(*seq, history, 99);
  }
}

TEST_F(EngineTest, HeadOffloadSpillsToDiskAndBackExactly) {
  const std::string dir = TempDir();
  EngineOptions options;
  options.disk_path = dir + "/db";
  options.extent_pages = 4;
  const ModelLayout layout = SmallLayout(DType::kF32);
  // 40 host pages for a sequence that needs 3 layers * 4 heads * 10 pages = 120.
  options.host_budget_bytes = 40 * layout.page_bytes();
  options.device_budget_bytes = 16 * layout.page_bytes();
  MakeEngine(options, layout);
  auto seq = engine_->CreateSequence("small", Spec(headwise::v1::Placement::HEAD_OFFLOAD));
  ASSERT_TRUE(seq.ok());
  KvHistory history(layout_);
  uint32_t seed = 3;
  for (int step = 0; step < 5; ++step) AppendStep(*seq, history, 8, seed++);
  EngineStats stats = engine_->GetStats();
  EXPECT_GT(stats.spilled_pages, 0);
  EXPECT_GT(stats.disk_pages, 0);
  EXPECT_GT(stats.bytes_host_to_disk, 0u);
  AttendAndCheck(*seq, history, 11);
  AttendAndCheck(*seq, history, 12);
  stats = engine_->GetStats();
  EXPECT_GT(stats.fetched_pages, 0);
  EXPECT_GT(stats.bytes_disk_to_host, 0u);
  auto ss = engine_->GetSequenceStats(*seq);
  ASSERT_TRUE(ss.ok());
  EXPECT_EQ(ss->host_pages + ss->disk_pages, 120);
  EXPECT_EQ(stats.host_pages + stats.disk_pages, 120);
  // Keep going after the round trip: appends and attends stay exact.
  AppendStep(*seq, history, 3, seed++);
  AttendAndCheck(*seq, history, 13);
  ASSERT_TRUE(engine_->Release(*seq).ok());
  stats = engine_->GetStats();
  EXPECT_EQ(stats.host_pages + stats.disk_pages + stats.device_pages, 0);
  EXPECT_EQ(stats.host.used_bytes, 0u);
  engine_.reset();
  std::filesystem::remove_all(dir);
}

// A head longer than the device pool (a 2^20-token Llama-3-8B head is 512 MiB) is attended in
// page ranges merged exactly; before, Attend failed with RESOURCE_EXHAUSTED.
TEST_F(EngineTest, HeadOffloadSplitsHeadsLongerThanTheDevice) {
  EngineOptions options;
  const ModelLayout layout = SmallLayout(DType::kF16);
  options.device_budget_bytes = 5 * layout.page_bytes();
  options.extent_pages = 4;
  MakeEngine(options, layout);
  for (int prefetch : {1, 0}) {
    SCOPED_TRACE(prefetch);
    headwise::v1::PolicySpec spec = Spec(headwise::v1::Placement::HEAD_OFFLOAD);
    spec.mutable_placement()->set_prefetch_depth(prefetch);
    auto seq = engine_->CreateSequence("small", spec);
    ASSERT_TRUE(seq.ok());
    KvHistory history(layout_);
    uint32_t seed = 40;
    int64_t pages = 0;
    for (int tokens : {3, 9, 7, 13, 1}) {
      AppendStep(*seq, history, tokens, seed++);
      pages = engine_->GetSequenceStats(*seq)->host_pages;
      const uint64_t before = engine_->GetStats().bytes_host_to_device;
      AttendAndCheck(*seq, history, seed++);
      // Every page is copied to the device exactly once per attend.
      EXPECT_EQ(engine_->GetStats().bytes_host_to_device - before,
                static_cast<uint64_t>(pages * layout_.page_bytes()));
    }
    EXPECT_EQ(pages, 3 * 4 * 9);  // 33 tokens: 9 pages per head, 5 fit on the device.
    EXPECT_LE(engine_->GetStats().device.peak_bytes, 5u * layout_.page_bytes());
    ASSERT_TRUE(engine_->Release(*seq).ok());
  }
}

TEST_F(EngineTest, HostFullWithoutDiskIsResourceExhaustedAndUnchanged) {
  EngineOptions options;
  const ModelLayout layout = SmallLayout(DType::kF32);
  options.host_budget_bytes = 20 * layout.page_bytes();
  MakeEngine(options, layout);
  auto seq = engine_->CreateSequence("small", Spec(headwise::v1::Placement::LAYER_OFFLOAD));
  ASSERT_TRUE(seq.ok());
  KvHistory history(layout_);
  AppendStep(*seq, history, 4, 1);            // 12 pages.
  const KvChunk c = history.MakeChunk(8, 2);  // Needs 8 more pages for layer 0: fits.
  ASSERT_TRUE(engine_->Append(*seq, LayerId(0), c.k, c.v, 8, layout_.dtype).ok());
  history.Record(0, c);
  const KvChunk c1 = history.MakeChunk(8, 3);  // 8 more for layer 1: does not.
  EXPECT_EQ(engine_->Append(*seq, LayerId(1), c1.k, c1.v, 8, layout_.dtype).code(),
            absl::StatusCode::kResourceExhausted);
  ExpectWithinBudgets(*engine_);
  auto ss = engine_->GetSequenceStats(*seq);
  ASSERT_TRUE(ss.ok());
  EXPECT_EQ(ss->layer_lengths, (std::vector<int64_t>{12, 4, 4}));
  AttendAndCheck(*seq, history, 5);
}

TEST_F(EngineTest, DeviceOnlyPastBudgetIsResourceExhaustedAndStillAttends) {
  EngineOptions options;
  const ModelLayout layout = SmallLayout(DType::kF32);
  options.device_budget_bytes = 30 * layout.page_bytes();
  MakeEngine(options, layout);
  auto seq = engine_->CreateSequence("small", Spec(headwise::v1::Placement::DEVICE_ONLY));
  ASSERT_TRUE(seq.ok());
  KvHistory history(layout_);
  AppendStep(*seq, history, 6, 1);  // 2 pages per head: 24 pages.
  const KvChunk c = history.MakeChunk(8, 9);
  const absl::Status st = engine_->Append(*seq, LayerId(0), c.k, c.v, 8, layout_.dtype);
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  ExpectWithinBudgets(*engine_);
  auto ss = engine_->GetSequenceStats(*seq);
  ASSERT_TRUE(ss.ok());
  EXPECT_EQ(ss->length, 6);
  EXPECT_EQ(ss->layer_lengths[0], 6);
  EXPECT_EQ(ss->device_pages, 24);
  AttendAndCheck(*seq, history, 2);
  // A smaller step still fits (2 tokens fill the partial tail pages).
  AppendStep(*seq, history, 2, 4);
  AttendAndCheck(*seq, history, 3);
}

// Layouts of different page sizes share one engine: each page size has its own pools and copy
// engine, and the pools of a tier together stay within the tier's budget.
TEST_F(EngineTest, TwoPageSizesShareOneEngineAndItsBudgets) {
  const ModelLayout a = SmallLayout(DType::kF32);  // 512-byte pages.
  ModelLayout b;
  b.num_layers = 2;
  b.num_q_heads = 4;
  b.num_kv_heads = 2;
  b.head_dim = 32;
  b.dtype = DType::kF16;
  b.page_tokens = 16;  // 2048-byte pages.
  ASSERT_EQ(a.page_bytes(), 512);
  ASSERT_EQ(b.page_bytes(), 2048);
  EngineOptions options;
  options.extent_pages = 1;  // No spare slots: every page is charged when it is written.
  options.device_budget_bytes = 48 * a.page_bytes();
  MakeEngine(options, a);
  ASSERT_TRUE(engine_->RegisterLayout("big", b).ok());
  ASSERT_TRUE(engine_->RegisterLayout("big", b).ok());

  // Every placement works for both page sizes, side by side.
  for (auto mode : {headwise::v1::Placement::DEVICE_ONLY, headwise::v1::Placement::LAYER_OFFLOAD,
                    headwise::v1::Placement::HEAD_OFFLOAD}) {
    SCOPED_TRACE(mode);
    auto sa = engine_->CreateSequence("small", Spec(mode));
    auto sb = engine_->CreateSequence("big", Spec(mode));
    ASSERT_TRUE(sa.ok() && sb.ok());
    KvHistory ha(a), hb(b);
    uint32_t seed = 50;
    for (int tokens : {3, 2, 1}) {  // 24 small pages and 4 big ones: 20 of the 24 KiB.
      layout_ = a;
      AppendStep(*sa, ha, tokens, seed++);
      layout_ = b;
      AppendStep(*sb, hb, tokens * 2, seed++);
      layout_ = a;
      AttendAndCheck(*sa, ha, seed++);
      layout_ = b;
      AttendAndCheck(*sb, hb, seed++);
    }
    ASSERT_TRUE(engine_->Release(*sa).ok());
    ASSERT_TRUE(engine_->Release(*sb).ok());
  }
  EngineStats stats = engine_->GetStats();
  EXPECT_EQ(stats.device.used_bytes, 0u);
  EXPECT_EQ(stats.host.used_bytes, 0u);
  EXPECT_GT(stats.bytes_host_to_device, 0u);
  EXPECT_EQ(stats.device.budget_bytes, options.device_budget_bytes);

  // Fill the device tier from both layouts: the small layout takes what the big one left.
  const headwise::v1::PolicySpec device_only = Spec(headwise::v1::Placement::DEVICE_ONLY);
  auto sb = engine_->CreateSequence("big", device_only);
  auto sa = engine_->CreateSequence("small", device_only);
  ASSERT_TRUE(sa.ok() && sb.ok());
  KvHistory ha(a), hb(b);
  layout_ = b;
  AppendStep(*sb, hb, 16, 1);  // 2 layers * 2 heads * 1 page of 2 KiB: 8 KiB.
  layout_ = a;
  absl::Status failed;
  for (uint32_t step = 0; step < 100 && failed.ok(); ++step) {
    for (int l = 0; l < a.num_layers; ++l) {
      const KvChunk c = ha.MakeChunk(4, 100 + step * 7 + l);  // 4 heads * 1 page of 512 B.
      failed = engine_->Append(*sa, LayerId(l), c.k, c.v, 4, a.dtype);
      ExpectWithinBudgets(*engine_);
      if (!failed.ok()) break;
      ha.Record(l, c);
    }
  }
  EXPECT_EQ(failed.code(), absl::StatusCode::kResourceExhausted) << failed;
  // 8 KiB of big pages + 32 small pages (steps 1, 2 and layers 0, 1 of step 3) fill 24 KiB.
  stats = engine_->GetStats();
  EXPECT_EQ(stats.device.used_bytes, options.device_budget_bytes);
  EXPECT_EQ(stats.device.peak_bytes, options.device_budget_bytes);
  auto ssa = engine_->GetSequenceStats(*sa);
  ASSERT_TRUE(ssa.ok());
  EXPECT_EQ(ssa->layer_lengths, (std::vector<int64_t>{12, 12, 8}));
  // The big layout's pool is far from its own budget, but the shared one is full.
  layout_ = b;
  const KvChunk c = hb.MakeChunk(16, 77);
  EXPECT_EQ(engine_->Append(*sb, LayerId(0), c.k, c.v, 16, b.dtype).code(),
            absl::StatusCode::kResourceExhausted);
  ExpectWithinBudgets(*engine_);
  // Both sequences still attend exactly what they hold.
  AttendAndCheck(*sb, hb, 8);
  layout_ = a;
  AttendAndCheck(*sa, ha, 9);

  // Releasing the small sequence makes room for the big one again.
  ASSERT_TRUE(engine_->Release(*sa).ok());
  layout_ = b;
  AppendStep(*sb, hb, 16, 2);
  AttendAndCheck(*sb, hb, 10);
  stats = engine_->GetStats();
  EXPECT_EQ(stats.device.used_bytes, 8u * b.page_bytes());
  EXPECT_EQ(stats.device.peak_bytes, options.device_budget_bytes);
}

TEST_F(EngineTest, ForkSharesPagesAndCopyOnWriteKeepsParent) {
  for (auto mode : {headwise::v1::Placement::DEVICE_ONLY, headwise::v1::Placement::HEAD_OFFLOAD}) {
    SCOPED_TRACE(mode);
    MakeEngine(EngineOptions{}, SmallLayout(DType::kF32));
    auto parent = engine_->CreateSequence("small", Spec(mode));
    ASSERT_TRUE(parent.ok());
    KvHistory parent_history(layout_);
    AppendStep(*parent, parent_history, 10, 1);  // 3 pages per head, the last partial.
    const int64_t pages = 3 * layout_.num_kv_heads * layout_.num_layers;
    const EngineStats before = engine_->GetStats();
    auto child = engine_->Fork(*parent);
    ASSERT_TRUE(child.ok()) << child.status();
    const EngineStats after = engine_->GetStats();
    EXPECT_EQ(after.device_pages + after.host_pages, pages);  // Stored once.
    EXPECT_EQ(after.device.used_bytes, before.device.used_bytes);
    EXPECT_EQ(after.host.used_bytes, before.host.used_bytes);
    auto cs = engine_->GetSequenceStats(*child);
    ASSERT_TRUE(cs.ok());
    EXPECT_EQ(cs->shared_pages, pages);
    EXPECT_EQ(cs->length, 10);
    KvHistory child_history = parent_history;
    AttendAndCheck(*child, child_history, 2);
    // The child writes into the shared partial tail pages: they are copied first.
    AppendStep(*child, child_history, 3, 50);
    EXPECT_EQ(engine_->GetStats().cow_copies, layout_.num_kv_heads * layout_.num_layers);
    AttendAndCheck(*parent, parent_history, 3);
    AttendAndCheck(*child, child_history, 4);
    // The parent appends different tokens; the child is unaffected.
    AppendStep(*parent, parent_history, 5, 60);
    AttendAndCheck(*parent, parent_history, 5);
    AttendAndCheck(*child, child_history, 6);
    cs = engine_->GetSequenceStats(*child);
    ASSERT_TRUE(cs.ok());
    EXPECT_EQ(cs->shared_pages, 2 * layout_.num_kv_heads * layout_.num_layers);
    ASSERT_TRUE(engine_->Release(*parent).ok());
    AttendAndCheck(*child, child_history, 7);
    cs = engine_->GetSequenceStats(*child);
    EXPECT_EQ(cs->shared_pages, 0);
    ASSERT_TRUE(engine_->Release(*child).ok());
    const EngineStats end = engine_->GetStats();
    EXPECT_EQ(end.device_pages + end.host_pages + end.disk_pages, 0);
    EXPECT_EQ(end.device.used_bytes + end.host.used_bytes, 0u);
  }
}

TEST_F(EngineTest, TruncateThenAppendMatchesFreshSequence) {
  MakeEngine(EngineOptions{}, SmallLayout(DType::kF16));
  for (auto mode : {headwise::v1::Placement::DEVICE_ONLY, headwise::v1::Placement::LAYER_OFFLOAD}) {
    auto seq = engine_->CreateSequence("small", Spec(mode));
    ASSERT_TRUE(seq.ok());
    KvHistory history(layout_);
    AppendStep(*seq, history, 9, 1);
    AppendStep(*seq, history, 6, 2);
    ASSERT_TRUE(engine_->Truncate(*seq, 7).ok());
    history.Truncate(7);
    AttendAndCheck(*seq, history, 3);
    AppendStep(*seq, history, 5, 4);
    const std::vector<float> truncated = AttendAndCheck(*seq, history, 5);
    // A fresh sequence fed the same 12 tokens.
    auto fresh = engine_->CreateSequence("small", Spec(mode));
    ASSERT_TRUE(fresh.ok());
    KvHistory fresh_history(layout_);
    for (int l = 0; l < layout_.num_layers; ++l) {
      KvChunk c;
      c.num_tokens = 12;
      const int64_t n = 12 * layout_.num_kv_heads * layout_.head_dim;
      c.k.resize(n * 2);
      c.v.resize(n * 2);
      for (int64_t p = 0; p < 12; ++p) {
        for (int h = 0; h < layout_.num_kv_heads; ++h) {
          for (int e = 0; e < layout_.head_dim; ++e) {
            const int64_t i = (p * layout_.num_kv_heads + h) * layout_.head_dim + e;
            StoreFromFloat(c.k.data(), layout_.dtype, i, history.K(l, h, p, e));
            StoreFromFloat(c.v.data(), layout_.dtype, i, history.V(l, h, p, e));
          }
        }
      }
      ASSERT_TRUE(engine_->Append(*fresh, LayerId(l), c.k, c.v, 12, layout_.dtype).ok());
      fresh_history.Record(l, c);
    }
    const std::vector<float> fresh_out = AttendAndCheck(*fresh, fresh_history, 5);
    EXPECT_EQ(truncated, fresh_out);
    EXPECT_EQ(engine_->Truncate(*seq, 13).code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(engine_->Truncate(*seq, -1).code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST_F(EngineTest, StreamingLlmKeepsSinkAndWindowPages) {
  MakeEngine(EngineOptions{}, SmallLayout(DType::kF32));
  headwise::v1::PolicySpec spec = Spec(headwise::v1::Placement::HEAD_OFFLOAD);
  spec.mutable_eviction()->mutable_streaming_llm()->set_sink_tokens(4);
  spec.mutable_eviction()->mutable_streaming_llm()->set_recent_tokens(6);
  auto seq = engine_->CreateSequence("small", spec);
  ASSERT_TRUE(seq.ok());
  KvHistory history(layout_);
  const SinkRecentWindow window{4, 6};
  uint32_t seed = 1;
  for (int tokens : {3, 5, 9, 1, 7}) {
    AppendStep(*seq, history, tokens, seed++);
    const int64_t n = history.length(0);
    // The page rule: a page is kept when it holds a sink or a recent position, or is the last.
    auto keep = [&](int, int, int64_t p) {
      const int64_t first = p / 4 * 4;
      const int64_t count = std::min<int64_t>(4, n - first);
      return PageHoldsSinkOrRecent(first, count, n, window) || first + count == n;
    };
    AttendAndCheck(*seq, history, seed++, keep);
    int64_t kept_pages = 0;
    for (int64_t first = 0; first < n; first += 4) kept_pages += keep(0, 0, first) ? 1 : 0;
    auto ss = engine_->GetSequenceStats(*seq);
    ASSERT_TRUE(ss.ok());
    EXPECT_EQ(ss->host_pages, kept_pages * layout_.num_kv_heads * layout_.num_layers);
  }
  EXPECT_GT(engine_->GetStats().evicted_pages, 0);
}

// Every full_attention_heads.tsv shipped under the shared data directory, first one found.

}  // namespace
}  // namespace headwise
