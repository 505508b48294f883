// Engine tests: DuoAttention roles from the real gate files, bad inputs and their codes, and
// eight threads on eight sequences.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "cachesvc/engine.h"
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

std::string RealGateFile() {
  namespace fs = std::filesystem;
  const fs::path root = fs::path(HEADWISE_SHARED_DIR) / "data/attention/duo_attention";
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return "";
  std::vector<std::string> files;
  for (const auto& entry : fs::recursive_directory_iterator(root, ec)) {
    if (entry.path().filename() == "full_attention_heads.tsv") files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  return files.empty() ? "" : files.front();
}

TEST_F(EngineTest, DuoAttentionRolesFromRealTsv) {
  const std::string tsv = RealGateFile();
  if (tsv.empty()) GTEST_SKIP() << "shared data directory absent: " << HEADWISE_SHARED_DIR;
  // As the daemon does it: the spec names the pattern inside a configured pattern directory.
  const std::filesystem::path root =
      std::filesystem::path(HEADWISE_SHARED_DIR) / "data/attention/duo_attention/attn_patterns";
  const std::string name =
      std::filesystem::path(tsv).parent_path().lexically_relative(root).string();
  auto patterns = PatternDirectory::Open(root.string());
  ASSERT_TRUE(patterns.ok()) << patterns.status();
  auto gates = (*patterns)->LoadGates(name);
  ASSERT_TRUE(gates.ok()) << gates.status();
  ModelLayout layout;
  layout.num_layers = gates->num_layers;
  layout.num_kv_heads = gates->num_kv_heads;
  layout.num_q_heads = gates->num_kv_heads * 2;
  layout.head_dim = 8;
  layout.dtype = DType::kF32;
  layout.page_tokens = 2;
  EngineOptions options;
  options.patterns = patterns->get();
  MakeEngine(options, layout);
  headwise::v1::PolicySpec spec = Spec(headwise::v1::Placement::DEVICE_ONLY);
  spec.mutable_head_roles()->mutable_duo_attention()->set_pattern_name(name);
  spec.mutable_eviction()->mutable_streaming_llm()->set_sink_tokens(2);
  spec.mutable_eviction()->mutable_streaming_llm()->set_recent_tokens(4);
  auto seq = engine_->CreateSequence("small", spec);
  ASSERT_TRUE(seq.ok()) << seq.status();
  auto roles = ResolveHeadRoles(spec.head_roles(), layout, patterns->get());
  ASSERT_TRUE(roles.ok());
  ASSERT_GT(roles->Count(HeadRole::kStreaming), 0);
  ASSERT_GT(roles->Count(HeadRole::kRetrieval), 0);
  KvHistory history(layout_);
  AppendStep(*seq, history, 7, 1);
  AppendStep(*seq, history, 6, 2);
  const int64_t n = 13;
  const SinkRecentWindow window{2, 4};
  auto keep = [&](int l, int h, int64_t p) {
    if (roles->role(LayerId(l), HeadId(h)) == HeadRole::kRetrieval) return true;
    const int64_t first = p / 2 * 2;
    const int64_t count = std::min<int64_t>(2, n - first);
    return PageHoldsSinkOrRecent(first, count, n, window) || first + count == n;
  };
  AttendAndCheck(*seq, history, 3, keep);
  auto ss = engine_->GetSequenceStats(*seq);
  ASSERT_TRUE(ss.ok());
  // Retrieval heads: 7 pages; streaming heads: sink page + pages of 9..12 (3 pages).
  EXPECT_EQ(ss->device_pages,
            roles->Count(HeadRole::kRetrieval) * 7 + roles->Count(HeadRole::kStreaming) * 4);
}

TEST_F(EngineTest, BadInputsGiveTheRightCodes) {
  MakeEngine(EngineOptions{}, SmallLayout(DType::kF16));
  const headwise::v1::PolicySpec spec = Spec(headwise::v1::Placement::DEVICE_ONLY);
  EXPECT_EQ(engine_->CreateSequence("nope", spec).status().code(), absl::StatusCode::kNotFound);
  ModelLayout bad = layout_;
  bad.head_dim = 7;
  EXPECT_EQ(engine_->RegisterLayout("bad", bad).code(), absl::StatusCode::kInvalidArgument);
  ModelLayout other = layout_;
  other.page_tokens = 8;
  EXPECT_EQ(engine_->RegisterLayout("small", other).code(), absl::StatusCode::kAlreadyExists);
  {
    // A second page size is fine, unless a budget holds no page of it.
    EngineOptions tiny;
    tiny.device_budget_bytes = layout_.page_bytes();
    auto engine = Engine::Create(tiny);
    ASSERT_TRUE(engine.ok());
    EXPECT_TRUE((*engine)->RegisterLayout("small", layout_).ok());
    EXPECT_EQ((*engine)->RegisterLayout("other", other).code(),
              absl::StatusCode::kResourceExhausted);
    EXPECT_EQ((*engine)->CreateSequence("other", spec).status().code(),
              absl::StatusCode::kNotFound);
  }
  EXPECT_TRUE(engine_->RegisterLayout("small", layout_).ok());
  headwise::v1::PolicySpec bad_spec = spec;
  bad_spec.mutable_placement()->set_device_head_groups(0);
  EXPECT_EQ(engine_->CreateSequence("small", bad_spec).status().code(),
            absl::StatusCode::kInvalidArgument);

  auto seq = engine_->CreateSequence("small", spec);
  ASSERT_TRUE(seq.ok());
  KvHistory history(layout_);
  const KvChunk c = history.MakeChunk(2, 1);
  const auto unknown = SequenceId(1, 2);
  EXPECT_EQ(engine_->Append(unknown, LayerId(0), c.k, c.v, 2, layout_.dtype).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(engine_->Append(*seq, LayerId(3), c.k, c.v, 2, layout_.dtype).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->Append(*seq, LayerId(-1), c.k, c.v, 2, layout_.dtype).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->Append(*seq, LayerId(0), c.k, c.v, 3, layout_.dtype).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->Append(*seq, LayerId(0), c.k, c.v, 0, layout_.dtype).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      engine_->Append(*seq, LayerId(0), absl::MakeConstSpan(c.k).subspan(1), c.v, 2, layout_.dtype)
          .code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->Append(*seq, LayerId(0), c.k, c.v, 2, DType::kBF16).code(),
            absl::StatusCode::kInvalidArgument);
  // The append rule: layer 0 starts a step of 2; layer 0 may not go on, layer 1 must append 2.
  // Appends out of order are FAILED_PRECONDITION (service.proto's contract), not bad arguments.
  ASSERT_TRUE(engine_->Append(*seq, LayerId(0), c.k, c.v, 2, layout_.dtype).ok());
  EXPECT_EQ(engine_->Append(*seq, LayerId(0), c.k, c.v, 2, layout_.dtype).code(),
            absl::StatusCode::kFailedPrecondition);
  const KvChunk c1 = history.MakeChunk(1, 2);
  EXPECT_EQ(engine_->Append(*seq, LayerId(1), c1.k, c1.v, 1, layout_.dtype).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(engine_->Append(*seq, LayerId(1), c.k, c.v, 2, layout_.dtype).ok());
  // Truncate cannot cut into a step in progress (length() is still 0).
  EXPECT_EQ(engine_->Truncate(*seq, 2).code(), absl::StatusCode::kInvalidArgument);

  const int hq = layout_.num_q_heads, d = layout_.head_dim;
  std::vector<float> q(hq * d, 0.5f), o(hq * d), lse(hq);
  EXPECT_TRUE(engine_->Attend(*seq, LayerId(0), q, absl::MakeSpan(o), absl::MakeSpan(lse)).ok());
  EXPECT_EQ(engine_->Attend(*seq, LayerId(5), q, absl::MakeSpan(o), absl::MakeSpan(lse)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_
                ->Attend(*seq, LayerId(0), absl::MakeConstSpan(q).subspan(1), absl::MakeSpan(o),
                         absl::MakeSpan(lse))
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->Attend(unknown, LayerId(0), q, absl::MakeSpan(o), absl::MakeSpan(lse)).code(),
            absl::StatusCode::kNotFound);
  // An empty layer attends to nothing: o = 0, lse = -inf.
  EXPECT_TRUE(engine_->Attend(*seq, LayerId(2), q, absl::MakeSpan(o), absl::MakeSpan(lse)).ok());
  EXPECT_EQ(o[0], 0.0f);
  EXPECT_TRUE(std::isinf(lse[0]) && lse[0] < 0);

  ASSERT_TRUE(engine_->Release(*seq).ok());
  EXPECT_EQ(engine_->Release(*seq).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(engine_->Append(*seq, LayerId(2), c.k, c.v, 2, layout_.dtype).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(engine_->Attend(*seq, LayerId(0), q, absl::MakeSpan(o), absl::MakeSpan(lse)).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(engine_->Fork(*seq).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(engine_->Truncate(*seq, 0).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(engine_->GetSequenceStats(*seq).status().code(), absl::StatusCode::kNotFound);

  EngineOptions zero;
  zero.host_budget_bytes = 0;
  EXPECT_EQ(Engine::Create(zero).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineTest, EightThreadsOnEightSequencesAreExact) {
  EngineOptions options;
  options.copy_threads = 2;
  MakeEngine(options, SmallLayout(DType::kF32));
  constexpr int kThreads = 8;
  std::vector<std::string> failures(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      const auto mode = t % 3 == 0   ? headwise::v1::Placement::DEVICE_ONLY
                        : t % 3 == 1 ? headwise::v1::Placement::LAYER_OFFLOAD
                                     : headwise::v1::Placement::HEAD_OFFLOAD;
      auto seq = engine_->CreateSequence("small", Spec(mode));
      if (!seq.ok()) {
        failures[t] = std::string(seq.status().message());
        return;
      }
      KvHistory history(layout_);
      const int hq = layout_.num_q_heads, d = layout_.head_dim;
      for (int step = 0; step < 6; ++step) {
        for (int l = 0; l < layout_.num_layers; ++l) {
          const KvChunk c = history.MakeChunk(1 + (step + t) % 5, t * 1000 + step * 10 + l);
          if (!engine_->Append(*seq, LayerId(l), c.k, c.v, c.num_tokens, layout_.dtype).ok()) {
            failures[t] = "append failed";
            return;
          }
          history.Record(l, c);
          const std::vector<float> q = RandomFloats(int64_t{hq} * d, t * 7 + step);
          std::vector<float> o(hq * d), lse(hq);
          if (!engine_->Attend(*seq, LayerId(l), q, absl::MakeSpan(o), absl::MakeSpan(lse)).ok()) {
            failures[t] = "attend failed";
            return;
          }
          std::vector<double> ro, rlse;
          history.Reference(l, q, &ro, &rlse);
          if (MaxRelError(o.data(), ro) > kTol) failures[t] = "wrong output";
        }
      }
      if (t % 2 == 0) {
        auto child = engine_->Fork(*seq);
        if (!child.ok() || !engine_->Release(*child).ok()) failures[t] = "fork/release failed";
      }
      if (!engine_->Release(*seq).ok()) failures[t] = "release failed";
    });
  }
  for (std::thread& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(failures[t], "") << "thread " << t;
  const EngineStats stats = engine_->GetStats();
  EXPECT_EQ(stats.sequences, 0);
  EXPECT_EQ(stats.device_pages + stats.host_pages, 0);
  ExpectWithinBudgets(*engine_);
}

}  // namespace
}  // namespace headwise
