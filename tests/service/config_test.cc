#include "cachesvc/service/config.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "cachesvc/service/tenants.h"

namespace headwise {
namespace {

TEST(ConfigTest, EmptyConfigGetsEveryDefaultAndTheDefaultTenant) {
  auto config = ResolveConfig(headwise::v1::DaemonConfig(), "");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->unix_socket(), "./var/headwised.sock");
  EXPECT_EQ(config->metrics_address(), "127.0.0.1:9464");
  EXPECT_EQ(config->data_dir(), "./var/data");
  EXPECT_EQ(config->max_message_bytes(), 64u << 20);
  EXPECT_EQ(config->tcp_address(), "");
  ASSERT_EQ(config->tenants_size(), 1);
  EXPECT_EQ(config->tenants(0).name(), "default");
  EXPECT_EQ(config->tenants(0).token(), "dev-token");
  auto with_token = ResolveConfig(headwise::v1::DaemonConfig(), "s3cret");
  ASSERT_TRUE(with_token.ok());
  EXPECT_EQ(with_token->tenants(0).token(), "s3cret");
}

TEST(ConfigTest, ExampleFileParsesAndResolves) {
  std::ifstream in(HEADWISE_DOCS_DIR "/config.example.textproto");
  ASSERT_TRUE(in) << "docs/config.example.textproto missing";
  std::stringstream text;
  text << in.rdbuf();
  auto parsed = ParseConfigText(text.str());
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  auto config = ResolveConfig(*parsed, "");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_GE(config->tenants_size(), 2);
}

TEST(ConfigTest, RejectsBadConfigs) {
  EXPECT_EQ(ParseConfigText("no_such_field: 1").status().code(),
            absl::StatusCode::kInvalidArgument);
  headwise::v1::DaemonConfig config;
  config.set_tcp_address("0.0.0.0:7070");
  EXPECT_EQ(ResolveConfig(config, "").status().code(), absl::StatusCode::kInvalidArgument);
  config.set_allow_non_loopback(true);
  EXPECT_TRUE(ResolveConfig(config, "").ok());
  config.set_tcp_address("127.0.0.1");  // No port.
  EXPECT_FALSE(ResolveConfig(config, "").ok());
  config.set_tcp_address("[::1]:7070");
  config.mutable_tls()->set_cert_path("cert.pem");  // Key missing.
  EXPECT_FALSE(ResolveConfig(config, "").ok());
  config.clear_tls();
  config.set_unix_socket("");
  EXPECT_TRUE(ResolveConfig(config, "").ok());
  config.set_tcp_address("");
  EXPECT_FALSE(ResolveConfig(config, "").ok());  // No listener at all.

  headwise::v1::DaemonConfig tenants;
  for (const char* name : {"a", "b"}) {
    auto* t = tenants.add_tenants();
    t->set_name(name);
    t->set_token("same");
  }
  EXPECT_FALSE(ResolveConfig(tenants, "").ok());
  tenants.mutable_tenants(1)->set_token("");
  EXPECT_FALSE(ResolveConfig(tenants, "").ok());
}

// The config file goes through the bounded reader: the old loader read /dev/zero (or a FIFO)
// until memory ran out (or forever).
TEST(ConfigTest, LoadConfigFileReadsOnlyBoundedRegularFiles) {
  const std::string dir = ::testing::TempDir() + "/config_test_files";
  std::filesystem::create_directories(dir);
  for (const char* device : {"/dev/zero", "/dev/urandom"}) {
    EXPECT_EQ(LoadConfigFile(device).status().code(), absl::StatusCode::kFailedPrecondition);
  }
  const std::string fifo = dir + "/fifo";
  std::filesystem::remove(fifo);
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_EQ(LoadConfigFile(fifo).status().code(), absl::StatusCode::kFailedPrecondition);
  // Valid text (a comment) one byte over the cap.
  const std::string big = dir + "/big.textproto";
  std::ofstream(big) << "#" << std::string(kMaxConfigFileBytes - 1, 'x') << "\n";
  absl::StatusOr<headwise::v1::DaemonConfig> loaded = LoadConfigFile(big);
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kFailedPrecondition) << loaded.status();
  EXPECT_EQ(LoadConfigFile(dir + "/none").status().code(), absl::StatusCode::kNotFound);
  const std::string good = dir + "/good.textproto";
  std::ofstream(good) << "worker_threads: 7\npattern_dir: \"/srv/patterns\"\n";
  loaded = LoadConfigFile(good);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->worker_threads(), 7);
  EXPECT_EQ(loaded->pattern_dir(), "/srv/patterns");
}

// A config that does not parse (e.g. --config pointing at a key or a shadow file) is reported by
// position and kind; the text found there is never quoted.
TEST(ConfigTest, ParseErrorsDoNotQuoteTheText) {
  struct Case {
    std::string text;
    std::string expected;
  };
  const Case cases[] = {
      {"SECRETword: 1\n", "line 1:11: unknown field name"},
      {"worker_threads: SECRETword\n", "line 1:17: expected integer"},
      {"root:$6$SECRETword:19000:0:99999:7:::\n", "line 1:"},
      {"-----BEGIN PRIVATE KEY-----\nSECRETword\n", "line 1:"},
      {"unix_socket: \"a\"\nlog_level SECRETword\n", "line 2:"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<headwise::v1::DaemonConfig> parsed = ParseConfigText(c.text);
    ASSERT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument) << c.text;
    const std::string message(parsed.status().message());
    EXPECT_EQ(message.find("SECRET"), std::string::npos) << message;
    EXPECT_NE(message.find(c.expected), std::string::npos) << message;
  }
}

TEST(ConfigTest, ParsesByteSizes) {
  EXPECT_EQ(*ParseByteSize("123"), 123u);
  EXPECT_EQ(*ParseByteSize("64MiB"), 64u << 20);
  EXPECT_EQ(*ParseByteSize("2G"), uint64_t{2} << 30);
  EXPECT_EQ(*ParseByteSize("1K"), 1024u);
  EXPECT_FALSE(ParseByteSize("").ok());
  EXPECT_FALSE(ParseByteSize("12XB").ok());
  EXPECT_FALSE(ParseByteSize("99999999999999999999").ok());
  EXPECT_FALSE(ParseByteSize("20000000000T").ok());
}

TEST(TenantsTest, AuthenticatesBearerTokensOnly) {
  headwise::v1::DaemonConfig config;
  auto* a = config.add_tenants();
  a->set_name("a");
  a->set_token("token-a");
  auto* b = config.add_tenants();
  b->set_name("b");
  b->set_token("token-b");
  TenantRegistry registry(config.tenants());
  EXPECT_EQ((*registry.Authenticate("Bearer token-b"))->name, "b");
  EXPECT_EQ((*registry.Authenticate("bearer token-a"))->name, "a");
  for (const char* bad : {"", "Bearer ", "token-a", "Bearer token-", "Bearer token-ab",
                          "Basic token-a", "Bearer  token-a"}) {
    EXPECT_EQ(registry.Authenticate(bad).status().code(), absl::StatusCode::kUnauthenticated)
        << bad;
  }
  EXPECT_TRUE(ConstantTimeEquals("abc", "abc"));
  EXPECT_FALSE(ConstantTimeEquals("abc", "abd"));
  EXPECT_FALSE(ConstantTimeEquals("abc", "abcd"));
  EXPECT_FALSE(ConstantTimeEquals("", "a"));
}

}  // namespace
}  // namespace headwise
