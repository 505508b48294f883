// SnapKV on the engine (policies.md §5.5): a Prefill call's last w queries vote, each kv head
// keeps its top pooled votes plus the window. Checks the held positions against a float64
// re-derivation of the rule (every placement), the memory held, and the published behaviour on
// a generated needle: kept when the question is in the window (query-aware), lost at 8x
// compression when the context is compressed before the question arrives (query-agnostic).
#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <vector>

#include "cachesvc/engine.h"
#include "gtest/gtest.h"
#include "policies/snapkv.h"
#include "tests/engine/engine_fixture.h"

namespace headwise {
namespace {

using testing::KvChunk;
using testing::KvHistory;
using testing::RandomFloats;

constexpr int kDim = 32;
constexpr int kContext = 512;
constexpr int kQuestion = 16;
constexpr int64_t kNeedle = 100;
constexpr int kCapacity = 64;

ModelLayout Layout() {
  return ModelLayout{.num_layers = 1,
                     .num_q_heads = 4,
                     .num_kv_heads = 2,
                     .head_dim = kDim,
                     .dtype = DType::kF32,
                     .page_tokens = 8};
}

headwise::v1::PolicySpec SnapSpec(headwise::v1::Placement::Mode mode) {
  headwise::v1::PolicySpec spec;
  spec.mutable_placement()->set_mode(mode);
  auto* s = spec.mutable_eviction()->mutable_snapkv();
  s->set_window_tokens(kQuestion);
  s->set_capacity_tokens(kCapacity);
  return spec;
}

class SnapKvEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto engine = Engine::Create({});
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = std::move(*engine);
    ASSERT_TRUE(engine_->RegisterLayout("l", layout_).ok());
  }

  // Context tokens [first, first + n): random keys with channel 0 zeroed, so context queries
  // (also zero there) do not single out the needle, whose key is 16 along channel 0. Question
  // queries look along channel 0.
  KvChunk Chunk(int64_t first, int n, uint32_t seed, bool question) {
    KvChunk c = history_.MakeChunk(n, seed);
    float* k = reinterpret_cast<float*>(c.k.data());
    for (int t = 0; t < n; ++t) {
      for (int h = 0; h < layout_.num_kv_heads; ++h) {
        float* key = k + (int64_t{t} * layout_.num_kv_heads + h) * kDim;
        key[0] = 0.0f;
        if (first + t == kNeedle) {
          for (int i = 0; i < kDim; ++i) key[i] = i == 0 ? 16.0f : 0.0f;
        }
      }
    }
    std::vector<float> q = RandomFloats(int64_t{n} * layout_.num_q_heads * kDim, seed + 1);
    for (int t = 0; t < n; ++t) {
      for (int r = 0; r < layout_.num_q_heads; ++r) {
        q[(int64_t{t} * layout_.num_q_heads + r) * kDim] = question ? 4.0f : 0.0f;
      }
    }
    queries_.insert(queries_.end(), q.begin(), q.end());
    return c;
  }

  absl::Status Prefill(const SequenceId& seq, const KvChunk& c, int64_t first) {
    history_.Record(0, c);
    const int n = c.num_tokens;
    const std::vector<float> q(queries_.begin() + first * layout_.num_q_heads * kDim,
                               queries_.begin() + (first + n) * layout_.num_q_heads * kDim);
    std::vector<float> o(q.size());
    return engine_->Prefill(seq, LayerId(0), q, c.k, c.v, n, DType::kF32, absl::MakeSpan(o), {});
  }

  // The rule in double: votes of the last kQuestion queries over tokens [0, n) (causal), mean
  // over the group, avg-pooled (kernel 5) over 0..n-w-1, top C - w plus the window.
  std::vector<int64_t> Expected(int h, int64_t n) const {
    const int g = layout_.group_size();
    const int w = kQuestion;
    std::vector<double> vote(n, 0.0);
    for (int64_t t = n - w; t < n; ++t) {
      for (int r = 0; r < g; ++r) {
        const float* q = queries_.data() + (t * layout_.num_q_heads + h * g + r) * kDim;
        std::vector<double> s(t + 1);
        double mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j <= t; ++j) {
          double dot = 0;
          for (int c = 0; c < kDim; ++c) dot += double{q[c]} * history_.K(0, h, j, c);
          s[j] = dot / std::sqrt(double{kDim});
          mx = std::max(mx, s[j]);
        }
        for (double& x : s) sum += (x = std::exp(x - mx));
        for (int64_t j = 0; j <= t; ++j) vote[j] += s[j] / sum / g;
      }
    }
    const int64_t prefix = n - w;
    std::vector<double> pooled(prefix);
    for (int64_t j = 0; j < prefix; ++j) {
      for (int64_t i = std::max<int64_t>(0, j - 2); i <= std::min(prefix - 1, j + 2); ++i) {
        pooled[j] += vote[i] / 5;
      }
    }
    std::vector<int64_t> order(prefix);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return pooled[a] > pooled[b]; });
    std::vector<int64_t> keep(order.begin(), order.begin() + (kCapacity - w));
    for (int64_t p = prefix; p < n; ++p) keep.push_back(p);
    std::sort(keep.begin(), keep.end());
    return keep;
  }

  std::vector<int64_t> Held(const SequenceId& seq, int h) {
    auto held = engine_->HeldPositions(seq, LayerId(0), HeadId(h));
    EXPECT_TRUE(held.ok()) << held.status();
    return held.ok() ? *held : std::vector<int64_t>{};
  }

  ModelLayout layout_ = Layout();
  KvHistory history_{layout_};
  std::vector<float> queries_;  // [position][num_q_heads][head_dim], as prefilled.
  std::unique_ptr<Engine> engine_;
};

TEST_F(SnapKvEngineTest, QueryAwareKeepsTheNeedleAndMatchesTheRuleInEveryPlacement) {
  const KvChunk context = Chunk(0, kContext, 21, /*question=*/false);
  const KvChunk question = Chunk(kContext, kQuestion, 22, /*question=*/true);
  // One Prefill call of context + question: the question is the observation window.
  KvChunk both;
  both.num_tokens = kContext + kQuestion;
  both.k = context.k;
  both.k.insert(both.k.end(), question.k.begin(), question.k.end());
  both.v = context.v;
  both.v.insert(both.v.end(), question.v.begin(), question.v.end());
  for (auto mode : {headwise::v1::Placement::DEVICE_ONLY, headwise::v1::Placement::LAYER_OFFLOAD,
                    headwise::v1::Placement::HEAD_OFFLOAD}) {
    history_ = KvHistory(layout_);
    auto seq = engine_->CreateSequence("l", SnapSpec(mode));
    ASSERT_TRUE(seq.ok()) << seq.status();
    ASSERT_TRUE(Prefill(*seq, both, 0).ok());
    for (int h = 0; h < layout_.num_kv_heads; ++h) {
      const std::vector<int64_t> held = Held(*seq, h);
      EXPECT_EQ(held, Expected(h, kContext + kQuestion)) << "mode " << mode << " head " << h;
      EXPECT_TRUE(std::binary_search(held.begin(), held.end(), kNeedle)) << mode;
    }
    auto stats = engine_->GetSequenceStats(*seq);
    ASSERT_TRUE(stats.ok());
    EXPECT_EQ(stats->retained_tokens, int64_t{kCapacity} * layout_.num_kv_heads);
    // Decode steps append without eviction.
    KvChunk next = history_.MakeChunk(1, 23);
    std::vector<float> q(layout_.num_q_heads * kDim, 0.1f), o(q.size()), lse(4);
    ASSERT_TRUE(engine_
                    ->DecodeStep(*seq, LayerId(0), q, next.k, next.v, DType::kF32,
                                 absl::MakeSpan(o), absl::MakeSpan(lse))
                    .ok());
    stats = engine_->GetSequenceStats(*seq);
    EXPECT_EQ(stats->retained_tokens, int64_t{kCapacity + 1} * layout_.num_kv_heads);
  }
}

TEST_F(SnapKvEngineTest, QueryAgnosticLosesTheNeedleAtHighCompression) {
  auto seq = engine_->CreateSequence("l", SnapSpec(headwise::v1::Placement::DEVICE_ONLY));
  ASSERT_TRUE(seq.ok());
  // The context alone: its own last tokens vote (8x compression), then the question arrives.
  ASSERT_TRUE(Prefill(*seq, Chunk(0, kContext, 21, false), 0).ok());
  for (int h = 0; h < layout_.num_kv_heads; ++h) {
    EXPECT_EQ(Held(*seq, h), Expected(h, kContext)) << h;
  }
  ASSERT_TRUE(Prefill(*seq, Chunk(kContext, kQuestion, 22, true), kContext).ok());
  for (int h = 0; h < layout_.num_kv_heads; ++h) {
    const std::vector<int64_t> held = Held(*seq, h);
    EXPECT_FALSE(std::binary_search(held.begin(), held.end(), kNeedle)) << h;
  }
}

TEST_F(SnapKvEngineTest, HeadBudgetSetsTheCapacity) {
  headwise::v1::PolicySpec spec = SnapSpec(headwise::v1::Placement::DEVICE_ONLY);
  spec.mutable_budget()->mutable_uniform()->set_tokens(40);
  auto seq = engine_->CreateSequence("l", spec);
  ASSERT_TRUE(seq.ok());
  ASSERT_TRUE(Prefill(*seq, Chunk(0, kContext, 31, false), 0).ok());
  auto stats = engine_->GetSequenceStats(*seq);
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->retained_tokens, 40 * layout_.num_kv_heads);
}

}  // namespace
}  // namespace headwise
