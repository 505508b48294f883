// Quest on the engine (policies.md §7.1): a generated needle among random keys, 1024 tokens in
// 64 pages of 16, a 1/16 page budget (4 pages per head). Checks that the needle's page is read,
// that the output equals float64 attention over exactly the pages Quest's formula picks, and
// that under layer_offload only the selected pages move to the device (bytes counted per
// purpose) with the prefetch counts (precision, recall, late pages) adding up.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <set>
#include <vector>

#include "cachesvc/engine.h"
#include "gtest/gtest.h"
#include "tests/engine/engine_fixture.h"

namespace headwise {
namespace {

using testing::KvChunk;
using testing::KvHistory;
using testing::RandomFloats;

constexpr int kDim = 32;
constexpr int kPage = 16;
constexpr int kTokens = 1024;
constexpr int64_t kNeedle = 333;  // Page 20.
constexpr int64_t kBudgetTokens = kTokens / 16;

ModelLayout Layout() {
  return ModelLayout{.num_layers = 2,
                     .num_q_heads = 4,
                     .num_kv_heads = 2,
                     .head_dim = kDim,
                     .dtype = DType::kF32,
                     .page_tokens = kPage};
}

headwise::v1::PolicySpec QuestSpec(headwise::v1::Placement::Mode mode) {
  headwise::v1::PolicySpec spec;
  spec.mutable_placement()->set_mode(mode);
  auto* q = spec.mutable_selection()->mutable_quest();
  q->set_token_budget(kBudgetTokens);
  q->set_dense_layers(0);
  return spec;
}

// The query every head asks with: along channel 0, plus small noise.
std::vector<float> Query(const ModelLayout& l, uint32_t seed) {
  std::vector<float> q = RandomFloats(int64_t{l.num_q_heads} * kDim, seed, 0.1f);
  for (int h = 0; h < l.num_q_heads; ++h) q[h * kDim] += 4.0f;
  return q;
}

class QuestEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto engine = Engine::Create({});
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = std::move(*engine);
    ASSERT_TRUE(engine_->RegisterLayout("l", layout_).ok());
  }

  // kTokens random tokens on every layer; the needle's key is 16 along channel 0 on every head.
  SequenceId Fill(const headwise::v1::PolicySpec& spec) {
    auto seq = engine_->CreateSequence("l", spec);
    EXPECT_TRUE(seq.ok()) << seq.status();
    for (int layer = 0; layer < layout_.num_layers; ++layer) {
      KvChunk c = history_.MakeChunk(kTokens, 100 + layer);
      for (int h = 0; h < layout_.num_kv_heads; ++h) {
        float* k =
            reinterpret_cast<float*>(c.k.data()) + (kNeedle * layout_.num_kv_heads + h) * kDim;
        for (int i = 0; i < kDim; ++i) k[i] = i == 0 ? 16.0f : 0.0f;
      }
      if (history_.length(layer) == 0) history_.Record(layer, c);
      EXPECT_TRUE(engine_->Append(*seq, LayerId(layer), c.k, c.v, kTokens, DType::kF32).ok());
    }
    return *seq;
  }

  // Quest's choice computed here in double from the recorded keys: per kv head, the last page
  // plus the 3 others with the largest max-over-group bound (ties: the older page).
  std::vector<std::set<int64_t>> Expected(int layer, const std::vector<float>& q) const {
    const int64_t n = history_.length(layer);
    const int64_t pages = (n + kPage - 1) / kPage;
    const int g = layout_.group_size();
    std::vector<std::set<int64_t>> out(layout_.num_kv_heads);
    for (int h = 0; h < layout_.num_kv_heads; ++h) {
      std::vector<std::pair<double, int64_t>> u;
      for (int64_t p = 0; p + 1 < pages; ++p) {
        double best = -1e300;
        for (int r = 0; r < g; ++r) {
          double sum = 0;
          for (int c = 0; c < kDim; ++c) {
            double lo = 1e300, hi = -1e300;
            for (int64_t t = p * kPage; t < std::min(n, (p + 1) * kPage); ++t) {
              lo = std::min(lo, double{history_.K(layer, h, t, c)});
              hi = std::max(hi, double{history_.K(layer, h, t, c)});
            }
            const double qc = q[(h * g + r) * kDim + c];
            sum += std::max(qc * lo, qc * hi);
          }
          best = std::max(best, sum);
        }
        u.push_back({-best, p});
      }
      std::sort(u.begin(), u.end());
      out[h].insert(pages - 1);
      for (int i = 0; i < 3; ++i) out[h].insert(u[i].second);
    }
    return out;
  }

  absl::Status Step(const SequenceId& seq, int layer, const std::vector<float>& q,
                    std::vector<float>& o) {
    KvChunk c = history_.MakeChunk(1, 900 + layer);
    history_.Record(layer, c);
    std::vector<float> lse(layout_.num_q_heads);
    o.assign(q.size(), 0.0f);
    return engine_->DecodeStep(seq, LayerId(layer), q, c.k, c.v, DType::kF32, absl::MakeSpan(o),
                               absl::MakeSpan(lse));
  }

  ModelLayout layout_ = Layout();
  KvHistory history_{layout_};
  std::unique_ptr<Engine> engine_;
};

TEST_F(QuestEngineTest, RecallsTheNeedlePageAtOneSixteenthAndMatchesTheReference) {
  const SequenceId seq = Fill(QuestSpec(headwise::v1::Placement::DEVICE_ONLY));
  const std::vector<float> q = Query(layout_, 5);
  std::vector<float> o;
  ASSERT_TRUE(Step(seq, 0, q, o).ok());
  const auto expected = Expected(0, q);
  for (int h = 0; h < layout_.num_kv_heads; ++h) {
    EXPECT_EQ(expected[h].size(), 4u);  // 1/16 of 64 pages (plus the new partial page).
    EXPECT_TRUE(expected[h].count(kNeedle / kPage)) << "head " << h;
  }
  std::vector<double> ref_o, ref_lse;
  history_.Reference(0, q, &ref_o, &ref_lse,
                     [&](int h, int64_t pos) { return expected[h].count(pos / kPage) > 0; });
  EXPECT_LT(testing::MaxRelError(o.data(), ref_o), 1e-4);
  // The needle carries most of the mass, so the sparse output is close to full attention too,
  // and far from attention over the pages without the needle.
  std::vector<double> full_o, full_lse, miss_o, miss_lse;
  history_.Reference(0, q, &full_o, &full_lse);
  history_.Reference(0, q, &miss_o, &miss_lse, [&](int h, int64_t pos) {
    return expected[h].count(pos / kPage) > 0 && pos / kPage != kNeedle / kPage;
  });
  EXPECT_LT(testing::MaxRelError(o.data(), full_o), 0.05);
  EXPECT_GT(testing::MaxRelError(o.data(), miss_o), 0.2);
}

TEST_F(QuestEngineTest, LayerOffloadMovesOnlySelectedPagesAndCountsPrefetch) {
  const SequenceId seq = Fill(QuestSpec(headwise::v1::Placement::LAYER_OFFLOAD));
  const int64_t page_bytes = layout_.page_bytes();
  const std::vector<float> q = Query(layout_, 6);
  const EngineStats before = engine_->GetStats();
  std::vector<float> o;
  // Layer 0: its 4 + 4 selected pages on demand, then layer 1's predicted pages (from layer 0's
  // query: no proxy yet) copied ahead. Layer 1 with the same query: its selection now includes
  // the new partial page (it did not exist when predicted), so at least one page per head is
  // late; layer 0's pages for the next step are copied ahead meanwhile.
  ASSERT_TRUE(Step(seq, 0, q, o).ok());
  ASSERT_TRUE(Step(seq, 1, q, o).ok());
  // Output is exact over the selected pages.
  const auto expected = Expected(1, q);
  std::vector<double> ref_o, ref_lse;
  history_.Reference(1, q, &ref_o, &ref_lse,
                     [&](int h, int64_t pos) { return expected[h].count(pos / kPage) > 0; });
  EXPECT_LT(testing::MaxRelError(o.data(), ref_o), 1e-4);
  auto stats = engine_->GetSequenceStats(seq);
  ASSERT_TRUE(stats.ok());
  const PrefetchCounts p = stats->prefetch;
  EXPECT_EQ(p.prefetched_pages, 16);  // 8 for layer 1, 8 for layer 0's next step.
  EXPECT_EQ(p.needed_pages, 16);      // 8 per layer.
  EXPECT_EQ(p.used_pages + p.late_pages, p.needed_pages);
  EXPECT_GE(p.late_pages, 8 + 2);  // Layer 0 all late; layer 1's new pages.
  EXPECT_GT(p.used_pages, 0);
  EXPECT_EQ(p.late_bytes, p.late_pages * page_bytes);
  // Releasing waits for the copies in flight; then the bytes per purpose are final.
  ASSERT_TRUE(engine_->Release(seq).ok());
  const EngineStats after = engine_->GetStats();
  const auto moved = [&](CopyPriority c) {
    return after.bytes_by_purpose[static_cast<int>(c)] -
           before.bytes_by_purpose[static_cast<int>(c)];
  };
  EXPECT_EQ(moved(CopyPriority::kDemandFetch), static_cast<uint64_t>(p.late_pages * page_bytes));
  EXPECT_EQ(moved(CopyPriority::kPrefetch), static_cast<uint64_t>(p.prefetched_pages * page_bytes));
  EXPECT_EQ(after.prefetch.late_pages - before.prefetch.late_pages, p.late_pages);
  // Every page of a layer would be 65 per head: Quest moved 1/16 of that.
  EXPECT_LT(after.bytes_host_to_device - before.bytes_host_to_device,
            static_cast<uint64_t>(2 * 65 * 2 * page_bytes / 4));
}

TEST_F(QuestEngineTest, TransferBudgetCapsThePrefetch) {
  headwise::v1::PolicySpec spec = QuestSpec(headwise::v1::Placement::LAYER_OFFLOAD);
  spec.mutable_selection()->set_prefetch_pages_per_layer(3);
  const SequenceId seq = Fill(spec);
  std::vector<float> o;
  ASSERT_TRUE(Step(seq, 0, Query(layout_, 7), o).ok());
  auto stats = engine_->GetSequenceStats(seq);
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->prefetch.prefetched_pages, 3);
  spec.mutable_selection()->set_prefetch_pages_per_layer(-1);
  EXPECT_EQ(engine_->CreateSequence("l", spec).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace headwise
