// Engine v2: token-granular heads (H2O drops single tokens; pages become sparse and are
// compacted), attention statistics fed back to the stack, atomic DecodeStep and Append under
// refusals and injected faults, and batched decode.
#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "cachesvc/engine.h"
#include "gtest/gtest.h"
#include "policies/policy_stack.h"
#include "tests/engine/engine_fixture.h"

namespace headwise {
namespace {

using testing::KvChunk;
using testing::KvHistory;
using testing::MaxRelError;
using testing::RandomFloats;

constexpr double kTol = 1e-5;

ModelLayout Layout() {
  ModelLayout l;
  l.num_layers = 2;
  l.num_q_heads = 4;
  l.num_kv_heads = 2;
  l.head_dim = 16;
  l.dtype = DType::kF32;
  l.page_tokens = 4;
  return l;
}

class EngineV2Test : public ::testing::Test {
 protected:
  void Make(EngineOptions options = {}) {
    auto engine = Engine::Create(options);
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = std::move(*engine);
    ASSERT_TRUE(engine_->RegisterLayout("l", layout_).ok());
  }
  SequenceId Create(const headwise::v1::PolicySpec& spec) {
    auto seq = engine_->CreateSequence("l", spec);
    EXPECT_TRUE(seq.ok()) << seq.status();
    return *seq;
  }
  void AppendAll(const SequenceId& seq, KvHistory& history, int tokens, uint32_t seed) {
    for (int l = 0; l < layout_.num_layers; ++l) {
      const KvChunk c = history.MakeChunk(tokens, seed * 31 + l);
      ASSERT_TRUE(engine_->Append(seq, LayerId(l), c.k, c.v, tokens, layout_.dtype).ok());
      history.Record(l, c);
    }
  }
  // The held positions of every head of `layer`, as a keep predicate for KvHistory::Reference.
  std::function<bool(int, int64_t)> HeldBy(const SequenceId& seq, int layer) {
    auto held = std::make_shared<std::vector<std::vector<int64_t>>>();
    for (int h = 0; h < layout_.num_kv_heads; ++h) {
      auto p = engine_->HeldPositions(seq, LayerId(layer), HeadId(h));
      EXPECT_TRUE(p.ok()) << p.status();
      held->push_back(*p);
    }
    return [held](int h, int64_t pos) {
      const std::vector<int64_t>& v = (*held)[h];
      return std::binary_search(v.begin(), v.end(), pos);
    };
  }

  ModelLayout layout_ = Layout();
  std::unique_ptr<Engine> engine_;
};

// A float64 model of H2O per (layer, kv head): accumulated attention A over held positions,
// updated with the reference probabilities (mean over the group's query heads), then the
// keep rule of policies.md §5.2 at token granularity.
class H2oModel {
 public:
  H2oModel(int heavy, int recent) : heavy_(heavy), recent_(recent) {}
  void Append(int64_t pos) {
    held_.push_back(pos);
    score_[pos] = 0.0;
  }
  void Accumulate(const std::map<int64_t, double>& probs) {
    for (const auto& [pos, p] : probs) score_[pos] += p;
  }
  void Evict() {
    const int64_t n = static_cast<int64_t>(held_.size());
    if (n <= heavy_ + recent_) return;
    std::vector<int64_t> old(held_.begin(), held_.end() - recent_);
    std::stable_sort(old.begin(), old.end(),
                     [&](int64_t a, int64_t b) { return score_[a] > score_[b]; });
    old.resize(heavy_);
    std::sort(old.begin(), old.end());
    old.insert(old.end(), held_.end() - recent_, held_.end());
    held_ = old;
  }
  const std::vector<int64_t>& held() const { return held_; }

 private:
  int64_t heavy_, recent_;
  std::vector<int64_t> held_;
  std::map<int64_t, double> score_;
};

TEST_F(EngineV2Test, H2oDropsSingleTokensAndAttendsExactlyOverWhatItHolds) {
  for (auto mode : {headwise::v1::Placement::DEVICE_ONLY, headwise::v1::Placement::HEAD_OFFLOAD}) {
    Make();
    headwise::v1::PolicySpec spec;
    spec.mutable_placement()->set_mode(mode);
    spec.mutable_eviction()->mutable_h2o()->set_heavy_tokens(3);
    spec.mutable_eviction()->mutable_h2o()->set_recent_tokens(5);
    const SequenceId seq = Create(spec);
    KvHistory history(layout_);
    AppendAll(seq, history, 6, 1);
    std::vector<H2oModel> model(layout_.num_layers * layout_.num_kv_heads, H2oModel(3, 5));
    for (H2oModel& m : model) {
      for (int64_t p = 0; p < 6; ++p) m.Append(p);
    }
    const int d = layout_.head_dim, hq = layout_.num_q_heads, g = layout_.group_size();
    bool saw_gap = false;
    for (int step = 0; step < 24; ++step) {
      for (int l = 0; l < layout_.num_layers; ++l) {
        const KvChunk c = history.MakeChunk(1, 1000 + step * 7 + l);
        const std::vector<float> q = RandomFloats(int64_t{hq} * d, 500 + step * 3 + l);
        std::vector<float> o(hq * d), lse(hq);
        int64_t len = 0;
        ASSERT_TRUE(engine_
                        ->DecodeStep(seq, LayerId(l), q, c.k, c.v, layout_.dtype, absl::MakeSpan(o),
                                     absl::MakeSpan(lse), &len)
                        .ok());
        history.Record(l, c);
        EXPECT_EQ(len, history.length(l));
        // The reference attends over what the model held after the append.
        for (int h = 0; h < layout_.num_kv_heads; ++h) model[l * 2 + h].Append(len - 1);
        std::vector<double> ro, rlse;
        history.Reference(l, q, &ro, &rlse, [&](int h, int64_t p) {
          const auto& v = model[l * 2 + h].held();
          return std::binary_search(v.begin(), v.end(), p);
        });
        EXPECT_LT(MaxRelError(o.data(), ro), kTol) << "step " << step << " layer " << l;
        EXPECT_LT(MaxRelError(lse.data(), rlse), kTol);
        // Probabilities of the step, mean over each group, then the model's eviction.
        for (int h = 0; h < layout_.num_kv_heads; ++h) {
          std::map<int64_t, double> probs;
          for (int qh = h * g; qh < (h + 1) * g; ++qh) {
            for (int64_t p : model[l * 2 + h].held()) {
              double dot = 0;
              for (int i = 0; i < d; ++i) dot += double{q[qh * d + i]} * history.K(l, h, p, i);
              probs[p] += std::exp(dot / std::sqrt(double(d)) - rlse[qh]) / g;
            }
          }
          model[l * 2 + h].Accumulate(probs);
          model[l * 2 + h].Evict();
          auto held = engine_->HeldPositions(seq, LayerId(l), HeadId(h));
          ASSERT_TRUE(held.ok());
          EXPECT_EQ(*held, model[l * 2 + h].held()) << "step " << step << " layer " << l;
          for (size_t i = 1; i < held->size(); ++i) saw_gap |= (*held)[i] != (*held)[i - 1] + 1;
        }
      }
    }
    EXPECT_TRUE(saw_gap) << "H2O should hold non-contiguous positions";
    auto stats = engine_->GetSequenceStats(seq);
    ASSERT_TRUE(stats.ok());
    EXPECT_EQ(stats->retained_tokens, 8 * layout_.num_layers * layout_.num_kv_heads);
    EXPECT_GT(stats->evicted_tokens, 0);
    // Compaction: no two neighbouring pages of a head could share one page.
    const int64_t pages = stats->device_pages + stats->host_pages;
    EXPECT_LE(pages, int64_t{layout_.num_layers} * layout_.num_kv_heads * (2 * 2 + 1));
    ASSERT_TRUE(engine_->Release(seq).ok());
    const EngineStats end = engine_->GetStats();
    EXPECT_EQ(end.device_pages + end.host_pages, 0);
  }
}

TEST_F(EngineV2Test, RefusedDecodeStepChangesNothing) {
  // layer_offload with a device that holds one page: the layer cannot be staged.
  EngineOptions options;
  options.device_budget_bytes = static_cast<uint64_t>(layout_.page_bytes());
  Make(options);
  headwise::v1::PolicySpec spec;
  spec.mutable_placement()->set_mode(headwise::v1::Placement::LAYER_OFFLOAD);
  const SequenceId seq = Create(spec);
  KvHistory history(layout_);
  AppendAll(seq, history, 9, 2);
  const auto before = engine_->GetSequenceStats(seq);
  ASSERT_TRUE(before.ok());
  const KvChunk c = history.MakeChunk(1, 77);
  const std::vector<float> q = RandomFloats(int64_t{layout_.num_q_heads} * layout_.head_dim, 5);
  std::vector<float> o(q.size()), lse(layout_.num_q_heads);
  const absl::Status st = engine_->DecodeStep(seq, LayerId(0), q, c.k, c.v, layout_.dtype,
                                              absl::MakeSpan(o), absl::MakeSpan(lse));
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  const auto after = engine_->GetSequenceStats(seq);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->layer_lengths, before->layer_lengths);
  EXPECT_EQ(after->host_pages, before->host_pages);
  EXPECT_EQ(after->retained_tokens, before->retained_tokens);
}

TEST_F(EngineV2Test, InjectedFaultsLeaveAppendAndDecodeStepUnchanged) {
  std::string fail_at;
  int countdown = 0;
  EngineOptions options;
  options.fault_hook = [&](std::string_view point) -> absl::Status {
    if (point == fail_at && --countdown == 0) return absl::UnavailableError("injected");
    return absl::OkStatus();
  };
  Make(options);
  headwise::v1::PolicySpec spec;
  spec.mutable_placement()->set_mode(headwise::v1::Placement::LAYER_OFFLOAD);
  const SequenceId seq = Create(spec);
  KvHistory history(layout_);
  AppendAll(seq, history, 6, 3);
  const int d = layout_.head_dim, hq = layout_.num_q_heads;
  for (const char* point : {"alloc.host", "copy.submit", "alloc.device"}) {
    for (int nth : {1, 2, 3}) {
      const auto before = engine_->GetSequenceStats(seq);
      ASSERT_TRUE(before.ok());
      // Append of 5 tokens (2 fresh pages per head): fails at the nth allocation.
      fail_at = point;
      countdown = nth;
      const KvChunk big = history.MakeChunk(5, 900 + nth);
      absl::Status st = engine_->Append(seq, LayerId(0), big.k, big.v, 5, layout_.dtype);
      if (std::string(point) == "alloc.host") {
        EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable);
        const auto now = engine_->GetSequenceStats(seq);
        EXPECT_EQ(now->layer_lengths, before->layer_lengths);
        EXPECT_EQ(now->retained_tokens, before->retained_tokens);
        EXPECT_EQ(now->host_pages, before->host_pages);
      }
      if (st.ok()) history.Record(0, big);
      // Then a DecodeStep on layer 0: fails staging or copying, or goes through.
      const int layer = 0;
      if (st.ok()) {
        // Complete the step on layer 1 so that a new step may start.
        const KvChunk rest = history.MakeChunk(5, 950 + nth);
        fail_at.clear();
        ASSERT_TRUE(engine_->Append(seq, LayerId(1), rest.k, rest.v, 5, layout_.dtype).ok());
        history.Record(1, rest);
        fail_at = point;
        countdown = 1;
      }
      const auto mid = engine_->GetSequenceStats(seq);
      ASSERT_TRUE(mid.ok());
      const KvChunk one = history.MakeChunk(1, 990 + nth);
      const std::vector<float> q = RandomFloats(int64_t{hq} * d, 40 + nth);
      std::vector<float> o(hq * d), lse(hq);
      st = engine_->DecodeStep(seq, LayerId(layer), q, one.k, one.v, layout_.dtype,
                               absl::MakeSpan(o), absl::MakeSpan(lse));
      if (st.ok()) {
        history.Record(layer, one);
      } else {
        EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << point << " " << st;
        const auto now = engine_->GetSequenceStats(seq);
        EXPECT_EQ(now->layer_lengths, mid->layer_lengths) << point;
        EXPECT_EQ(now->retained_tokens, mid->retained_tokens) << point;
        EXPECT_EQ(now->host_pages, mid->host_pages) << point;
      }
      fail_at.clear();
      // Whatever happened, attention equals the float64 reference over what was accepted.
      for (int l = 0; l < layout_.num_layers; ++l) {
        const std::vector<float> q2 = RandomFloats(int64_t{hq} * d, 70 + l + nth);
        std::vector<float> o2(hq * d), lse2(hq);
        ASSERT_TRUE(
            engine_->Attend(seq, LayerId(l), q2, absl::MakeSpan(o2), absl::MakeSpan(lse2)).ok());
        std::vector<double> ro, rl;
        history.Reference(l, q2, &ro, &rl);
        EXPECT_LT(MaxRelError(o2.data(), ro), kTol) << point << " nth " << nth << " layer " << l;
      }
      // Level the layers again for the next round.
      const auto s = engine_->GetSequenceStats(seq);
      for (int l = 0; l < layout_.num_layers; ++l) {
        const int64_t missing =
            *std::max_element(s->layer_lengths.begin(), s->layer_lengths.end()) -
            s->layer_lengths[l];
        if (missing == 0) continue;
        const KvChunk fill = history.MakeChunk(static_cast<int>(missing), 1200 + l + nth);
        ASSERT_TRUE(
            engine_
                ->Append(seq, LayerId(l), fill.k, fill.v, static_cast<int>(missing), layout_.dtype)
                .ok());
        history.Record(l, fill);
      }
      EXPECT_LE(engine_->GetStats().host.used_bytes, engine_->GetStats().host.budget_bytes);
    }
  }
  // No failure leaked a slot: once released, nothing is held on any tier.
  ASSERT_TRUE(engine_->Release(seq).ok());
  EXPECT_EQ(engine_->GetStats().device.used_bytes, 0u);
  EXPECT_EQ(engine_->GetStats().host.used_bytes, 0u);
}

TEST_F(EngineV2Test, BatchedDecodeEqualsOneCallPerSequence) {
  Make();
  headwise::v1::PolicySpec spec;
  std::vector<SequenceId> a, b;
  std::vector<KvHistory> histories;
  for (int i = 0; i < 3; ++i) {
    a.push_back(Create(spec));
    b.push_back(Create(spec));
    histories.emplace_back(layout_);
    for (int l = 0; l < layout_.num_layers; ++l) {
      const KvChunk c = histories[i].MakeChunk(5 + i, 10 * i + l);
      ASSERT_TRUE(engine_->Append(a[i], LayerId(l), c.k, c.v, c.num_tokens, layout_.dtype).ok());
      ASSERT_TRUE(engine_->Append(b[i], LayerId(l), c.k, c.v, c.num_tokens, layout_.dtype).ok());
      histories[i].Record(l, c);
    }
  }
  const int n = layout_.num_q_heads * layout_.head_dim;
  std::vector<KvChunk> tokens;
  std::vector<std::vector<float>> qs, oa(3, std::vector<float>(n)), la(3, std::vector<float>(4));
  for (int i = 0; i < 3; ++i) {
    tokens.push_back(histories[i].MakeChunk(1, 300 + i));
    qs.push_back(RandomFloats(n, 400 + i));
  }
  std::vector<Engine::DecodeItem> items(3);
  for (int i = 0; i < 3; ++i) {
    items[i].seq = a[2 - i];  // Not in handle order.
    items[i].q = qs[2 - i];
    items[i].k = tokens[2 - i].k;
    items[i].v = tokens[2 - i].v;
    items[i].o = absl::MakeSpan(oa[2 - i]);
    items[i].lse = absl::MakeSpan(la[2 - i]);
  }
  ASSERT_TRUE(engine_->DecodeStepBatch(LayerId(0), layout_.dtype, absl::MakeSpan(items)).ok());
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(items[i].status.ok()) << items[i].status;
    std::vector<float> o(n), lse(4);
    int64_t len = 0;
    ASSERT_TRUE(engine_
                    ->DecodeStep(b[i], LayerId(0), qs[i], tokens[i].k, tokens[i].v, layout_.dtype,
                                 absl::MakeSpan(o), absl::MakeSpan(lse), &len)
                    .ok());
    EXPECT_EQ(o, oa[i]);
    EXPECT_EQ(lse, la[i]);
    EXPECT_EQ(items[2 - i].layer_length, 6 + i);
  }
  // The same sequence twice in one batch is refused before anything runs.
  std::vector<Engine::DecodeItem> twice(2);
  twice[0].seq = twice[1].seq = a[0];
  EXPECT_EQ(engine_->DecodeStepBatch(LayerId(1), layout_.dtype, absl::MakeSpan(twice)).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineV2Test, ForkClonesTheStackAndItsScores) {
  Make();
  headwise::v1::PolicySpec spec;
  spec.mutable_eviction()->mutable_h2o()->set_heavy_tokens(2);
  spec.mutable_eviction()->mutable_h2o()->set_recent_tokens(3);
  const SequenceId parent = Create(spec);
  KvHistory history(layout_);
  AppendAll(parent, history, 4, 9);
  const int n = layout_.num_q_heads * layout_.head_dim;
  auto step = [&](const SequenceId& s, KvHistory& h, uint32_t seed) {
    for (int l = 0; l < layout_.num_layers; ++l) {
      const KvChunk c = h.MakeChunk(1, seed + l);
      std::vector<float> q = RandomFloats(n, seed * 3 + l), o(n), lse(4);
      ASSERT_TRUE(engine_
                      ->DecodeStep(s, LayerId(l), q, c.k, c.v, layout_.dtype, absl::MakeSpan(o),
                                   absl::MakeSpan(lse))
                      .ok());
      h.Record(l, c);
    }
  };
  for (uint32_t i = 0; i < 4; ++i) step(parent, history, 100 + i * 10);
  auto child = engine_->Fork(parent);
  ASSERT_TRUE(child.ok());
  KvHistory child_history = history;
  // Same inputs after the fork: the clone decides exactly as the parent.
  for (uint32_t i = 0; i < 3; ++i) {
    step(parent, history, 200 + i * 10);
    step(*child, child_history, 200 + i * 10);
    for (int l = 0; l < layout_.num_layers; ++l) {
      for (int h = 0; h < layout_.num_kv_heads; ++h) {
        EXPECT_EQ(*engine_->HeldPositions(parent, LayerId(l), HeadId(h)),
                  *engine_->HeldPositions(*child, LayerId(l), HeadId(h)));
      }
    }
  }
  ASSERT_TRUE(engine_->Release(parent).ok());
  ASSERT_TRUE(engine_->Release(*child).ok());
  EXPECT_EQ(engine_->GetStats().device_pages, 0);
}

TEST_F(EngineV2Test, LayerOffloadStagesTheNextLayerAheadAndStaysExact) {
  layout_.num_layers = 3;
  Make();
  headwise::v1::PolicySpec spec;
  spec.mutable_placement()->set_mode(headwise::v1::Placement::LAYER_OFFLOAD);
  const SequenceId seq = Create(spec);
  KvHistory history(layout_);
  AppendAll(seq, history, 21, 4);
  const int n = layout_.num_q_heads * layout_.head_dim;
  const int64_t page = layout_.page_bytes();
  const uint64_t before = engine_->GetStats().bytes_host_to_device;
  int64_t allowance = 0;
  for (int step = 0; step < 6; ++step) {
    int64_t pages_held = 0;
    for (int l = 0; l < layout_.num_layers; ++l) {
      const KvChunk c = history.MakeChunk(1, 600 + step * 5 + l);
      const std::vector<float> q = RandomFloats(n, 700 + step * 5 + l);
      std::vector<float> o(n), lse(layout_.num_q_heads);
      ASSERT_TRUE(engine_
                      ->DecodeStep(seq, LayerId(l), q, c.k, c.v, layout_.dtype, absl::MakeSpan(o),
                                   absl::MakeSpan(lse))
                      .ok());
      history.Record(l, c);
      std::vector<double> ro, rl;
      history.Reference(l, q, &ro, &rl);
      ASSERT_LT(MaxRelError(o.data(), ro), kTol) << "step " << step << " layer " << l;
      pages_held += (history.length(l) + 3) / 4 * layout_.num_kv_heads;
    }
    // Each layer is copied once per step (staged ahead while the layer before computes), plus
    // the pages its own append changed; never twice. The first step after nothing was kept
    // (the start, and after the truncate) also copies layer 0 on demand.
    const int64_t cold = step == 0 || step == 4 ? pages_held / layout_.num_layers + 2 : 0;
    allowance += (pages_held + cold + 2 * layout_.num_layers * layout_.num_kv_heads) * page;
    if (step == 3) {
      // A truncate in the middle drops what is kept on the device; outputs stay exact.
      ASSERT_TRUE(engine_->Truncate(seq, history.length(0) - 2).ok());
      history.Truncate(history.length(0) - 2);
    }
  }
  ASSERT_TRUE(engine_->Release(seq).ok());  // Waits for the copies still in flight.
  const uint64_t moved = engine_->GetStats().bytes_host_to_device - before;
  EXPECT_LE(moved, static_cast<uint64_t>(allowance));
  EXPECT_EQ(engine_->GetStats().device.used_bytes, 0u);
}

// The plan of each decode step, summed over a run, equals what the copy engine then moved, by
// purpose, in every placement; position-only drops are known in advance and match.
TEST_F(EngineV2Test, PlannedBytesEqualMovedBytes) {
  layout_.num_layers = 3;
  for (auto mode : {headwise::v1::Placement::DEVICE_ONLY, headwise::v1::Placement::LAYER_OFFLOAD,
                    headwise::v1::Placement::HEAD_OFFLOAD}) {
    Make();
    headwise::v1::PolicySpec spec;
    spec.mutable_placement()->set_mode(mode);
    spec.mutable_eviction()->mutable_streaming_llm()->set_sink_tokens(4);
    spec.mutable_eviction()->mutable_streaming_llm()->set_recent_tokens(8);
    const SequenceId seq = Create(spec);
    KvHistory history(layout_);
    AppendAll(seq, history, 13, 6);
    const std::array<uint64_t, kNumCopyPriorities> before = engine_->GetStats().bytes_by_purpose;
    std::array<uint64_t, kNumCopyPriorities> planned{};
    int64_t planned_drops = 0;
    const int64_t evicted_before = engine_->GetStats().evicted_pages;
    const int n = layout_.num_q_heads * layout_.head_dim;
    for (int step = 0; step < 9; ++step) {
      for (int l = 0; l < layout_.num_layers; ++l) {
        absl::StatusOr<StepPlan> plan = engine_->PlanDecodeStep(seq, LayerId(l));
        ASSERT_TRUE(plan.ok()) << plan.status();
        EXPECT_TRUE(plan->drops_known);
        for (int p = 0; p < kNumCopyPriorities; ++p) planned[p] += plan->bytes[p];
        planned_drops += plan->pages_dropped;
        const KvChunk c = history.MakeChunk(1, 800 + step * 5 + l);
        const std::vector<float> q = RandomFloats(n, 900 + step * 5 + l);
        std::vector<float> o(n), lse(layout_.num_q_heads);
        ASSERT_TRUE(engine_
                        ->DecodeStep(seq, LayerId(l), q, c.k, c.v, layout_.dtype, absl::MakeSpan(o),
                                     absl::MakeSpan(lse))
                        .ok());
        history.Record(l, c);
      }
    }
    ASSERT_TRUE(engine_->Release(seq).ok());  // Waits for the copies in flight.
    const std::array<uint64_t, kNumCopyPriorities> after = engine_->GetStats().bytes_by_purpose;
    for (int p = 0; p < kNumCopyPriorities; ++p) {
      EXPECT_EQ(after[p] - before[p], planned[p]) << "mode " << mode << " purpose " << p;
    }
    EXPECT_EQ(engine_->GetStats().evicted_pages - evicted_before, planned_drops);
    EXPECT_GT(planned_drops, 0);
    if (mode != headwise::v1::Placement::DEVICE_ONLY) {
      EXPECT_GT(planned[static_cast<int>(CopyPriority::kPrefetch)], 0u) << mode;
    }
  }
}

// A PageSelector registered by name: every query reads only the first and the last page of each
// head. Attention equals the float64 reference over exactly those pages' tokens, in every
// placement.
class FirstAndLastPage final : public PageSelector {
 public:
  std::string_view name() const override { return "test_first_and_last"; }
  std::unique_ptr<PageSelector> Clone() const override {
    return std::make_unique<FirstAndLastPage>();
  }
  void Select(const HeadContext& head, absl::Span<const float>, int,
              std::vector<int32_t>* pages) const override {
    if (head.pages.empty()) return;
    pages->push_back(static_cast<int32_t>(head.pages.size()) - 1);
    pages->push_back(0);  // Unordered and possibly repeated: the engine sorts and dedups.
    pages->push_back(0);
  }
};

TEST_F(EngineV2Test, SelectedPagesAreExactlyWhatTheKernelReads) {
  (void)PolicyRegistry::Global().Register<PageSelector>(
      "test_first_and_last",
      [](const headwise::v1::PolicySpec&,
         const StackEnv&) -> absl::StatusOr<std::unique_ptr<PageSelector>> {
        return std::make_unique<FirstAndLastPage>();
      });
  for (auto mode : {headwise::v1::Placement::DEVICE_ONLY, headwise::v1::Placement::LAYER_OFFLOAD,
                    headwise::v1::Placement::HEAD_OFFLOAD}) {
    Make();
    headwise::v1::PolicySpec spec;
    spec.mutable_placement()->set_mode(mode);
    spec.mutable_selection()->set_selector("test_first_and_last");
    const SequenceId seq = Create(spec);
    KvHistory history(layout_);
    AppendAll(seq, history, 14, 8);  // Pages [0,4) [4,8) [8,12) [12,14).
    const int n = layout_.num_q_heads * layout_.head_dim;
    for (int l = 0; l < layout_.num_layers; ++l) {
      const std::vector<float> q = RandomFloats(n, 60 + l);
      std::vector<float> o(n), lse(layout_.num_q_heads);
      ASSERT_TRUE(engine_->Attend(seq, LayerId(l), q, absl::MakeSpan(o), absl::MakeSpan(lse)).ok());
      std::vector<double> ro, rl;
      history.Reference(l, q, &ro, &rl, [](int, int64_t p) { return p < 4 || p >= 12; });
      EXPECT_LT(MaxRelError(o.data(), ro), kTol) << "mode " << mode << " layer " << l;
      EXPECT_LT(MaxRelError(lse.data(), rl), kTol);
    }
  }
  headwise::v1::PolicySpec unknown;
  unknown.mutable_selection()->set_selector("no_such_selector");
  Make();
  EXPECT_EQ(engine_->CreateSequence("l", unknown).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace headwise
