#include "policies/head_roles.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/random/random.h"
#include "gtest/gtest.h"
#include "policies/pattern_directory.h"

namespace headwise {
namespace {

namespace fs = std::filesystem;

// Every full_attention_heads.tsv shipped under the shared data directory.
std::vector<fs::path> RealGateFiles() {
  std::vector<fs::path> files;
  const fs::path root = fs::path(HEADWISE_SHARED_DIR) / "data/attention/duo_attention";
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return files;
  for (const auto& entry : fs::recursive_directory_iterator(root, ec)) {
    if (entry.path().filename() == "full_attention_heads.tsv") files.push_back(entry.path());
  }
  return files;
}

TEST(DuoAttentionGates, ParsesEveryRealFile) {
  const std::vector<fs::path> files = RealGateFiles();
  if (files.empty()) {
    GTEST_SKIP() << "no DuoAttention gate files under " << HEADWISE_SHARED_DIR
                 << "/data/attention/duo_attention (the shared data directory is absent)";
  }
  EXPECT_GE(files.size(), 6u);
  for (const fs::path& file : files) {
    SCOPED_TRACE(file.string());
    absl::StatusOr<DuoAttentionGates> gates = LoadDuoAttentionGates(file.string());
    ASSERT_TRUE(gates.ok()) << gates.status();
    EXPECT_EQ(gates->num_layers, 32);
    // Llama-2-7B is MHA (32 kv heads); the Llama-3 and Mistral models are GQA with 8.
    const int expected_heads = file.string().find("Llama-2-7B") != std::string::npos ? 32 : 8;
    EXPECT_EQ(gates->num_kv_heads, expected_heads);
    ASSERT_EQ(gates->alpha.size(), static_cast<size_t>(32 * expected_heads));
    int ones = 0;
    for (double a : gates->alpha) {
      EXPECT_GE(a, 0.0);
      EXPECT_LE(a, 1.0);
      ones += a == 1.0;
    }
    // Real gates saturate at 1 for many heads: exactly what the tie-breaking noise is for.
    EXPECT_GT(ones, 0);
  }
}

TEST(DuoAttentionGates, RealFilesSparsityMatchesWithinOneHead) {
  const std::vector<fs::path> files = RealGateFiles();
  if (files.empty()) GTEST_SKIP() << "shared data directory absent: " << HEADWISE_SHARED_DIR;
  for (const fs::path& file : files) {
    absl::StatusOr<DuoAttentionGates> gates = LoadDuoAttentionGates(file.string());
    ASSERT_TRUE(gates.ok()) << gates.status();
    const int n = gates->num_layers * gates->num_kv_heads;
    for (double s : {0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0}) {
      SCOPED_TRACE(file.string() + " sparsity " + std::to_string(s));
      absl::StatusOr<HeadRoles> roles = RolesForSparsity(*gates, s);
      ASSERT_TRUE(roles.ok()) << roles.status();
      const int streaming = roles->Count(HeadRole::kStreaming);
      EXPECT_LE(std::abs(streaming - s * n), 1.0) << streaming << " of " << n;
      // The exact count numpy gives for distinct values: n - ceil(s * (n - 1)) retrieval.
      EXPECT_EQ(roles->Count(HeadRole::kRetrieval),
                s >= 1.0 ? 0 : n - static_cast<int>(std::ceil(s * (n - 1))));
    }
  }
}

TEST(DuoAttentionGates, NoNoiseMatchesNumpyOnRealFiles) {
  // Retrieval-head counts from np.clip(np.loadtxt(f, delimiter="\t"), 0, 1) >= np.quantile(a, s)
  // (numpy 1.24, no tie-breaking noise) for s = 0.25, 0.5, 0.75. Ties at the threshold make
  // these differ from n * (1 - s): the reason the authors add noise.
  const std::map<std::string, std::vector<int>> expected = {
      {"Llama-2-7B-32K-Instruct", {1024, 512, 258}},
      {"Llama-3-8B-Instruct-Gradient-1048k", {192, 130, 82}},
      {"Llama-3-8B-Instruct-Gradient-4194k", {193, 131, 80}},
      {"Meta-Llama-3.1-8B-Instruct", {192, 128, 66}},
      {"Mistral-7B-Instruct-v0.2", {193, 130, 110}},
      {"Mistral-7B-Instruct-v0.3", {193, 128, 107}},
  };
  const std::vector<fs::path> files = RealGateFiles();
  if (files.empty()) GTEST_SKIP() << "shared data directory absent: " << HEADWISE_SHARED_DIR;
  int checked = 0;
  for (const fs::path& file : files) {
    const std::string model = file.parent_path().parent_path().filename().string();
    auto it = expected.find(model);
    if (it == expected.end()) continue;
    absl::StatusOr<DuoAttentionGates> gates = LoadDuoAttentionGates(file.string());
    ASSERT_TRUE(gates.ok()) << gates.status();
    const double sparsities[] = {0.25, 0.5, 0.75};
    for (int i = 0; i < 3; ++i) {
      absl::StatusOr<HeadRoles> roles =
          RolesForSparsity(*gates, sparsities[i], {.tie_break_noise = 0.0});
      ASSERT_TRUE(roles.ok());
      EXPECT_EQ(roles->Count(HeadRole::kRetrieval), it->second[i])
          << model << " s=" << sparsities[i];
    }
    ++checked;
  }
  EXPECT_EQ(checked, 6);
}

TEST(DuoAttentionGates, RetrievalHeadsAreTheLargestGates) {
  // Distinct gates, no noise: the retrieval heads must be exactly the top ones.
  std::vector<double> values;
  for (int i = 0; i < 24; ++i) values.push_back(((i * 7) % 24) / 23.0);
  absl::StatusOr<DuoAttentionGates> gates = GatesFromMatrix(4, 6, values);
  ASSERT_TRUE(gates.ok()) << gates.status();
  absl::StatusOr<HeadRoles> roles = RolesForSparsity(*gates, 0.5, {.tie_break_noise = 0.0});
  ASSERT_TRUE(roles.ok());
  // h = 0.5 * 23 = 11.5: threshold between the 12th and 13th smallest -> 12 retrieval heads.
  EXPECT_EQ(roles->Count(HeadRole::kRetrieval), 12);
  for (int l = 0; l < 4; ++l) {
    for (int h = 0; h < 6; ++h) {
      EXPECT_EQ(roles->role(LayerId(l), HeadId(h)) == HeadRole::kRetrieval,
                gates->at(LayerId(l), HeadId(h)) > 11.0 / 23.0 + 1e-9)
          << l << "," << h;
    }
  }
}

TEST(DuoAttentionGates, NoiseBreaksTiesAndIsSeeded) {
  std::vector<double> all_ones(64, 1.0);
  absl::StatusOr<DuoAttentionGates> gates = GatesFromMatrix(8, 8, all_ones);
  ASSERT_TRUE(gates.ok());
  // Without noise every tied head is at the threshold and becomes retrieval.
  EXPECT_EQ(RolesForSparsity(*gates, 0.5, {.tie_break_noise = 0.0})->Count(HeadRole::kRetrieval),
            64);
  absl::StatusOr<HeadRoles> a = RolesForSparsity(*gates, 0.5, {.seed = 7});
  absl::StatusOr<HeadRoles> b = RolesForSparsity(*gates, 0.5, {.seed = 7});
  absl::StatusOr<HeadRoles> c = RolesForSparsity(*gates, 0.5, {.seed = 8});
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(a->Count(HeadRole::kRetrieval), 32);
  EXPECT_EQ(a->DebugString(), b->DebugString());
  EXPECT_NE(a->DebugString(), c->DebugString());
}

TEST(LinearQuantile, MatchesNumpy) {
  // np.quantile([3, 1, 4, 1, 5], q) for q = 0, 0.3, 0.5, 0.9, 1 -> 1, 1.4, 3, 4.6, 5 (numpy 1.24).
  const std::vector<double> v = {3, 1, 4, 1, 5};
  EXPECT_DOUBLE_EQ(LinearQuantile(v, 0.0), 1.0);
  EXPECT_DOUBLE_EQ(LinearQuantile(v, 0.3), 1.4);
  EXPECT_DOUBLE_EQ(LinearQuantile(v, 0.5), 3.0);
  EXPECT_DOUBLE_EQ(LinearQuantile(v, 0.9), 4.6);
  EXPECT_DOUBLE_EQ(LinearQuantile(v, 1.0), 5.0);
  EXPECT_DOUBLE_EQ(LinearQuantile(std::vector<double>{2.5}, 0.7), 2.5);
}

TEST(DuoAttentionGates, RandomGatesSparsityWithinOneHead) {
  absl::BitGen bitgen;
  for (int trial = 0; trial < 200; ++trial) {
    const int layers = absl::Uniform<int>(bitgen, 1, 40);
    const int heads = absl::Uniform<int>(bitgen, 1, 40);
    std::vector<double> values(layers * heads);
    for (double& v : values) v = absl::Uniform<double>(bitgen, 0.0, 1.0);
    absl::StatusOr<DuoAttentionGates> gates = GatesFromMatrix(layers, heads, values);
    ASSERT_TRUE(gates.ok());
    const double s = absl::Uniform<double>(absl::IntervalClosed, bitgen, 0.0, 1.0);
    absl::StatusOr<HeadRoles> roles = RolesForSparsity(*gates, s);
    ASSERT_TRUE(roles.ok());
    EXPECT_LE(std::abs(roles->Count(HeadRole::kStreaming) - s * layers * heads), 1.0)
        << layers << "x" << heads << " s=" << s;
  }
}

TEST(DuoAttentionGates, RejectsBadSparsity) {
  absl::StatusOr<DuoAttentionGates> gates = GatesFromMatrix(1, 2, std::vector<double>{0.1, 0.9});
  ASSERT_TRUE(gates.ok());
  for (double s : {-0.1, 1.5, std::nan("")}) {
    EXPECT_EQ(RolesForSparsity(*gates, s).status().code(), absl::StatusCode::kInvalidArgument);
  }
  EXPECT_EQ(RolesForSparsity(*gates, 0.5, {.tie_break_noise = -1.0}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RolesForSparsity(DuoAttentionGates{}, 0.5).status().code(),
            absl::StatusCode::kInvalidArgument);
}

struct MalformedCase {
  const char* name;
  const char* text;
  const char* message_part;  // Must appear in the error message.
};

TEST(DuoAttentionGates, RejectsMalformedTsv) {
  const MalformedCase cases[] = {
      {"empty", "", "no rows"},
      {"only blank and comments", "\n# comment\n\n", "no rows"},
      {"ragged", "0.1\t0.2\n0.3\n", "t.tsv:2: row has 1 columns, but the first row (line 1)"},
      {"ragged longer", "0.1\t0.2\n0.3\t0.4\t0.5\n", "t.tsv:2"},
      {"not a number", "0.1\tabc\n", "t.tsv:1: column 2: expected a decimal number"},
      {"trailing junk", "0.1\t0.2x\n", "t.tsv:1: column 2"},
      {"empty field", "0.1\t\t0.2\n", "t.tsv:1: column 2: empty field"},
      {"above one", "0.5\n1.5\n", "t.tsv:2: column 1: expected a gate in [0, 1]"},
      {"below zero", "0.5\n-0.2\n", "t.tsv:2"},
      {"nan", "0.5\nnan\n", "t.tsv:2"},
      {"inf", "inf\n", "t.tsv:1"},
      {"comma separated", "0.1,0.2\n", "t.tsv:1: column 1"},
  };
  for (const MalformedCase& c : cases) {
    absl::StatusOr<DuoAttentionGates> gates = ParseDuoAttentionGates(c.text, "t.tsv");
    EXPECT_EQ(gates.status().code(), absl::StatusCode::kInvalidArgument) << c.name;
    EXPECT_NE(std::string(gates.status().message()).find(c.message_part), std::string::npos)
        << c.name << ": " << gates.status();
  }
}

// The text parsed may be any file (a tenant once could name /etc/shadow): no error quotes it,
// neither a field that is not a number nor a number out of range.
TEST(DuoAttentionGates, ErrorsNeverQuoteTheText) {
  const std::string cases[] = {
      "root:SECRET-Xq7:19000:0:99999:7:::\n",
      "0.5\tSECRET-Xq7\n",
      "0.5\n0.25\tSECRET-Xq7\n",
      "0.5\n7.125\n",  // The out-of-range value itself must not be echoed.
      std::string("SECRET-Xq7\0\x01\xff\n", 14),
  };
  for (const std::string& text : cases) {
    absl::StatusOr<DuoAttentionGates> gates = ParseDuoAttentionGates(text, "t.tsv");
    ASSERT_EQ(gates.status().code(), absl::StatusCode::kInvalidArgument) << text;
    const std::string message(gates.status().message());
    EXPECT_EQ(message.find("SECRET"), std::string::npos) << message;
    EXPECT_EQ(message.find("Xq7"), std::string::npos) << message;
    EXPECT_EQ(message.find("7.125"), std::string::npos) << message;
    EXPECT_EQ(message.find("t.tsv:"), 0u) << message;  // Where, not what.
  }
}

TEST(DuoAttentionGates, AcceptsLoadtxtConventionsAndClips) {
  absl::StatusOr<DuoAttentionGates> gates =
      ParseDuoAttentionGates("# gates\n-0.0014\t1.000001\r\n\n0.25\t 0.5 \n", "t.tsv");
  ASSERT_TRUE(gates.ok()) << gates.status();
  EXPECT_EQ(gates->num_layers, 2);
  EXPECT_EQ(gates->num_kv_heads, 2);
  EXPECT_EQ(gates->alpha, (std::vector<double>{0.0, 1.0, 0.25, 0.5}));
}

TEST(DuoAttentionGates, MissingFileIsNotFound) {
  absl::StatusOr<DuoAttentionGates> gates = LoadDuoAttentionGates("/nonexistent/dir/x.tsv");
  EXPECT_EQ(gates.status().code(), absl::StatusCode::kNotFound);
}

TEST(DuoAttentionGates, GatesFromMatrixChecksShape) {
  EXPECT_EQ(GatesFromMatrix(2, 2, std::vector<double>{0.1, 0.2, 0.3}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(GatesFromMatrix(0, 2, std::vector<double>{}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

ModelLayout SmallLayout() {
  ModelLayout layout;
  layout.num_layers = 2;
  layout.num_q_heads = 8;
  layout.num_kv_heads = 4;
  layout.head_dim = 64;
  layout.page_tokens = 16;
  return layout;
}

TEST(ResolveHeadRoles, UniformAndInline) {
  headwise::v1::HeadRolesSource source;
  absl::StatusOr<HeadRoles> roles = ResolveHeadRoles(source, SmallLayout());
  ASSERT_TRUE(roles.ok());
  EXPECT_EQ(roles->Count(HeadRole::kRetrieval), 8);

  headwise::v1::InlineGates* inline_gates = source.mutable_duo_attention()->mutable_inline_gates();
  inline_gates->set_num_layers(2);
  inline_gates->set_num_kv_heads(4);
  for (double g : {0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4}) inline_gates->add_gates(g);
  roles = ResolveHeadRoles(source, SmallLayout());  // Default sparsity 0.5.
  ASSERT_TRUE(roles.ok()) << roles.status();
  EXPECT_EQ(roles->DebugString(), "RsRs\nRsRs\n");

  source.mutable_duo_attention()->set_sparsity(0.0);
  EXPECT_EQ(ResolveHeadRoles(source, SmallLayout())->Count(HeadRole::kRetrieval), 8);
}

TEST(ResolveHeadRoles, Errors) {
  headwise::v1::HeadRolesSource source;
  source.mutable_duo_attention();  // No gates.
  EXPECT_EQ(ResolveHeadRoles(source, SmallLayout()).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A pattern name without a pattern directory: refused before anything is opened.
  source.mutable_duo_attention()->set_pattern_name("gates_1x2");
  absl::StatusOr<HeadRoles> roles = ResolveHeadRoles(source, SmallLayout());
  EXPECT_EQ(roles.status().code(), absl::StatusCode::kFailedPrecondition) << roles.status();

  // A 1 x 2 pattern for a 2 x 4 model: shape mismatch.
  const fs::path dir = fs::path(::testing::TempDir()) / "head_roles_patterns";
  fs::create_directories(dir / "gates_1x2");
  std::ofstream(dir / "gates_1x2" / "full_attention_heads.tsv") << "0.1\t0.9\n";
  absl::StatusOr<std::unique_ptr<PatternDirectory>> patterns = PatternDirectory::Open(dir);
  ASSERT_TRUE(patterns.ok()) << patterns.status();
  roles = ResolveHeadRoles(source, SmallLayout(), patterns->get());
  EXPECT_EQ(roles.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(roles.status().message()).find("1 layers x 2 kv heads"), std::string::npos)
      << roles.status();

  source.mutable_duo_attention()->mutable_inline_gates();  // 0 x 0.
  EXPECT_EQ(ResolveHeadRoles(source, SmallLayout()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace headwise
