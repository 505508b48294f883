// Prefix reuse through the daemon: token ids on Append, CreateSequence with prefix_token_ids,
// equal outputs from the reused pages, no second copy (tier bytes), per-tenant scopes and share
// groups, and refused token ids that change nothing.
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/service/service_fixture.h"

namespace headwise::testing {
namespace {

constexpr int kPrefix = 128;  // Two blocks of 4 pages of 16 tokens.
constexpr int kExtra = 10;

// The value of the metric line that starts with `name` (-1 when absent).
double Metric(const std::string& body, const std::string& name) {
  size_t at = body.find("\n" + name + " ");
  if (at == std::string::npos) return -1;
  at += name.size() + 2;
  double v = -1;
  if (!absl::SimpleAtod(body.substr(at, body.find('\n', at) - at), &v)) return -1;
  return v;
}

class PrefixServiceTest : public ServiceTest {
 protected:
  void SetUp() override {
    ServiceTest::SetUp();
    config_.mutable_prefix_cache()->set_device_budget_bytes(uint64_t{1} << 20);
    ids_.resize(kPrefix + kExtra);
    for (size_t i = 0; i < ids_.size(); ++i) ids_[i] = static_cast<int32_t>(7 * i + 3);
  }

  headwise::v1::CreateSequenceResponse CreateWithPrefix(const std::string& token = kAliceToken) {
    headwise::v1::CreateSequenceRequest request;
    request.set_layout_name("test");
    for (int32_t id : ids_) request.add_prefix_token_ids(id);
    headwise::v1::CreateSequenceResponse response;
    const grpc::Status st = stub_->CreateSequence(Ctx(token).get(), request, &response);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return response;
  }

  grpc::Status AppendWithIds(const std::string& handle, int layer, int from, int tokens,
                             const std::string& token = kAliceToken, int32_t bump = 0) {
    headwise::v1::AppendRequest request;
    request.set_handle(handle);
    request.set_layer(layer);
    const size_t n = static_cast<size_t>(tokens) * 2 * 16;
    *request.mutable_k() = F32Tensor(RandomValues(n, 100 * layer + from), {tokens, 2, 16});
    *request.mutable_v() = F32Tensor(RandomValues(n, 900 * layer + from), {tokens, 2, 16});
    for (int i = from; i < from + tokens; ++i) request.add_token_ids(ids_[i] + bump);
    headwise::v1::AppendResponse response;
    return stub_->Append(Ctx(token).get(), request, &response);
  }

  // Attention outputs of both layers for fixed queries.
  std::vector<float> AttendAll(const std::string& handle, const std::string& token = kAliceToken) {
    std::vector<float> all;
    for (int l = 0; l < 2; ++l) {
      headwise::v1::AttendResponse response;
      EXPECT_TRUE(Attend(handle, l, RandomValues(64, 5 + l), &response, token).ok());
      const std::vector<float> o = TensorFloats(response.o());
      all.insert(all.end(), o.begin(), o.end());
    }
    return all;
  }

  // A sequence of the whole prompt, released; returns its outputs at kPrefix tokens.
  std::vector<float> FirstRequest(const std::string& token = kAliceToken) {
    const headwise::v1::CreateSequenceResponse created = CreateWithPrefix(token);
    EXPECT_EQ(created.cached_tokens(), 0);
    for (int l = 0; l < 2; ++l)
      EXPECT_TRUE(AppendWithIds(created.handle(), l, 0, kPrefix, token).ok());
    const std::vector<float> out = AttendAll(created.handle(), token);
    for (int l = 0; l < 2; ++l) {
      EXPECT_TRUE(AppendWithIds(created.handle(), l, kPrefix, kExtra, token).ok());
    }
    Release(created.handle(), token);
    return out;
  }

  void Release(const std::string& handle, const std::string& token = kAliceToken) {
    headwise::v1::ReleaseRequest request;
    request.set_handle(handle);
    headwise::v1::ReleaseResponse response;
    EXPECT_TRUE(stub_->Release(Ctx(token).get(), request, &response).ok());
  }

  std::vector<int32_t> ids_;
};

TEST_F(PrefixServiceTest, SecondRequestReusesThePrefixWithEqualOutputsAndNoSecondCopy) {
  StartServer();
  RegisterLayout();
  const std::vector<float> want = FirstRequest();
  const std::string before = server_->RenderMetrics();
  const double device_bytes = Metric(before, "headwise_tier_bytes{tier=\"device\"}");
  EXPECT_EQ(Metric(before, "headwise_prefix_resident_bytes{tier=\"device\"}"), 2 * 64 * 512);
  EXPECT_EQ(device_bytes, 2 * 64 * 512);  // Only the cached blocks are left.

  const headwise::v1::CreateSequenceResponse second = CreateWithPrefix();
  EXPECT_EQ(second.cached_tokens(), kPrefix);
  EXPECT_EQ(Lengths(second.handle()), (std::vector<int64_t>{kPrefix, kPrefix}));
  const std::string after = server_->RenderMetrics();
  EXPECT_EQ(Metric(after, "headwise_tier_bytes{tier=\"device\"}"), device_bytes);
  EXPECT_EQ(Metric(after, "headwise_prefix_hit_blocks_total{tier=\"device\"}"), 2);
  EXPECT_EQ(Metric(after, "headwise_prefix_bytes_saved_total{tier=\"device\"}"), 2 * 64 * 512);
  EXPECT_EQ(AttendAll(second.handle()), want);
  // The reuser continues from the cached prefix with the rest of its prompt.
  for (int l = 0; l < 2; ++l) EXPECT_TRUE(AppendWithIds(second.handle(), l, kPrefix, kExtra).ok());
  EXPECT_EQ(Lengths(second.handle()), (std::vector<int64_t>{kPrefix + kExtra, kPrefix + kExtra}));

  // Another tenant does not see alice's blocks.
  RegisterLayout(kBobToken);
  EXPECT_EQ(CreateWithPrefix(kBobToken).cached_tokens(), 0);
}

TEST_F(PrefixServiceTest, ShareGroupSharesAcrossTenants) {
  auto* group = config_.mutable_prefix_cache()->add_share_groups();
  group->set_name("team");
  group->add_tenants("alice");
  group->add_tenants("bob");
  StartServer();
  RegisterLayout();
  RegisterLayout(kBobToken);
  const std::vector<float> want = FirstRequest();
  const headwise::v1::CreateSequenceResponse theirs = CreateWithPrefix(kBobToken);
  EXPECT_EQ(theirs.cached_tokens(), kPrefix);
  EXPECT_EQ(AttendAll(theirs.handle(), kBobToken), want);
}

TEST_F(PrefixServiceTest, BadTokenIdsAreRefusedAndChangeNothing) {
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence();
  headwise::v1::AppendRequest request;
  request.set_handle(handle);
  request.set_layer(0);
  *request.mutable_k() = F32Tensor(RandomValues(5 * 32, 1), {5, 2, 16});
  *request.mutable_v() = F32Tensor(RandomValues(5 * 32, 2), {5, 2, 16});
  for (int i = 0; i < 3; ++i) request.add_token_ids(i);  // 3 ids for 5 tokens.
  headwise::v1::AppendResponse response;
  EXPECT_EQ(stub_->Append(Ctx().get(), request, &response).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  request.clear_token_ids();
  for (int i = 0; i < 5; ++i) request.add_token_ids(i == 2 ? -1 : i);
  EXPECT_EQ(stub_->Append(Ctx().get(), request, &response).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{0, 0}));
  // Layer 1 of a step must repeat layer 0's ids.
  ASSERT_TRUE(AppendWithIds(handle, 0, 0, 16).ok());
  EXPECT_EQ(AppendWithIds(handle, 1, 0, 16, kAliceToken, 1).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{16, 0}));
  EXPECT_TRUE(AppendWithIds(handle, 1, 0, 16).ok());
  headwise::v1::CreateSequenceRequest create;
  create.set_layout_name("test");
  create.add_prefix_token_ids(-5);
  headwise::v1::CreateSequenceResponse created;
  EXPECT_EQ(stub_->CreateSequence(Ctx().get(), create, &created).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
}

}  // namespace
}  // namespace headwise::testing
