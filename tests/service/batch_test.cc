// DecodeStepBatch against the real service: results equal one DecodeStep per sequence (exactly),
// per-item errors (another tenant's handle, a bad shape) leave the other items alone, staged
// inputs and placed outputs work, retries with step ids append once, and durable items survive
// a restart.
#include <cstring>
#include <string>
#include <vector>

#include "cachesvc/service/durable_log.h"
#include "tests/service/service_fixture.h"

namespace headwise::testing {
namespace {

constexpr int kTokenFloats = 2 * 16;

class BatchTest : public ServiceTest {
 protected:
  // A sequence of alice with `tokens` tokens on both layers from `seed`, and its twin.
  std::pair<std::string, std::string> Twins(int tokens, uint32_t seed, bool durable = false) {
    const std::string a = CreateSequence(durable), b = CreateSequence();
    for (int layer = 0; layer < 2; ++layer) {
      auto k = RandomValues(tokens * kTokenFloats, seed + layer);
      auto v = RandomValues(tokens * kTokenFloats, seed + 7 + layer);
      EXPECT_TRUE(Append(a, layer, k, v, tokens).ok());
      EXPECT_TRUE(Append(b, layer, k, v, tokens).ok());
    }
    return {a, b};
  }

  static headwise::v1::DecodeStepBatchItem Item(const headwise::v1::DecodeStepRequest& step) {
    headwise::v1::DecodeStepBatchItem item;
    item.set_handle(step.handle());
    *item.mutable_q() = step.q();
    *item.mutable_k() = step.k();
    *item.mutable_v() = step.v();
    *item.mutable_output() = step.output();
    item.set_step_id(step.step_id());
    return item;
  }

  grpc::Status Batch(const headwise::v1::DecodeStepBatchRequest& request,
                     headwise::v1::DecodeStepBatchResponse* response) {
    return stub_->DecodeStepBatch(Ctx().get(), request, response);
  }
};

TEST_F(BatchTest, ResultsEqualOneDecodeStepPerSequenceAndErrorsStayPerItem) {
  StartServer();
  RegisterLayout();
  RegisterLayout(kBobToken);
  const std::string bobs = CreateSequence(false, kBobToken);
  std::vector<std::pair<std::string, std::string>> twins;
  for (int i = 0; i < 3; ++i) twins.push_back(Twins(5 + 9 * i, 10 * i + 1));  // 5, 14, 23.
  headwise::v1::DecodeStepBatchRequest request;
  request.set_layer(0);
  std::vector<headwise::v1::DecodeStepResponse> want(3);
  for (int i = 0; i < 3; ++i) {
    auto step = DecodeRequest(twins[i].second, 0, 100 + 3 * i);
    ASSERT_TRUE(stub_->DecodeStep(Ctx().get(), step, &want[i]).ok());
    step.set_handle(twins[i].first);
    *request.add_items() = Item(step);
  }
  // Bob's handle in alice's batch, and a malformed item.
  *request.add_items() = Item(DecodeRequest(bobs, 0, 200));
  auto bad = Item(DecodeRequest(twins[0].second, 0, 300));
  *bad.mutable_k() = F32Tensor(RandomValues(2 * kTokenFloats, 1), {2, 2, 16});
  *request.add_items() = bad;
  headwise::v1::DecodeStepBatchResponse response;
  grpc::Status status = Batch(request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(response.results_size(), 5);
  for (int i = 0; i < 3; ++i) {
    const auto& result = response.results(i);
    ASSERT_EQ(result.code(), 0) << result.message();
    EXPECT_EQ(result.layer_length(), want[i].layer_length());
    EXPECT_EQ(result.layer_length(), 6 + 9 * i);
    EXPECT_EQ(TensorFloats(result.o()), TensorFloats(want[i].o()));
    EXPECT_EQ(TensorFloats(result.lse()), TensorFloats(want[i].lse()));
  }
  EXPECT_EQ(response.results(3).code(), static_cast<int>(grpc::StatusCode::NOT_FOUND));
  EXPECT_EQ(response.results(4).code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_EQ(Lengths(bobs, kBobToken), (std::vector<int64_t>{0, 0}));
  EXPECT_EQ(Lengths(twins[0].second), (std::vector<int64_t>{6, 5}));  // Only its own step.

  // Layer 1 of the same sequences, as one more batch; then a refused item (layer 0 again breaks
  // the append rule for the first sequence) leaves the others' steps alone.
  headwise::v1::DecodeStepBatchRequest next;
  next.set_layer(0);
  *next.add_items() = Item(DecodeRequest(twins[0].first, 0, 400));
  next.mutable_items(0)->set_step_id(0);
  headwise::v1::DecodeStepBatchRequest layer1;
  layer1.set_layer(1);
  for (int i = 1; i < 3; ++i) *layer1.add_items() = Item(DecodeRequest(twins[i].first, 1, 500));
  *layer1.add_items() = Item(DecodeRequest(twins[0].first, 1, 501));
  ASSERT_TRUE(Batch(layer1, &response).ok());
  for (const auto& result : response.results()) EXPECT_EQ(result.code(), 0) << result.message();
  *next.add_items() = Item(DecodeRequest(twins[1].first, 0, 401));
  ASSERT_TRUE(Batch(next, &response).ok());
  EXPECT_EQ(response.results(0).code(), 0);
  EXPECT_EQ(response.results(1).code(), 0);
  ASSERT_TRUE(Batch(next, &response).ok());  // Both are now a step ahead on layer 0.
  EXPECT_EQ(response.results(0).code(), static_cast<int>(grpc::StatusCode::FAILED_PRECONDITION));
  EXPECT_EQ(Lengths(twins[0].first), (std::vector<int64_t>{7, 6}));
  EXPECT_EQ(Lengths(twins[1].first), (std::vector<int64_t>{16, 15}));
}

TEST_F(BatchTest, WholeRequestErrorsChangeNothing) {
  StartServer();
  RegisterLayout();
  auto [a, b] = Twins(3, 1);
  headwise::v1::DecodeStepBatchRequest request;
  request.set_layer(0);
  *request.add_items() = Item(DecodeRequest(a, 0, 1));
  *request.add_items() = Item(DecodeRequest(a, 0, 2));
  headwise::v1::DecodeStepBatchResponse response;
  EXPECT_EQ(Batch(request, &response).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  request.clear_items();
  for (int i = 0; i < 257; ++i) *request.add_items() = Item(DecodeRequest(i == 0 ? a : b, 0, 1));
  EXPECT_EQ(Batch(request, &response).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Lengths(a), (std::vector<int64_t>{3, 3}));
  EXPECT_EQ(Lengths(b), (std::vector<int64_t>{3, 3}));
}

TEST_F(BatchTest, StagedPayloadsRetriesAndDurableItems) {
  StartServer();
  RegisterLayout();
  auto [a, twin_a] = Twins(4, 1, /*durable=*/true);
  auto [b, twin_b] = Twins(9, 2);
  auto region = OpenRegion(1 << 16);
  ASSERT_NE(region->base, nullptr);
  // Item a: q, k, v staged and outputs placed; item b: inline.
  auto step_a = DecodeRequest(a, 0, 10, /*step_id=*/77);
  auto step_b = DecodeRequest(b, 0, 20, /*step_id=*/78);
  auto stage = [&](headwise::v1::Tensor* t, uint64_t offset) {
    std::memcpy(region->base + offset, t->data().data(), t->data().size());
    const uint64_t length = t->data().size();
    t->mutable_staged()->set_region_id(region->id);
    t->mutable_staged()->set_offset(offset);
    t->mutable_staged()->set_length(length);
  };
  headwise::v1::DecodeStepBatchRequest request;
  request.set_layer(0);
  *request.add_items() = Item(step_a);
  stage(request.mutable_items(0)->mutable_q(), 0);
  stage(request.mutable_items(0)->mutable_k(), 1024);
  stage(request.mutable_items(0)->mutable_v(), 2048);
  request.mutable_items(0)->mutable_output()->set_region_id(region->id);
  request.mutable_items(0)->mutable_output()->set_offset(4096);
  *request.add_items() = Item(step_b);
  headwise::v1::DecodeStepBatchResponse first, again;
  ASSERT_TRUE(Batch(request, &first).ok());
  ASSERT_EQ(first.results(0).code(), 0) << first.results(0).message();
  ASSERT_EQ(first.results(1).code(), 0) << first.results(1).message();
  ASSERT_TRUE(first.results(0).o().has_staged());
  std::vector<float> staged_o(64);
  std::memcpy(staged_o.data(), region->base + 4096, sizeof(float) * 64);
  headwise::v1::DecodeStepResponse want_a, want_b;
  step_a.set_handle(twin_a);
  step_b.set_handle(twin_b);
  ASSERT_TRUE(stub_->DecodeStep(Ctx().get(), step_a, &want_a).ok());
  ASSERT_TRUE(stub_->DecodeStep(Ctx().get(), step_b, &want_b).ok());
  EXPECT_EQ(staged_o, TensorFloats(want_a.o()));
  EXPECT_EQ(TensorFloats(first.results(1).o()), TensorFloats(want_b.o()));
  // The same batch again: both items are retries, answered the same, appending nothing.
  std::memset(region->base + 4096, 0, sizeof(float) * 64);
  ASSERT_TRUE(Batch(request, &again).ok());
  std::memcpy(staged_o.data(), region->base + 4096, sizeof(float) * 64);
  EXPECT_EQ(staged_o, TensorFloats(want_a.o()));
  EXPECT_EQ(TensorFloats(again.results(1).o()), TensorFloats(first.results(1).o()));
  EXPECT_EQ(again.results(1).layer_length(), 10);
  EXPECT_EQ(Lengths(a), (std::vector<int64_t>{5, 4}));
  EXPECT_EQ(Lengths(b), (std::vector<int64_t>{10, 9}));
  Restart();
  EXPECT_EQ(Lengths(a), (std::vector<int64_t>{5, 4}));
}

// The durable items' log write fails: those items fail with it and change nothing (also after a
// restart); the cache item of the same batch is applied.
TEST_F(BatchTest, FailingLogWriteFailsOnlyTheDurableItems) {
  StartServer();
  RegisterLayout();
  auto [durable, durable_twin] = Twins(3, 1, /*durable=*/true);
  auto [cache, cache_twin] = Twins(3, 2);
  DurableLog::SetWriteFaultForTesting([](std::string_view what) {
    return what == "PutAppends" ? absl::DataLossError("injected") : absl::OkStatus();
  });
  headwise::v1::DecodeStepBatchRequest request;
  request.set_layer(0);
  *request.add_items() = Item(DecodeRequest(durable, 0, 1));
  *request.add_items() = Item(DecodeRequest(cache, 0, 2));
  headwise::v1::DecodeStepBatchResponse response;
  grpc::Status status = Batch(request, &response);
  DurableLog::SetWriteFaultForTesting(nullptr);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.results(0).code(), static_cast<int>(grpc::StatusCode::DATA_LOSS));
  EXPECT_EQ(response.results(1).code(), 0) << response.results(1).message();
  EXPECT_EQ(Lengths(durable), (std::vector<int64_t>{3, 3}));
  EXPECT_EQ(Lengths(cache), (std::vector<int64_t>{4, 3}));
  Restart();
  EXPECT_EQ(Lengths(durable), (std::vector<int64_t>{3, 3}));
}

}  // namespace
}  // namespace headwise::testing
