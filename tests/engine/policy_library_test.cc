// The policy library on the engine: each score-driven method (TOVA, key norm, Scissorhands) and
// the head budgets (AdaKV, PyramidKV) on generated K/V whose answer is known, through real
// Append / DecodeStep calls. Each shows the method's qualitative behaviour (a token every query
// attends to strongly survives attention-driven eviction; key norm keeps the low-norm keys;
// AdaKV gives a dispersed head more slots than a concentrated one; PyramidKV gives lower layers
// more) and that the bytes the engine reports (GetSequenceStats) shrink with the budget.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "cachesvc/engine.h"
#include "gtest/gtest.h"
#include "policies/accounting.h"
#include "policies/eviction.h"
#include "tests/engine/engine_fixture.h"

namespace headwise {
namespace {

using testing::RandomFloats;

constexpr int kDim = 16;
constexpr int64_t kNeedle = 5;

ModelLayout Layout() {
  ModelLayout l;
  l.num_layers = 2;
  l.num_q_heads = 4;
  l.num_kv_heads = 2;
  l.head_dim = kDim;
  l.dtype = DType::kF32;
  l.page_tokens = 4;
  return l;
}

// The direction every query looks along.
std::vector<float> Direction() {
  std::vector<float> u(kDim, 0.0f);
  u[0] = 1.0f;
  return u;
}

std::vector<std::byte> Bytes(const std::vector<float>& v) {
  std::vector<std::byte> b(v.size() * sizeof(float));
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

// Keys of tokens [first, first + n) of one layer: key(pos, head) gives each key.
using KeyFn = std::function<std::vector<float>(int64_t pos, int head)>;

class PolicyLibraryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto engine = Engine::Create({});
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = std::move(*engine);
    ASSERT_TRUE(engine_->RegisterLayout("l", layout_).ok());
  }

  // Random keys (stddev 1), except the needle, whose key is 8u on every head.
  static std::vector<float> NeedleKey(int64_t pos, int head, uint32_t seed) {
    if (pos == kNeedle) {
      std::vector<float> k = Direction();
      for (float& x : k) x *= 8.0f;
      return k;
    }
    return RandomFloats(kDim, seed + static_cast<uint32_t>(pos * 7 + head));
  }

  std::vector<float> Keys(int64_t first, int n, const KeyFn& key) const {
    std::vector<float> k;
    for (int64_t p = first; p < first + n; ++p) {
      for (int h = 0; h < layout_.num_kv_heads; ++h) {
        const std::vector<float> one = key(p, h);
        k.insert(k.end(), one.begin(), one.end());
      }
    }
    return k;
  }

  // Appends tokens [first, first + n) to every layer in one chunk.
  void Prefill(const SequenceId& seq, int64_t first, int n, const KeyFn& key) {
    for (int l = 0; l < layout_.num_layers; ++l) {
      const std::vector<float> v =
          RandomFloats(int64_t{n} * layout_.num_kv_heads * kDim, 77 + l + first);
      ASSERT_TRUE(
          engine_->Append(seq, LayerId(l), Bytes(Keys(first, n, key)), Bytes(v), n, layout_.dtype)
              .ok());
    }
  }

  // One decode step at position `pos` on every layer; every query head looks along u (scale 3).
  void Decode(const SequenceId& seq, int64_t pos, const KeyFn& key) {
    std::vector<float> q;
    for (int h = 0; h < layout_.num_q_heads; ++h) {
      for (float x : Direction()) q.push_back(3.0f * x);
    }
    for (int l = 0; l < layout_.num_layers; ++l) {
      std::vector<float> o(q.size()), lse(layout_.num_q_heads);
      const std::vector<float> v = RandomFloats(int64_t{layout_.num_kv_heads} * kDim, 900 + pos);
      ASSERT_TRUE(engine_
                      ->DecodeStep(seq, LayerId(l), q, Bytes(Keys(pos, 1, key)), Bytes(v),
                                   layout_.dtype, absl::MakeSpan(o), absl::MakeSpan(lse))
                      .ok());
    }
  }

  std::vector<int64_t> Held(const SequenceId& seq, int layer, int head) {
    auto held = engine_->HeldPositions(seq, LayerId(layer), HeadId(head));
    EXPECT_TRUE(held.ok()) << held.status();
    return held.ok() ? *held : std::vector<int64_t>{};
  }

  SequenceStats Stats(const SequenceId& seq) {
    auto stats = engine_->GetSequenceStats(seq);
    EXPECT_TRUE(stats.ok()) << stats.status();
    return stats.ok() ? *stats : SequenceStats{};
  }

  SequenceId Create(const headwise::v1::PolicySpec& spec) {
    auto seq = engine_->CreateSequence("l", spec);
    EXPECT_TRUE(seq.ok()) << seq.status();
    return *seq;
  }

  // Prefill 24 tokens with a needle at kNeedle, then `steps` decode steps; returns the stats.
  SequenceStats RunNeedle(const headwise::v1::PolicySpec& spec, int steps,
                          std::function<void(const SequenceId&)> check) {
    const SequenceId seq = Create(spec);
    const KeyFn key = [](int64_t p, int h) { return NeedleKey(p, h, 11); };
    Prefill(seq, 0, 24, key);
    for (int s = 0; s < steps; ++s) Decode(seq, 24 + s, key);
    check(seq);
    const SequenceStats stats = Stats(seq);
    EXPECT_TRUE(engine_->Release(seq).ok());
    return stats;
  }

  ModelLayout layout_ = Layout();
  std::unique_ptr<Engine> engine_;
};

headwise::v1::PolicySpec WithUniformBudget(int64_t tokens) {
  headwise::v1::PolicySpec spec;
  spec.mutable_budget()->mutable_uniform()->set_tokens(tokens);
  return spec;
}

TEST_F(PolicyLibraryTest, TovaKeepsTheTokenEveryQueryAttendsToAndShrinksWithTheBudget) {
  std::vector<int64_t> bytes;
  for (int64_t budget : {6, 12}) {
    headwise::v1::PolicySpec spec = WithUniformBudget(budget);
    spec.mutable_eviction()->mutable_tova();
    const SequenceStats stats = RunNeedle(spec, 10, [&](const SequenceId& seq) {
      for (int l = 0; l < layout_.num_layers; ++l) {
        for (int h = 0; h < layout_.num_kv_heads; ++h) {
          const std::vector<int64_t> held = Held(seq, l, h);
          EXPECT_EQ(static_cast<int64_t>(held.size()), budget) << l << "/" << h;
          EXPECT_TRUE(std::binary_search(held.begin(), held.end(), kNeedle)) << l << "/" << h;
          EXPECT_EQ(held.back(), 33);  // The newest token.
        }
      }
    });
    EXPECT_EQ(stats.retained_tokens, layout_.num_layers * layout_.num_kv_heads * budget);
    // The accounting formula: the same tokens, and at least the bytes the engine holds.
    auto eviction = ResolveEvictionSpec(spec);
    ASSERT_TRUE(eviction.ok());
    auto footprint = ComputeKvFootprint(layout_, 34, UniformRoles(layout_), *eviction);
    ASSERT_TRUE(footprint.ok());
    EXPECT_EQ(footprint->retained_tokens, stats.retained_tokens);
    EXPECT_LE(stats.device_bytes, footprint->retained_bytes);
    bytes.push_back(stats.device_bytes);
  }
  headwise::v1::PolicySpec full;
  bytes.push_back(RunNeedle(full, 10, [](const SequenceId&) {}).device_bytes);
  EXPECT_LT(bytes[0], bytes[1]);
  EXPECT_LT(bytes[1], bytes[2]);
  // Full: 34 tokens in 9 pages per head, 4 heads.
  EXPECT_EQ(bytes[2], 4 * 9 * layout_.page_bytes());
}

// TOVA against a float64 model: at every decode step each kv head attends over what it holds,
// p_j = mean over the group's query heads of softmax(q . k_j / sqrt(d)), and keeps the newest
// plus the B - 1 older tokens with the largest p_j. Fresh random keys and queries.
TEST_F(PolicyLibraryTest, TovaMatchesAFloat64ModelStepByStep) {
  constexpr int64_t kBudget = 6;
  headwise::v1::PolicySpec spec = WithUniformBudget(kBudget);
  spec.mutable_eviction()->mutable_tova();
  const SequenceId seq = Create(spec);
  const KeyFn key = [](int64_t p, int h) {
    return RandomFloats(kDim, 5000 + static_cast<uint32_t>(p * 13 + h));
  };
  Prefill(seq, 0, 12, key);
  const int g = layout_.group_size();
  // held[l][h]: the model's positions.
  std::vector<std::vector<std::vector<int64_t>>> held(
      layout_.num_layers, std::vector<std::vector<int64_t>>(layout_.num_kv_heads));
  for (auto& layer : held) {
    for (auto& h : layer) {
      for (int64_t p = 0; p < 12; ++p) h.push_back(p);
    }
  }
  int resyncs = 0;
  for (int64_t pos = 12; pos < 40; ++pos) {
    const std::vector<float> q = RandomFloats(int64_t{layout_.num_q_heads} * kDim, 7000 + pos);
    for (int l = 0; l < layout_.num_layers; ++l) {
      std::vector<float> o(q.size()), lse(layout_.num_q_heads);
      const std::vector<float> v = RandomFloats(int64_t{layout_.num_kv_heads} * kDim, 900 + pos);
      ASSERT_TRUE(engine_
                      ->DecodeStep(seq, LayerId(l), q, Bytes(Keys(pos, 1, key)), Bytes(v),
                                   layout_.dtype, absl::MakeSpan(o), absl::MakeSpan(lse))
                      .ok());
      for (int h = 0; h < layout_.num_kv_heads; ++h) {
        std::vector<int64_t>& model = held[l][h];
        model.push_back(pos);
        std::vector<double> p(model.size(), 0.0);
        for (int qh = h * g; qh < (h + 1) * g; ++qh) {
          std::vector<double> s(model.size());
          double m = -INFINITY, z = 0;
          for (size_t j = 0; j < model.size(); ++j) {
            const std::vector<float> k = key(model[j], h);
            double dot = 0;
            for (int c = 0; c < kDim; ++c) dot += double{q[qh * kDim + c]} * k[c];
            s[j] = dot / std::sqrt(double{kDim});
            m = std::max(m, s[j]);
          }
          for (double& x : s) z += (x = std::exp(x - m));
          for (size_t j = 0; j < model.size(); ++j) p[j] += s[j] / z / g;
        }
        if (static_cast<int64_t>(model.size()) > kBudget) {
          std::vector<size_t> order(model.size() - 1);
          for (size_t j = 0; j < order.size(); ++j) order[j] = j;
          std::stable_sort(order.begin(), order.end(),
                           [&](size_t a, size_t b) { return p[a] > p[b]; });
          std::vector<int64_t> keep = {model.back()};
          for (int64_t j = 0; j + 1 < kBudget; ++j) keep.push_back(model[order[j]]);
          std::sort(keep.begin(), keep.end());
          const std::vector<int64_t> engine = Held(seq, l, h);
          if (engine != keep) {
            // Only a near-tie at the boundary (fp32 vs float64) may decide differently.
            const double last_kept = p[order[kBudget - 2]], first_dropped = p[order[kBudget - 1]];
            ASSERT_LT(last_kept - first_dropped, 1e-5) << "layer " << l << " head " << h;
            keep = engine;
            ++resyncs;
          }
          model = keep;
        }
      }
    }
  }
  EXPECT_LE(resyncs, 2);
  EXPECT_TRUE(engine_->Release(seq).ok());
}

TEST_F(PolicyLibraryTest, TovaWaitsForAQueryBeforeCuttingAPrefill) {
  headwise::v1::PolicySpec spec = WithUniformBudget(6);
  spec.mutable_eviction()->mutable_tova();
  const SequenceId seq = Create(spec);
  const KeyFn key = [](int64_t p, int h) { return NeedleKey(p, h, 3); };
  Prefill(seq, 0, 24, key);
  EXPECT_EQ(Held(seq, 0, 0).size(), 24u);  // No query has scored the prompt yet.
  Decode(seq, 24, key);
  EXPECT_EQ(Held(seq, 0, 0).size(), 6u);
  EXPECT_TRUE(engine_->Release(seq).ok());
}

TEST_F(PolicyLibraryTest, ScissorhandsKeepsThePersistentlyImportantToken) {
  std::vector<int64_t> bytes;
  for (int64_t budget : {8, 16}) {
    headwise::v1::PolicySpec spec = WithUniformBudget(budget);
    spec.mutable_eviction()->mutable_scissorhands()->set_recent_tokens(2);
    const SequenceStats stats = RunNeedle(spec, 12, [&](const SequenceId& seq) {
      for (int l = 0; l < layout_.num_layers; ++l) {
        for (int h = 0; h < layout_.num_kv_heads; ++h) {
          const std::vector<int64_t> held = Held(seq, l, h);
          EXPECT_LE(static_cast<int64_t>(held.size()), budget) << l << "/" << h;
          EXPECT_TRUE(std::binary_search(held.begin(), held.end(), kNeedle)) << l << "/" << h;
          EXPECT_EQ(held.back(), 35);
        }
      }
    });
    EXPECT_GT(stats.evicted_tokens, 0);
    bytes.push_back(stats.device_bytes);
  }
  EXPECT_LT(bytes[0], bytes[1]);
}

TEST_F(PolicyLibraryTest, KeyNormKeepsTheLowNormKeysAndTheRecentWindow) {
  // Keys of norm ~4 except positions 3, 7, 11 and 20, scaled to 0.05 of that.
  const KeyFn key = [](int64_t p, int h) {
    std::vector<float> k = RandomFloats(kDim, 40 + static_cast<uint32_t>(p * 5 + h));
    const bool low = p == 3 || p == 7 || p == 11 || p == 20;
    for (float& x : k) x *= low ? 0.05f : 1.0f;
    return k;
  };
  std::vector<int64_t> bytes;
  for (int64_t budget : {6, 12}) {
    headwise::v1::PolicySpec spec = WithUniformBudget(budget);
    spec.mutable_eviction()->mutable_key_norm()->set_recent_tokens(2);
    const SequenceId seq = Create(spec);
    Prefill(seq, 0, 32, key);  // Scored from the keys at once: decided on the append.
    for (int l = 0; l < layout_.num_layers; ++l) {
      for (int h = 0; h < layout_.num_kv_heads; ++h) {
        const std::vector<int64_t> held = Held(seq, l, h);
        ASSERT_EQ(static_cast<int64_t>(held.size()), budget);
        for (int64_t p : {3, 7, 11, 20, 30, 31}) {
          EXPECT_TRUE(std::binary_search(held.begin(), held.end(), p)) << p;
        }
      }
    }
    const SequenceStats stats = Stats(seq);
    auto footprint =
        ComputeKvFootprint(layout_, 32, UniformRoles(layout_), *ResolveEvictionSpec(spec));
    ASSERT_TRUE(footprint.ok());
    EXPECT_EQ(footprint->retained_tokens, stats.retained_tokens);
    EXPECT_LE(stats.device_bytes, footprint->retained_bytes);
    bytes.push_back(stats.device_bytes);
    EXPECT_TRUE(engine_->Release(seq).ok());
  }
  EXPECT_LT(bytes[0], bytes[1]);
  // Budget 6 holds exactly the six: 3 7 | 11 | 20 | 30 31, compacted into 2 pages per head.
  EXPECT_LE(bytes[0], 4 * 4 * layout_.page_bytes());
}

TEST_F(PolicyLibraryTest, AdaKvGivesTheDispersedHeadMoreSlots) {
  // kv head 0: the needle takes most of the attention; kv head 1: all keys equal (uniform).
  const KeyFn key = [](int64_t p, int h) {
    if (h == 1) return std::vector<float>(kDim, 0.25f);
    return NeedleKey(p, h, 21);
  };
  headwise::v1::PolicySpec spec;
  spec.mutable_budget()->mutable_ada_kv()->set_tokens(8);
  spec.mutable_budget()->mutable_ada_kv()->set_floor_alpha(0.2);
  spec.mutable_eviction()->mutable_tova();
  const SequenceId seq = Create(spec);
  Prefill(seq, 0, 24, key);
  for (int s = 0; s < 4; ++s) Decode(seq, 24 + s, key);
  for (int l = 0; l < layout_.num_layers; ++l) {
    const std::vector<int64_t> h0 = Held(seq, l, 0), h1 = Held(seq, l, 1);
    EXPECT_LT(h0.size(), h1.size()) << l;
    EXPECT_LE(h0.size() + h1.size(), 16u) << l;  // H * B.
    EXPECT_TRUE(std::binary_search(h0.begin(), h0.end(), kNeedle));
    // The floor: floor(0.2 * 8) = 1 slot at least, and the newest token.
    EXPECT_GE(h0.size(), 1u);
  }
  EXPECT_LE(Stats(seq).retained_tokens, 2 * 16);
  EXPECT_TRUE(engine_->Release(seq).ok());
}

TEST_F(PolicyLibraryTest, PyramidKvGivesTheLowerLayerMore) {
  const KeyFn key = [](int64_t p, int h) { return NeedleKey(p, h, 31); };
  headwise::v1::PolicySpec spec;
  spec.mutable_budget()->mutable_pyramid_kv()->set_tokens(8);
  spec.mutable_eviction()->mutable_key_norm()->set_recent_tokens(1);
  const SequenceId seq = Create(spec);
  Prefill(seq, 0, 32, key);
  // S = 32 >= 2B: min = floor(8 / 20) = 0, max = 16; L = 2: layer 0 gets 16, layer 1 gets 0
  // (it still keeps its newest token).
  for (int h = 0; h < layout_.num_kv_heads; ++h) {
    EXPECT_EQ(Held(seq, 0, h).size(), 16u);
    EXPECT_EQ(Held(seq, 1, h), (std::vector<int64_t>{31}));
  }
  EXPECT_EQ(Stats(seq).retained_tokens, 2 * 16 + 2 * 1);
  EXPECT_TRUE(engine_->Release(seq).ok());
}

}  // namespace
}  // namespace headwise
