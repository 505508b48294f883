// The EngineTest fixture shared by engine_test.cc and engine_roles_errors_test.cc: a small
// layout, policy specs by placement, budget checks after every operation, and appends/attends
// checked against the float64 reference of tests/engine/engine_fixture.h.
#ifndef HEADWISE_TESTS_ENGINE_ENGINE_TEST_BASE_H_
#define HEADWISE_TESTS_ENGINE_ENGINE_TEST_BASE_H_

#include <stdlib.h>

#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "cachesvc/engine.h"
#include "gtest/gtest.h"
#include "tests/engine/engine_fixture.h"

namespace headwise::engine_testing {

using testing::KvChunk;
using testing::KvHistory;
using testing::MaxRelDiff;
using testing::MaxRelError;
using testing::RandomFloats;

inline constexpr double kTol = 1e-5;

inline ModelLayout SmallLayout(DType dtype = DType::kF32) {
  ModelLayout l;
  l.num_layers = 3;
  l.num_q_heads = 8;
  l.num_kv_heads = 4;
  l.head_dim = 16;
  l.dtype = dtype;
  l.page_tokens = 4;
  return l;
}

inline headwise::v1::PolicySpec Spec(headwise::v1::Placement::Mode mode) {
  headwise::v1::PolicySpec spec;
  spec.mutable_placement()->set_mode(mode);
  return spec;
}

inline std::string TempDir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "engine_test_XXXXXX").string();
  char* dir = mkdtemp(tmpl.data());
  EXPECT_NE(dir, nullptr);
  return tmpl;
}

// Budgets hold after every operation.
inline void ExpectWithinBudgets(const Engine& engine) {
  const EngineStats s = engine.GetStats();
  EXPECT_LE(s.device.used_bytes, s.device.budget_bytes);
  EXPECT_LE(s.host.used_bytes, s.host.budget_bytes);
  EXPECT_LE(s.device.peak_bytes, s.device.budget_bytes);
  EXPECT_LE(s.host.peak_bytes, s.host.budget_bytes);
}

class EngineTest : public ::testing::Test {
 protected:
  void MakeEngine(EngineOptions options, const ModelLayout& layout) {
    layout_ = layout;
    auto engine = Engine::Create(options);
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = std::move(*engine);
    ASSERT_TRUE(engine_->RegisterLayout("small", layout_).ok());
  }

  // Appends one step of `tokens` tokens to every layer of `seq` (recording into `history`).
  void AppendStep(const SequenceId& seq, KvHistory& history, int tokens, uint32_t seed) {
    for (int l = 0; l < layout_.num_layers; ++l) {
      const KvChunk c = history.MakeChunk(tokens, seed * 131 + l);
      const absl::Status st =
          engine_->Append(seq, LayerId(l), c.k, c.v, c.num_tokens, layout_.dtype);
      ASSERT_TRUE(st.ok()) << st << " layer " << l << " tokens " << tokens << " host pages "
                           << engine_->GetStats().host_pages << " disk pages "
                           << engine_->GetStats().disk_pages;
      history.Record(l, c);
      ExpectWithinBudgets(*engine_);
    }
  }

  // Attends every layer and compares with the reference; returns the outputs concatenated.
  std::vector<float> AttendAndCheck(const SequenceId& seq, const KvHistory& history, uint32_t seed,
                                    const std::function<bool(int, int, int64_t)>& keep = nullptr) {
    std::vector<float> all;
    const int hq = layout_.num_q_heads, d = layout_.head_dim;
    for (int l = 0; l < layout_.num_layers; ++l) {
      const std::vector<float> q = RandomFloats(int64_t{hq} * d, seed * 7 + l);
      std::vector<float> o(hq * d), lse(hq);
      const absl::Status st =
          engine_->Attend(seq, LayerId(l), q, absl::MakeSpan(o), absl::MakeSpan(lse));
      EXPECT_TRUE(st.ok()) << st;
      std::vector<double> ro, rlse;
      std::function<bool(int, int64_t)> k;
      if (keep) k = [&](int h, int64_t p) { return keep(l, h, p); };
      history.Reference(l, q, &ro, &rlse, k);
      EXPECT_LT(MaxRelError(o.data(), ro), kTol) << "layer " << l;
      EXPECT_LT(MaxRelError(lse.data(), rlse), kTol) << "layer " << l;
      all.insert(all.end(), o.begin(), o.end());
      ExpectWithinBudgets(*engine_);
    }
    return all;
  }

  ModelLayout layout_;
  std::unique_ptr<Engine> engine_;
};

}  // namespace headwise::engine_testing

#endif  // HEADWISE_TESTS_ENGINE_ENGINE_TEST_BASE_H_
