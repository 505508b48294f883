// Merging on the engine (policies.md §6; cachesvc/engine_merge.cc): merged rows are written into
// the kept pages and their logit bias reaches the kernels in every placement. Checked against a
// float64 reference of the FULL cache on data where the answer is known (evicted tokens that
// duplicate kept ones merge exactly under the count-biased mean), against dropping on clustered
// keys, and for safety: shared (forked) pages are never written.
#include <cmath>
#include <cstdio>
#include <memory>
#include <vector>

#include "cachesvc/engine.h"
#include "gtest/gtest.h"
#include "tests/engine/engine_fixture.h"

namespace headwise {
namespace {

using testing::KvChunk;
using testing::KvHistory;
using testing::RandomFloats;
using V1Placement = headwise::v1::Placement;

constexpr int kDim = 32;
constexpr int kSinks = 4;
constexpr int kRecent = 8;

ModelLayout Layout() {
  return ModelLayout{.num_layers = 1,
                     .num_q_heads = 4,
                     .num_kv_heads = 2,
                     .head_dim = kDim,
                     .dtype = DType::kF32,
                     .page_tokens = 4};
}

enum class Merge { kNone, kMean, kD2o, kCam };

headwise::v1::PolicySpec Spec(V1Placement::Mode mode, Merge merge) {
  headwise::v1::PolicySpec spec;
  spec.mutable_placement()->set_mode(mode);
  auto* w = spec.mutable_eviction()->mutable_streaming_llm();
  w->set_sink_tokens(kSinks);
  w->set_recent_tokens(kRecent);
  switch (merge) {
    case Merge::kMean:
      spec.mutable_merge()->mutable_mean();
      break;
    case Merge::kD2o:
      spec.mutable_merge()->mutable_d2o();
      break;
    case Merge::kCam:
      spec.mutable_merge()->mutable_cam()->set_span(4);
      break;
    case Merge::kNone:
      break;
  }
  return spec;
}

class MergeEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto engine = Engine::Create({});
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = std::move(*engine);
    ASSERT_TRUE(engine_->RegisterLayout("l", layout_).ok());
  }

  // Tokens [first, first + n): random, except that token p in [kSinks, copy_end) repeats the
  // K/V of sink p % kSinks (per head), plus `noise` of fresh random per channel.
  KvChunk Chunk(KvHistory& history, int64_t first, int n, int64_t copy_end, float noise,
                uint32_t seed) {
    KvChunk c = history.MakeChunk(n, seed);
    const std::vector<float> jitter = RandomFloats(int64_t{n} * 2 * kDim, seed + 7);
    float* k = reinterpret_cast<float*>(c.k.data());
    float* v = reinterpret_cast<float*>(c.v.data());
    const int H = layout_.num_kv_heads;
    for (int t = 0; t < n; ++t) {
      const int64_t p = first + t;
      if (p < kSinks || p >= copy_end) continue;
      for (int h = 0; h < H; ++h) {
        for (int d = 0; d < kDim; ++d) {
          const int64_t src = p % kSinks;
          const float* sk =
              src >= first ? k + ((src - first) * H + h) * kDim : &sink_k_[(src * H + h) * kDim];
          const float* sv =
              src >= first ? v + ((src - first) * H + h) * kDim : &sink_v_[(src * H + h) * kDim];
          k[(int64_t{t} * H + h) * kDim + d] = sk[d] + noise * jitter[t * 2 * kDim + d];
          v[(int64_t{t} * H + h) * kDim + d] = sv[d] + noise * jitter[t * 2 * kDim + kDim + d];
        }
      }
    }
    for (int t = 0; t < n && first + t < kSinks; ++t) {
      const int64_t row = int64_t{t} * H * kDim;
      std::copy(k + row, k + row + H * kDim, sink_k_.begin() + (first + t) * H * kDim);
      std::copy(v + row, v + row + H * kDim, sink_v_.begin() + (first + t) * H * kDim);
    }
    history.Record(0, c);
    return c;
  }

  // Appends `total` tokens in chunks of `chunk` and returns the max relative error of a decode
  // query's output against the float64 full-cache reference.
  double RunAndCompare(const SequenceId& seq, KvHistory& history, int total, int chunk,
                       int64_t copy_end, float noise) {
    for (int first = 0; first < total; first += chunk) {
      const KvChunk c = Chunk(history, first, chunk, copy_end, noise, 100 + first);
      EXPECT_TRUE(engine_->Append(seq, LayerId(0), c.k, c.v, chunk, DType::kF32).ok());
    }
    return AttendError(seq, history, 77);
  }

  double AttendError(const SequenceId& seq, const KvHistory& history, uint32_t seed) {
    const std::vector<float> q = RandomFloats(int64_t{layout_.num_q_heads} * kDim, seed);
    std::vector<float> o(q.size()), lse(layout_.num_q_heads);
    EXPECT_TRUE(engine_->Attend(seq, LayerId(0), q, absl::MakeSpan(o), absl::MakeSpan(lse)).ok());
    std::vector<double> ref_o, ref_lse;
    history.Reference(0, q, &ref_o, &ref_lse);
    return testing::MaxRelError(o.data(), ref_o);
  }

  int64_t Merged(const SequenceId& seq) {
    auto stats = engine_->GetSequenceStats(seq);
    EXPECT_TRUE(stats.ok());
    return stats.ok() ? stats->merged_tokens : -1;
  }

  ModelLayout layout_ = Layout();
  std::vector<float> sink_k_ = std::vector<float>(kSinks * 2 * kDim);
  std::vector<float> sink_v_ = std::vector<float>(kSinks * 2 * kDim);
  std::unique_ptr<Engine> engine_;
};

// 52 of 64 tokens repeat a sink: the mean merge folds each into its sink with bias ln n, which
// is exact, so the 12 held tokens attend like the full 64 in every placement, appended at once
// or step by step; dropping the same tokens is far off.
TEST_F(MergeEngineTest, DuplicatesMergeExactlyInEveryPlacement) {
  for (auto mode :
       {V1Placement::DEVICE_ONLY, V1Placement::LAYER_OFFLOAD, V1Placement::HEAD_OFFLOAD}) {
    for (int chunk : {64, 4}) {
      KvHistory merged_history(layout_), dropped_history(layout_);
      auto merged = engine_->CreateSequence("l", Spec(mode, Merge::kMean));
      auto dropped = engine_->CreateSequence("l", Spec(mode, Merge::kNone));
      ASSERT_TRUE(merged.ok()) << merged.status();
      ASSERT_TRUE(dropped.ok());
      const double merged_err = RunAndCompare(*merged, merged_history, 64, chunk, 56, 0.0f);
      const double dropped_err = RunAndCompare(*dropped, dropped_history, 64, chunk, 56, 0.0f);
      EXPECT_LT(merged_err, 2e-5) << "mode " << mode << " chunk " << chunk;
      EXPECT_GT(dropped_err, 1e-2) << "mode " << mode << " chunk " << chunk;
      for (int h = 0; h < layout_.num_kv_heads; ++h) {
        auto held = engine_->HeldPositions(*merged, LayerId(0), HeadId(h));
        ASSERT_TRUE(held.ok());
        EXPECT_EQ(held->size(), size_t{kSinks + kRecent});
      }
      EXPECT_EQ(Merged(*merged), int64_t{64 - kSinks - kRecent} * layout_.num_kv_heads);
      EXPECT_EQ(Merged(*dropped), 0);
      ASSERT_TRUE(engine_->Release(*merged).ok());
      ASSERT_TRUE(engine_->Release(*dropped).ok());
    }
  }
}

// A Prefill chunk's queries read the merged rows with their bias too (the row-wise prefill
// kernel): equal to the float64 causal reference over the full history.
TEST_F(MergeEngineTest, PrefillOverMergedPagesMatchesTheFullCache) {
  KvHistory history(layout_);
  auto seq = engine_->CreateSequence("l", Spec(V1Placement::LAYER_OFFLOAD, Merge::kMean));
  ASSERT_TRUE(seq.ok());
  ASSERT_LT(RunAndCompare(*seq, history, 64, 16, 56, 0.0f), 2e-5);
  // 3 new tokens repeating sinks (kept: they are recent), prefilled.
  const KvChunk c = Chunk(history, 64, 3, 67, 0.0f, 9);
  const int Hq = layout_.num_q_heads;
  const std::vector<float> q = RandomFloats(int64_t{3} * Hq * kDim, 10);
  std::vector<float> o(q.size()), lse(3 * Hq);
  ASSERT_TRUE(engine_
                  ->Prefill(*seq, LayerId(0), q, c.k, c.v, 3, DType::kF32, absl::MakeSpan(o),
                            absl::MakeSpan(lse))
                  .ok());
  for (int t = 0; t < 3; ++t) {
    const std::vector<float> qt(q.begin() + t * Hq * kDim, q.begin() + (t + 1) * Hq * kDim);
    std::vector<double> ref_o, ref_lse;
    history.Reference(0, qt, &ref_o, &ref_lse, [&](int, int64_t pos) { return pos <= 64 + t; });
    EXPECT_LT(testing::MaxRelError(o.data() + t * Hq * kDim, ref_o), 2e-5) << t;
    for (int r = 0; r < Hq; ++r) EXPECT_NEAR(lse[t * Hq + r], ref_lse[r], 1e-4) << t;
  }
}

// Clustered keys (copies of the sinks plus noise): merging keeps more of the attention output
// than dropping at the same 12-token budget. The count-biased mean keeps each cluster's softmax
// mass and cuts the error more than 4-fold (asserted); D2O's merges average K/V
// without a bias, so the dropped tokens' mass is still lost and it gains little (0.706 -> 0.694).
TEST_F(MergeEngineTest, MergingBeatsDroppingOnClusteredKeys) {
  double err[3];
  int i = 0;
  for (Merge m : {Merge::kNone, Merge::kD2o, Merge::kMean}) {
    KvHistory history(layout_);
    auto seq = engine_->CreateSequence("l", Spec(V1Placement::DEVICE_ONLY, m));
    ASSERT_TRUE(seq.ok());
    err[i++] = RunAndCompare(*seq, history, 128, 8, 120, 0.05f);
    if (m != Merge::kNone) {
      EXPECT_GT(Merged(*seq), 0);
    }
  }
  std::printf("max rel error vs full cache: none %.4f  d2o %.4f  mean %.4f\n", err[0], err[1],
              err[2]);
  EXPECT_LT(err[1], err[0]) << "d2o " << err[1] << " none " << err[0];
  EXPECT_LT(err[2], err[0] * 0.25) << "mean " << err[2] << " none " << err[0];
}

// CaM merges values of dropped tokens after decode steps have scored them, deterministically:
// two sequences fed the same steps hold the same outputs.
TEST_F(MergeEngineTest, CamMergesValuesDeterministically) {
  std::vector<float> outs[2];
  for (int run = 0; run < 2; ++run) {
    KvHistory history(layout_);
    auto seq = engine_->CreateSequence("l", Spec(V1Placement::DEVICE_ONLY, Merge::kCam));
    ASSERT_TRUE(seq.ok()) << seq.status();
    for (int p = 0; p < 48; ++p) {
      const KvChunk c = history.MakeChunk(1, 500 + p);
      const std::vector<float> q = RandomFloats(int64_t{layout_.num_q_heads} * kDim, 900 + p);
      std::vector<float> o(q.size()), lse(layout_.num_q_heads);
      ASSERT_TRUE(engine_
                      ->DecodeStep(*seq, LayerId(0), q, c.k, c.v, DType::kF32, absl::MakeSpan(o),
                                   absl::MakeSpan(lse))
                      .ok());
      if (p == 47) outs[run] = o;
    }
    EXPECT_GT(Merged(*seq), 0);
    auto held = engine_->HeldPositions(*seq, LayerId(0), HeadId(0));
    ASSERT_TRUE(held.ok());
    EXPECT_LE(held->size(), size_t{kSinks + kRecent + 4});
  }
  EXPECT_EQ(outs[0], outs[1]);
}

// A fork shares its parent's pages: merges into them are skipped (their sources simply dropped),
// so the parent's outputs never change.
TEST_F(MergeEngineTest, ForkedPagesAreNeverWritten) {
  KvHistory history(layout_);
  auto parent = engine_->CreateSequence("l", Spec(V1Placement::DEVICE_ONLY, Merge::kMean));
  ASSERT_TRUE(parent.ok());
  const KvChunk first = Chunk(history, 0, 12, 12, 0.0f, 1);
  ASSERT_TRUE(engine_->Append(*parent, LayerId(0), first.k, first.v, 12, DType::kF32).ok());
  const double before = AttendError(*parent, history, 5);
  auto child = engine_->Fork(*parent);
  ASSERT_TRUE(child.ok());
  KvHistory scratch(layout_);
  const KvChunk more = Chunk(scratch, 12, 8, 20, 0.0f, 2);
  ASSERT_TRUE(engine_->Append(*child, LayerId(0), more.k, more.v, 8, DType::kF32).ok());
  EXPECT_EQ(AttendError(*parent, history, 5), before);
  EXPECT_LT(before, 2e-5);
  auto stats = engine_->GetSequenceStats(*child);
  ASSERT_TRUE(stats.ok());
  EXPECT_GT(stats->evicted_tokens, 0);
  EXPECT_EQ(stats->merged_tokens, 0);
}

}  // namespace
}  // namespace headwise
