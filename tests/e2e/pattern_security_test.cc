// A tenant cannot make the real daemon open a file of its choosing (issue 8): head patterns are
// named inside the daemon's pattern_dir, traversal and symbolic links are refused, devices and
// oversized files are never read, and no error returned over gRPC carries a file's bytes. A
// pattern named this way gives exactly the roles (pages kept, attention outputs) of the same
// gates sent inline.
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "policies/head_roles.h"
#include "tests/e2e/daemon_process.h"
#include "tests/e2e/e2e_helpers.h"

namespace headwise::testing {
namespace {

namespace fs = std::filesystem;
using absl::StatusCode;
using client::Client;
using client::Sequence;

constexpr char kSecret[] = "SECRET-e2e-51c9";
constexpr char kFile[] = "full_attention_heads.tsv";
constexpr char kShapeName[] = "llama3-shape";
// The shipped run this test copies into its pattern directory.
constexpr char kRealRun[] =
    "Llama-3-8B-Instruct-Gradient-1048k/lr=0.02-reg=0.05-ctx=1000_32000-multi_passkey10";

// Llama-3-8B's head grid (32 layers x 8 KV heads) with tiny heads and 4-token pages.
ModelLayout Llama3Shape() {
  ModelLayout layout;
  layout.num_layers = 32;
  layout.num_q_heads = 16;
  layout.num_kv_heads = 8;
  layout.head_dim = 8;
  layout.dtype = DType::kF32;
  layout.page_tokens = 4;
  return layout;
}

std::string ReadAll(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void WriteFile(const fs::path& path, const std::string& bytes) {
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << bytes;
}

v1::PolicySpec NamedSpec(const std::string& name) {
  v1::PolicySpec spec;
  spec.mutable_head_roles()->mutable_duo_attention()->set_pattern_name(name);
  return spec;
}

class PatternSecurityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    patterns_ = fs::path(dir_.path()) / "patterns";
    outside_ = fs::path(dir_.path()) / "outside";
    real_tsv_ = fs::path(HEADWISE_SHARED_DIR) / "data/attention/duo_attention/attn_patterns" /
                kRealRun / kFile;
    BuildPatternDirectory();
    DaemonOptions options;
    options.work_dir = dir_.path();
    options.config_textproto = absl::StrCat("pattern_dir: \"", patterns_.string(), "\"\n");
    absl::StatusOr<std::unique_ptr<DaemonProcess>> daemon = DaemonProcess::Start(options);
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    daemon_ = *std::move(daemon);
    absl::StatusOr<std::unique_ptr<Client>> c = daemon_->Connect("");
    ASSERT_TRUE(c.ok()) << c.status();
    client_ = *std::move(c);
    ASSERT_TRUE(client_->RegisterLayout(kShapeName, Llama3Shape()).ok());
  }

  // patterns/: a valid 32 x 8 pattern ("good/run"), a regular file whose first line is a secret,
  // links out of the directory (to a dir, to /etc/passwd, to /dev/zero) and an oversized file.
  // outside/: a well-formed pattern and the secret, beside (not inside) patterns/.
  void BuildPatternDirectory() {
    std::string gates;
    for (int l = 0; l < 32; ++l) {
      for (int h = 0; h < 8; ++h) absl::StrAppend(&gates, h ? "\t" : "", (l * 8 + h) / 256.0);
      gates += "\n";
    }
    WriteFile(patterns_ / "good/run" / kFile, gates);
    WriteFile(outside_ / kFile, gates);
    WriteFile(outside_ / "secret", absl::StrCat(kSecret, "\n"));
    WriteFile(patterns_ / "secret" / kFile, absl::StrCat("root:", kSecret, ":0:0\n", gates));
    fs::create_directory_symlink(outside_, patterns_ / "escape");
    fs::create_directories(patterns_ / "passwd");
    fs::create_symlink("/etc/passwd", patterns_ / "passwd" / kFile);
    fs::create_directories(patterns_ / "leak");
    fs::create_symlink(outside_ / "secret", patterns_ / "leak" / kFile);
    fs::create_directories(patterns_ / "zero");
    fs::create_symlink("/dev/zero", patterns_ / "zero" / kFile);
    WriteFile(patterns_ / "big" / kFile, gates + std::string(1 << 20, '\n'));
    if (fs::exists(real_tsv_)) WriteFile(patterns_ / kRealRun / kFile, ReadAll(real_tsv_));
  }

  // CreateSequence's status, checked to carry no file bytes and not the daemon's paths (unless
  // the client's own pattern name holds that path).
  absl::Status Create(const v1::PolicySpec& spec) {
    absl::StatusOr<Sequence> seq = client_->CreateSequence(kShapeName, spec, false);
    const std::string message(seq.status().message());
    std::vector<std::string> leaks = {kSecret, "root:x:"};
    if (spec.head_roles().duo_attention().pattern_name().find(dir_.path()) == std::string::npos) {
      leaks.push_back(dir_.path());
    }
    for (const std::string& leak : leaks) {
      EXPECT_EQ(message.find(leak), std::string::npos) << leak << " in: " << message;
    }
    return seq.status();
  }

  TempDir dir_;
  fs::path patterns_, outside_, real_tsv_;
  std::unique_ptr<DaemonProcess> daemon_;
  std::unique_ptr<Client> client_;
};

TEST_F(PatternSecurityTest, PathsAndTraversalAreInvalidArgument) {
  for (const std::string& name :
       {std::string("../outside"), std::string("/etc/passwd"), std::string("a/../../b"),
        std::string("good/../../outside"), std::string("good//run"), outside_.string()}) {
    EXPECT_EQ(Create(NamedSpec(name)).code(), StatusCode::kInvalidArgument) << name;
  }
}

TEST_F(PatternSecurityTest, LinksOutOfTheDirectoryAreRefused) {
  for (const char* name : {"escape", "passwd", "leak"}) {
    const absl::Status status = Create(NamedSpec(name));
    EXPECT_EQ(status.code(), StatusCode::kFailedPrecondition) << name << ": " << status;
  }
}

// The old daemon grew without bound reading /dev/zero. Now it is refused before any read, and
// the daemon goes on serving.
TEST_F(PatternSecurityTest, DevZeroAndOversizedFilesAreRefusedAndTheDaemonServesOn) {
  EXPECT_EQ(Create(NamedSpec("zero")).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(Create(NamedSpec("big")).code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(client_->Health().ok());
  EXPECT_TRUE(client_->CreateSequence(kShapeName, NamedSpec("good/run"), false).ok());
}

TEST_F(PatternSecurityTest, ParseErrorDoesNotEchoTheFile) {
  const absl::Status status = Create(NamedSpec("secret"));
  EXPECT_EQ(status.code(), StatusCode::kInvalidArgument) << status;
  EXPECT_NE(status.message().find("pattern 'secret':1: column 1"), absl::string_view::npos)
      << status;
}

TEST_F(PatternSecurityTest, UnknownPatternIsNotFound) {
  EXPECT_EQ(Create(NamedSpec("nope/run")).code(), StatusCode::kNotFound);
  EXPECT_EQ(Create(NamedSpec("good")).code(), StatusCode::kNotFound);  // No file there.
}

// What an old client sends: field 1 of DuoAttentionRoles, once `tsv_path`, holding a path. The
// daemon no longer knows the field, so nothing is opened (the old daemon answered with the
// file's first line, "root:x:0:0:...", in its error message).
TEST_F(PatternSecurityTest, LegacyTsvPathFieldOpensNothing) {
  for (const char* path : {"/etc/passwd", "/dev/zero"}) {
    v1::PolicySpec spec;
    v1::DuoAttentionRoles* duo = spec.mutable_head_roles()->mutable_duo_attention();
    duo->GetReflection()->MutableUnknownFields(duo)->AddLengthDelimited(1, path);
    const absl::Status status = Create(spec);
    EXPECT_EQ(status.code(), StatusCode::kInvalidArgument) << path << ": " << status;
  }
  EXPECT_TRUE(client_->Health().ok());
}

// A daemon with no pattern_dir refuses every named pattern, before looking at the name.
TEST_F(PatternSecurityTest, NoPatternDirectoryIsFailedPrecondition) {
  TempDir other;
  DaemonOptions options;
  options.work_dir = other.path();
  absl::StatusOr<std::unique_ptr<DaemonProcess>> daemon = DaemonProcess::Start(options);
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  absl::StatusOr<std::unique_ptr<Client>> c = (*daemon)->Connect("");
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_TRUE((*c)->RegisterLayout(kShapeName, Llama3Shape()).ok());
  for (const char* name : {"good/run", "../outside"}) {
    absl::StatusOr<Sequence> seq = (*c)->CreateSequence(kShapeName, NamedSpec(name), false);
    EXPECT_EQ(seq.status().code(), StatusCode::kFailedPrecondition) << seq.status();
  }
}

// The shipped Llama-3-8B pattern named through the daemon keeps the same pages and gives the
// same attention as its gates sent inline; the pages kept are the hand count for sparsity 0.5.
TEST_F(PatternSecurityTest, RealPatternByNameEqualsInlineGates) {
  if (!fs::exists(real_tsv_)) GTEST_SKIP() << "shared data absent: " << real_tsv_;
  absl::StatusOr<DuoAttentionGates> gates = ParseDuoAttentionGates(ReadAll(real_tsv_), "real");
  ASSERT_TRUE(gates.ok()) << gates.status();
  v1::PolicySpec named = NamedSpec(kRealRun);
  v1::PolicySpec inlined;
  v1::InlineGates* g =
      inlined.mutable_head_roles()->mutable_duo_attention()->mutable_inline_gates();
  g->set_num_layers(gates->num_layers);
  g->set_num_kv_heads(gates->num_kv_heads);
  for (double a : gates->alpha) g->add_gates(a);
  for (v1::PolicySpec* spec : {&named, &inlined}) {
    auto* window = spec->mutable_eviction()->mutable_streaming_llm();
    window->set_sink_tokens(4);
    window->set_recent_tokens(8);
  }
  const ModelLayout layout = Llama3Shape();
  absl::StatusOr<Sequence> a = client_->CreateSequence(kShapeName, named, false);
  absl::StatusOr<Sequence> b = client_->CreateSequence(kShapeName, inlined, false);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  std::mt19937 rng(8);
  constexpr int kTokens = 40;  // 10 pages per head.
  for (int layer = 0; layer < layout.num_layers; ++layer) {
    const std::vector<std::byte> k = RandomKv(rng, layout, kTokens);
    const std::vector<std::byte> v = RandomKv(rng, layout, kTokens);
    ASSERT_TRUE(client_->Append(*a, layer, k, v, kTokens).ok());
    ASSERT_TRUE(client_->Append(*b, layer, k, v, kTokens).ok());
    const std::vector<float> q = RandomQ(rng, layout);
    absl::StatusOr<client::AttendOutput> oa = client_->Attend(*a, layer, q);
    absl::StatusOr<client::AttendOutput> ob = client_->Attend(*b, layer, q);
    ASSERT_TRUE(oa.ok() && ob.ok());
    EXPECT_EQ(oa->o, ob->o) << "layer " << layer;
    EXPECT_EQ(oa->lse, ob->lse) << "layer " << layer;
  }
  absl::StatusOr<v1::SequenceInfo> ia = client_->GetSequence(*a);
  absl::StatusOr<v1::SequenceInfo> ib = client_->GetSequence(*b);
  ASSERT_TRUE(ia.ok() && ib.ok());
  // 256 heads, sparsity 0.5: 256 - ceil(0.5 * 255) = 128 retrieval heads keep 10 pages; 128
  // streaming heads keep the sink page and the pages of the last 8 tokens (3 pages).
  EXPECT_EQ(ia->pages(), 128u * 10 + 128u * 3);
  EXPECT_EQ(ia->evicted_pages(), 128u * 7);
  EXPECT_EQ(ia->pages(), ib->pages());
  EXPECT_EQ(ia->evicted_pages(), ib->evicted_pages());
}

}  // namespace
}  // namespace headwise::testing
