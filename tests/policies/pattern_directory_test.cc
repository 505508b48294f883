// Pattern names and the pattern directory: a client names a pattern, never a path; nothing
// outside the configured directory is opened (no traversal, no symbolic link followed), only
// regular files up to the cap are read, and no error carries a byte of any file.
#include "policies/pattern_directory.h"

#include <sys/stat.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "policies/head_roles.h"

namespace headwise {
namespace {

namespace fs = std::filesystem;

// A word that appears in no message unless file bytes leak into it.
constexpr char kSecret[] = "SECRET-7f3a9";

TEST(PatternName, AcceptsRelativeNamesOfSafeBytes) {
  for (const char* name :
       {"a", "Llama-3-8B-Instruct-Gradient-1048k/lr=0.02-reg=0.05-ctx=1000_32000-multi_passkey10",
        "m/run", "a.b_c=d-e/...x", "..a", "a.."}) {
    EXPECT_TRUE(ValidatePatternName(name).ok()) << name << ": " << ValidatePatternName(name);
  }
  EXPECT_TRUE(ValidatePatternName(std::string(kMaxPatternNameBytes, 'a')).ok());
}

TEST(PatternName, RefusesPathsTraversalAndOddBytes) {
  const std::string refused[] = {
      "",
      "/etc/passwd",
      "../x",
      "a/../../b",
      "..",
      ".",
      "./a",
      "a/.",
      "a/..",
      "a//b",
      "a/",
      "/a",
      "a b",
      "a\\b",
      "~",
      "a:b",
      "a*",
      "$HOME",
      "a\nb",
      "%2e%2e",
      "a\tb",
      std::string("a\0b", 3),
      std::string(1, '\xff'),
      std::string(kMaxPatternNameBytes + 1, 'a'),
  };
  for (const std::string& name : refused) {
    const absl::Status status = ValidatePatternName(name);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << "'" << name << "'";
    for (char c : status.message()) {
      EXPECT_TRUE(c >= 0x20 && c < 0x7f) << "control or high byte echoed for '" << name << "'";
    }
  }
}

class PatternDirectoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = fs::temp_directory_path() / "hwpatterns.XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    base_ = pattern;
    root_ = base_ / "patterns";
    outside_ = base_ / "outside";
    fs::create_directories(root_);
    fs::create_directories(outside_);
    // A well-formed pattern outside the directory, and a secret beside it.
    WriteFile(outside_ / kPatternFileName, "0.5\t0.5\n");
    WriteFile(outside_ / "secret", std::string(kSecret) + "\t0.5\n");
    WritePattern("m/run", "0.9\t0.1\n0.2\t0.8\n");
    absl::StatusOr<std::unique_ptr<PatternDirectory>> dir = PatternDirectory::Open(root_);
    ASSERT_TRUE(dir.ok()) << dir.status();
    dir_ = *std::move(dir);
  }
  void TearDown() override { fs::remove_all(base_); }

  static void WriteFile(const fs::path& path, const std::string& bytes) {
    fs::create_directories(path.parent_path());
    std::ofstream(path, std::ios::binary) << bytes;
  }
  void WritePattern(const std::string& name, const std::string& bytes) {
    WriteFile(root_ / name / kPatternFileName, bytes);
  }
  // The status of loading `name`, checked to leak neither the secret nor the directory's path.
  absl::Status Load(const std::string& name) {
    absl::StatusOr<DuoAttentionGates> gates = dir_->LoadGates(name);
    const std::string message(gates.status().message());
    EXPECT_EQ(message.find(kSecret), std::string::npos) << message;
    if (name.find(base_.string()) == std::string::npos) {  // Else the name itself holds it.
      EXPECT_EQ(message.find(base_.string()), std::string::npos) << message;
    }
    return gates.status();
  }

  fs::path base_, root_, outside_;
  std::unique_ptr<PatternDirectory> dir_;
};

TEST_F(PatternDirectoryTest, LoadsANamedPattern) {
  absl::StatusOr<DuoAttentionGates> gates = dir_->LoadGates("m/run");
  ASSERT_TRUE(gates.ok()) << gates.status();
  EXPECT_EQ(gates->num_layers, 2);
  EXPECT_EQ(gates->num_kv_heads, 2);
  EXPECT_EQ(gates->alpha, (std::vector<double>{0.9, 0.1, 0.2, 0.8}));
}

TEST_F(PatternDirectoryTest, TraversalAndAbsoluteNamesAreInvalidArgument) {
  // "../outside" holds a well-formed pattern: only the name check stands between it and a read.
  const std::vector<std::string> names = {"../outside",  "m/../../outside",
                                          "/etc/passwd", "m/run/../../../outside",
                                          "./m/run",     (base_ / "outside").string()};
  for (const std::string& name : names) {
    EXPECT_EQ(Load(name).code(), absl::StatusCode::kInvalidArgument) << name;
  }
}

TEST_F(PatternDirectoryTest, SymlinkedDirectoryLeadingOutIsRefused) {
  fs::create_directory_symlink(outside_, root_ / "escape");
  const absl::Status status = Load("escape");
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
  EXPECT_NE(status.message().find("symbolic link"), absl::string_view::npos) << status;
  fs::create_directory_symlink(root_ / "m", root_ / "alias");  // Even one that stays inside.
  EXPECT_EQ(Load("alias/run").code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(PatternDirectoryTest, SymlinkedFileIsRefused) {
  fs::create_directories(root_ / "passwd");
  fs::create_symlink("/etc/passwd", root_ / "passwd" / kPatternFileName);
  fs::create_directories(root_ / "secret");
  fs::create_symlink(outside_ / "secret", root_ / "secret" / kPatternFileName);
  for (const char* name : {"passwd", "secret"}) {
    const absl::Status status = Load(name);
    EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
    EXPECT_EQ(status.message().find("root:"), absl::string_view::npos) << status;
  }
}

// The old daemon read /dev/zero until memory ran out. A link to it, or any non-regular file,
// is refused at fstat, before any byte is read.
TEST_F(PatternDirectoryTest, DevicesFifosAndDirectoriesAreRefused) {
  fs::create_directories(root_ / "zero");
  fs::create_symlink("/dev/zero", root_ / "zero" / kPatternFileName);
  fs::create_directories(root_ / "fifo");
  ASSERT_EQ(mkfifo((root_ / "fifo" / kPatternFileName).c_str(), 0600), 0);
  fs::create_directories(root_ / "dir" / kPatternFileName);
  for (const char* name : {"zero", "fifo", "dir"}) {
    EXPECT_EQ(Load(name).code(), absl::StatusCode::kFailedPrecondition) << name;
  }
}

TEST_F(PatternDirectoryTest, OversizedFileIsRefused) {
  // Valid gates, one byte over the cap: refused by size, not by content.
  std::string text = "0.5\n";
  text += std::string(kMaxPatternFileBytes + 1 - text.size() - 1, '\n');
  text += "\n";
  ASSERT_EQ(text.size(), kMaxPatternFileBytes + 1);
  WritePattern("big", text);
  const absl::Status status = Load("big");
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
  EXPECT_NE(status.message().find("larger than the limit"), absl::string_view::npos) << status;
  text.pop_back();  // At the cap: read and parsed.
  WritePattern("at_cap", text);
  EXPECT_TRUE(dir_->LoadGates("at_cap").ok());
}

TEST_F(PatternDirectoryTest, ParseErrorsGiveThePlaceNotTheText) {
  WritePattern("shadow", std::string("root:") + kSecret + ":19000:0:99999:7:::\n");
  WritePattern("second", std::string("0.5\t0.5\n0.5\t") + kSecret + "\n");
  for (const char* name : {"shadow", "second"}) {
    const absl::Status status = Load(name);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_NE(status.message().find(absl::StrCat("pattern '", name, "':")), absl::string_view::npos)
        << status;
    EXPECT_NE(status.message().find("expected a decimal number"), absl::string_view::npos)
        << status;
  }
  EXPECT_NE(Load("second").message().find("'second':2: column 2"), absl::string_view::npos);
}

TEST_F(PatternDirectoryTest, MissingPatternsAreNotFound) {
  for (const char* name : {"nope", "m/nope", "m", "m/run/deeper"}) {
    EXPECT_EQ(Load(name).code(), absl::StatusCode::kNotFound) << name;
  }
}

TEST_F(PatternDirectoryTest, OpenChecksTheDirectory) {
  EXPECT_EQ(PatternDirectory::Open("").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PatternDirectory::Open((base_ / "none").string()).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(PatternDirectory::Open((outside_ / "secret").string()).status().code(),
            absl::StatusCode::kFailedPrecondition);
  // The operator may name the directory through a link.
  fs::create_directory_symlink(root_, base_ / "link");
  absl::StatusOr<std::unique_ptr<PatternDirectory>> linked = PatternDirectory::Open(base_ / "link");
  ASSERT_TRUE(linked.ok()) << linked.status();
  EXPECT_TRUE((*linked)->LoadGates("m/run").ok());
}

TEST_F(PatternDirectoryTest, ResolveHeadRolesNeedsADirectoryForANamedPattern) {
  ModelLayout layout;
  layout.num_layers = 2;
  layout.num_kv_heads = 2;
  layout.num_q_heads = 4;
  layout.head_dim = 8;
  headwise::v1::HeadRolesSource source;
  source.mutable_duo_attention()->set_pattern_name("m/run");
  source.mutable_duo_attention()->set_sparsity(0.5);
  EXPECT_EQ(ResolveHeadRoles(source, layout).status().code(),
            absl::StatusCode::kFailedPrecondition);
  absl::StatusOr<HeadRoles> roles = ResolveHeadRoles(source, layout, dir_.get());
  ASSERT_TRUE(roles.ok()) << roles.status();
  // Gates 0.9 0.1 / 0.2 0.8, sparsity 0.5: the quantile is 0.5 (between 0.2 and 0.8).
  EXPECT_EQ(roles->DebugString(), "Rs\nsR\n");
  source.mutable_duo_attention()->set_pattern_name("../outside");
  EXPECT_EQ(ResolveHeadRoles(source, layout, dir_.get()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Every shipped pattern, named relative to the shipped attn_patterns/ directory, gives the same
// roles as its gates sent inline (the file read here with plain iostreams, as a client would).
TEST(ShippedPatterns, NamedEqualsInline) {
  const fs::path root =
      fs::path(HEADWISE_SHARED_DIR) / "data/attention/duo_attention/attn_patterns";
  std::error_code ec;
  if (!fs::is_directory(root, ec)) GTEST_SKIP() << "shared data absent: " << root;
  absl::StatusOr<std::unique_ptr<PatternDirectory>> dir = PatternDirectory::Open(root);
  ASSERT_TRUE(dir.ok()) << dir.status();
  int checked = 0;
  for (const auto& entry : fs::recursive_directory_iterator(root, ec)) {
    if (entry.path().filename() != kPatternFileName) continue;
    const std::string name = entry.path().parent_path().lexically_relative(root).string();
    SCOPED_TRACE(name);
    std::ifstream in(entry.path(), std::ios::binary);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    absl::StatusOr<DuoAttentionGates> gates = ParseDuoAttentionGates(text, name);
    ASSERT_TRUE(gates.ok()) << gates.status();
    ModelLayout layout;
    layout.num_layers = gates->num_layers;
    layout.num_kv_heads = gates->num_kv_heads;
    layout.num_q_heads = gates->num_kv_heads;
    layout.head_dim = 128;
    for (double sparsity : {0.25, 0.5, 0.75}) {
      headwise::v1::HeadRolesSource named, inlined;
      named.mutable_duo_attention()->set_pattern_name(name);
      named.mutable_duo_attention()->set_sparsity(sparsity);
      inlined.mutable_duo_attention()->set_sparsity(sparsity);
      headwise::v1::InlineGates* g = inlined.mutable_duo_attention()->mutable_inline_gates();
      g->set_num_layers(gates->num_layers);
      g->set_num_kv_heads(gates->num_kv_heads);
      for (double a : gates->alpha) g->add_gates(a);
      absl::StatusOr<HeadRoles> a = ResolveHeadRoles(named, layout, dir->get());
      absl::StatusOr<HeadRoles> b = ResolveHeadRoles(inlined, layout);
      ASSERT_TRUE(a.ok()) << a.status();
      ASSERT_TRUE(b.ok()) << b.status();
      EXPECT_EQ(a->DebugString(), b->DebugString());
      // Distinct noisy gates: n - ceil(s (n - 1)) retrieval heads (RolesForSparsity's contract).
      const int n = gates->num_layers * gates->num_kv_heads;
      EXPECT_EQ(a->Count(HeadRole::kRetrieval),
                n - static_cast<int>(std::ceil(sparsity * (n - 1))));
    }
    ++checked;
  }
  EXPECT_GE(checked, 6);
}

}  // namespace
}  // namespace headwise
