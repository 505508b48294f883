// A durable sequence whose policy decides from its queries (H2O: accumulated attention) comes
// back after a crash with the same pages and the same attention outputs: the daemon logs each
// step's decisions before acknowledging it and restore applies them (Engine::AppendReplay)
// instead of deciding again from appends alone, which would keep other tokens.
#include <string>
#include <vector>

#include "tests/service/service_fixture.h"

namespace headwise::testing {
namespace {

class DurableDecisionsTest : public ServiceTest {};

headwise::v1::PolicySpec H2o() {
  headwise::v1::PolicySpec policy;
  policy.mutable_eviction()->mutable_h2o()->set_heavy_tokens(3);
  policy.mutable_eviction()->mutable_h2o()->set_recent_tokens(5);
  return policy;
}

TEST_F(DurableDecisionsTest, QueryDependentDropsComeBackExactlyAfterARestart) {
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence(/*durable=*/true, kAliceToken, H2o());
  for (int layer = 0; layer < 2; ++layer) {
    ASSERT_TRUE(
        Append(handle, layer, RandomValues(6 * 32, 1 + layer), RandomValues(6 * 32, 11 + layer), 6)
            .ok());
  }
  // 30 decode steps: H2O drops single tokens chosen by the attention the steps' queries paid.
  for (int step = 0; step < 30; ++step) {
    for (int layer = 0; layer < 2; ++layer) {
      headwise::v1::DecodeStepResponse response;
      grpc::Status status = stub_->DecodeStep(
          Ctx().get(), DecodeRequest(handle, layer, 100 + 7 * step + layer), &response);
      ASSERT_TRUE(status.ok()) << status.error_message();
    }
  }
  // Attention with fresh queries reads exactly the held tokens: equal outputs = equal pages.
  auto outputs = [&] {
    std::vector<float> all;
    for (int layer = 0; layer < 2; ++layer) {
      headwise::v1::AttendResponse response;
      EXPECT_TRUE(Attend(handle, layer, RandomValues(64, 900 + layer), &response).ok());
      const std::string& o = response.o().data();
      std::vector<float> v(o.size() / sizeof(float));
      std::memcpy(v.data(), o.data(), o.size());
      all.insert(all.end(), v.begin(), v.end());
    }
    return all;
  };
  const std::vector<float> before = outputs();
  ASSERT_FALSE(before.empty());
  const std::vector<int64_t> lengths = Lengths(handle);
  Restart();
  EXPECT_EQ(Lengths(handle), lengths);
  EXPECT_EQ(outputs(), before);  // Bit for bit.
}

// Merges rewrite K/V the durable log does not record: a durable sequence with a merge policy is
// refused, and nothing is created; the same policy without durable is accepted.
TEST_F(DurableDecisionsTest, MergePoliciesAreRefusedForDurableSequences) {
  StartServer();
  RegisterLayout();
  headwise::v1::PolicySpec policy;
  policy.mutable_eviction()->mutable_streaming_llm()->set_sink_tokens(4);
  policy.mutable_merge()->mutable_mean();
  headwise::v1::CreateSequenceRequest request;
  request.set_layout_name("test");
  request.set_durable(true);
  *request.mutable_policy() = policy;
  headwise::v1::CreateSequenceResponse response;
  grpc::Status status = stub_->CreateSequence(Ctx().get(), request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(status.error_message().find("merge"), std::string::npos) << status.error_message();
  headwise::v1::StatsRequest stats_request;
  headwise::v1::StatsResponse stats;
  ASSERT_TRUE(stub_->Stats(Ctx().get(), stats_request, &stats).ok());
  EXPECT_EQ(stats.tenant_sequences(), 0u);
  EXPECT_FALSE(CreateSequence(/*durable=*/false, kAliceToken, policy).empty());
}

}  // namespace
}  // namespace headwise::testing
