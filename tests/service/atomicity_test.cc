// "A refused call changes nothing" and idempotent step ids, against the real service: refused
// decode steps (staging, append rule, log faults), output regions closed mid-call or invalid,
// retries with a step id (live and after a restart), and the tenant lock not held across the
// durable log's write.
#include <atomic>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/notification.h"
#include "cachesvc/service/durable_log.h"
#include "cachesvc/service/headwise_service.h"
#include "tests/service/service_fixture.h"

namespace headwise::testing {
namespace {

constexpr int kTokenFloats = 2 * 16;  // num_kv_heads * head_dim.

class AtomicityTest : public ServiceTest {
 protected:
  void TearDown() override {
    DurableLog::SetWriteFaultForTesting(nullptr);
    HeadwiseService::SetBeforeOutputsHookForTesting(nullptr);
    ServiceTest::TearDown();
  }

  // `tokens` random tokens on every layer.
  void Fill(const std::string& handle, int tokens, uint32_t seed) {
    for (int layer = 0; layer < 2; ++layer) {
      grpc::Status status = Append(handle, layer, RandomValues(tokens * kTokenFloats, seed + layer),
                                   RandomValues(tokens * kTokenFloats, seed + 10 + layer), tokens);
      ASSERT_TRUE(status.ok()) << status.error_message();
    }
  }

  grpc::Status Decode(const headwise::v1::DecodeStepRequest& request,
                      headwise::v1::DecodeStepResponse* response) {
    return stub_->DecodeStep(Ctx().get(), request, response);
  }

  static headwise::v1::PrefillRequest PrefillRequest(const std::string& handle, int layer,
                                                     int tokens, uint32_t seed) {
    headwise::v1::PrefillRequest request;
    request.set_handle(handle);
    request.set_layer(layer);
    *request.mutable_q() = F32Tensor(RandomValues(tokens * 64, seed), {tokens, 4, 16});
    *request.mutable_k() =
        F32Tensor(RandomValues(tokens * kTokenFloats, seed + 1), {tokens, 2, 16});
    *request.mutable_v() =
        F32Tensor(RandomValues(tokens * kTokenFloats, seed + 2), {tokens, 2, 16});
    return request;
  }
};

headwise::v1::PolicySpec LayerOffload() {
  headwise::v1::PolicySpec policy;
  policy.mutable_placement()->set_mode(headwise::v1::Placement::LAYER_OFFLOAD);
  return policy;
}

// Seen on the daemon: RESOURCE_EXHAUSTED ("cannot stage") yet the layer grew by one, and the
// append was logged, so a restart grew it too.
TEST_F(AtomicityTest, LayerOffloadDecodeStepRefusedForStagingChangesNothing) {
  // A page of TestLayout() is 16 tokens * 2 (K, V) * 16 dims * 4 bytes = 2 KiB: the device tier
  // holds two, a layer of 48 tokens over 2 KV heads needs six.
  config_.set_device_budget_bytes(4096);
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence(/*durable=*/true, kAliceToken, LayerOffload());
  Fill(handle, 48, 1);
  headwise::v1::DecodeStepResponse response;
  grpc::Status status = Decode(DecodeRequest(handle, 0, 7), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{48, 48}));
  // A retry of the same refused step is refused again and still changes nothing.
  status = Decode(DecodeRequest(handle, 0, 7, /*step_id=*/5), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{48, 48}));
  Restart();
  EXPECT_EQ(server_->restored_sequences(), 1);
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{48, 48}));
}

// The engine refuses after the log write (the append rule): the op is removed from the log.
TEST_F(AtomicityTest, DecodeStepRefusedByTheEngineIsNotReplayed) {
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence(/*durable=*/true);
  Fill(handle, 5, 1);
  headwise::v1::DecodeStepResponse response;
  ASSERT_TRUE(Decode(DecodeRequest(handle, 0, 7), &response).ok());
  // Layer 0 is a step ahead of layer 1: another step on it breaks the append rule.
  EXPECT_EQ(Decode(DecodeRequest(handle, 0, 8), &response).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{6, 5}));
  Restart();
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{6, 5}));
}

TEST_F(AtomicityTest, FailingLogWriteChangesNothing) {
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence(/*durable=*/true);
  Fill(handle, 5, 1);
  DurableLog::SetWriteFaultForTesting([](std::string_view what) {
    return what == "PutAppend" ? absl::DataLossError("injected: disk full") : absl::OkStatus();
  });
  headwise::v1::DecodeStepResponse response;
  EXPECT_EQ(Decode(DecodeRequest(handle, 0, 7), &response).error_code(),
            grpc::StatusCode::DATA_LOSS);
  headwise::v1::PrefillResponse prefill;
  EXPECT_EQ(stub_->Prefill(Ctx().get(), PrefillRequest(handle, 1, 3, 20), &prefill).error_code(),
            grpc::StatusCode::DATA_LOSS);
  EXPECT_EQ(Append(handle, 1, RandomValues(kTokenFloats, 30), RandomValues(kTokenFloats, 31), 1)
                .error_code(),
            grpc::StatusCode::DATA_LOSS);
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{5, 5}));
  // A refused step whose removal from the log fails too: the next op reuses (overwrites) the
  // stale op, so a restart after it replays exactly what was acknowledged.
  DurableLog::SetWriteFaultForTesting([](std::string_view what) {
    return what == "DeleteOp" ? absl::UnavailableError("injected") : absl::OkStatus();
  });
  ASSERT_TRUE(Decode(DecodeRequest(handle, 0, 40), &response).ok());
  EXPECT_EQ(Decode(DecodeRequest(handle, 0, 41), &response).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  ASSERT_TRUE(Decode(DecodeRequest(handle, 1, 42), &response).ok());
  DurableLog::SetWriteFaultForTesting(nullptr);
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{6, 6}));
  Restart();
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{6, 6}));
}

// The output region is closed after the call was validated, while the engine runs: the call
// must not fail after its append (the region was pinned), and the outputs land in the memory
// the client still maps.
TEST_F(AtomicityTest, OutputRegionClosedMidCallStillAnswersAndAppendsOnce) {
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence(/*durable=*/true);
  Fill(handle, 5, 1);
  auto region = OpenRegion(1 << 16);
  ASSERT_NE(region->base, nullptr);
  std::atomic<int> closed{0};
  HeadwiseService::SetBeforeOutputsHookForTesting([&](std::string_view) {
    EXPECT_TRUE(CloseRegion(region->id).ok());
    ++closed;
  });
  auto prefill = PrefillRequest(handle, 0, 3, 50);
  prefill.mutable_output()->set_region_id(region->id);
  prefill.mutable_output()->set_offset(256);
  headwise::v1::PrefillResponse prefilled;
  grpc::Status status = stub_->Prefill(Ctx().get(), prefill, &prefilled);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(closed.load(), 1);
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{8, 5}));
  ASSERT_TRUE(prefilled.o().has_staged());
  // The outputs equal the same prefill with inline outputs on a twin sequence.
  HeadwiseService::SetBeforeOutputsHookForTesting(nullptr);
  const std::string twin = CreateSequence();
  Fill(twin, 5, 1);
  prefill.set_handle(twin);
  prefill.clear_output();
  headwise::v1::PrefillResponse inline_out;
  ASSERT_TRUE(stub_->Prefill(Ctx().get(), prefill, &inline_out).ok());
  std::vector<float> staged_o(3 * 64);
  std::memcpy(staged_o.data(), region->base + 256, staged_o.size() * sizeof(float));
  EXPECT_EQ(staged_o, TensorFloats(inline_out.o()));

  // The same for a decode step (layer 1 first catches up with layer 0).
  ASSERT_TRUE(stub_->Prefill(Ctx().get(), PrefillRequest(handle, 1, 3, 55), &prefilled).ok());
  auto region2 = OpenRegion(1 << 16);
  HeadwiseService::SetBeforeOutputsHookForTesting(
      [&](std::string_view) { EXPECT_TRUE(CloseRegion(region2->id).ok()); });
  auto step = DecodeRequest(handle, 1, 60);
  step.mutable_output()->set_region_id(region2->id);
  headwise::v1::DecodeStepResponse decoded;
  status = Decode(step, &decoded);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(decoded.layer_length(), 9);
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{8, 9}));
  HeadwiseService::SetBeforeOutputsHookForTesting(nullptr);
  Restart();
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{8, 9}));
}

// An output placement that is invalid from the start is refused before any change.
TEST_F(AtomicityTest, InvalidOutputPlacementChangesNothingAlsoAfterRestart) {
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence(/*durable=*/true);
  Fill(handle, 5, 1);
  auto region = OpenRegion(4096);
  const std::string closed_id = OpenRegion(4096)->id;
  ASSERT_TRUE(CloseRegion(closed_id).ok());
  for (const auto& [id, offset] : std::vector<std::pair<std::string, uint64_t>>{
           {closed_id, 0}, {"no-such-region", 0}, {region->id, 4000}}) {
    auto prefill = PrefillRequest(handle, 0, 3, 50);
    prefill.mutable_output()->set_region_id(id);
    prefill.mutable_output()->set_offset(offset);
    headwise::v1::PrefillResponse prefilled;
    EXPECT_EQ(stub_->Prefill(Ctx().get(), prefill, &prefilled).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
    auto step = DecodeRequest(handle, 0, 60);
    step.mutable_output()->set_region_id(id);
    step.mutable_output()->set_offset(offset);
    headwise::v1::DecodeStepResponse decoded;
    EXPECT_EQ(Decode(step, &decoded).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{5, 5}));
  Restart();
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{5, 5}));
}

TEST_F(AtomicityTest, RetriedStepIdsAppendOnceAndAnswerTheSame) {
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence();
  Fill(handle, 5, 1);
  // DecodeStep: the retry returns the first answer bit for bit and appends nothing.
  headwise::v1::DecodeStepResponse first, retry;
  ASSERT_TRUE(Decode(DecodeRequest(handle, 0, 7, /*step_id=*/100), &first).ok());
  ASSERT_TRUE(Decode(DecodeRequest(handle, 0, 7, /*step_id=*/100), &retry).ok());
  EXPECT_EQ(first.layer_length(), 6);
  EXPECT_EQ(retry.layer_length(), 6);
  EXPECT_EQ(TensorFloats(retry.o()), TensorFloats(first.o()));
  EXPECT_EQ(TensorFloats(retry.lse()), TensorFloats(first.lse()));
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{6, 5}));
  // Append: the same.
  headwise::v1::AppendRequest append;
  append.set_handle(handle);
  append.set_layer(1);
  *append.mutable_k() = F32Tensor(RandomValues(kTokenFloats, 8), {1, 2, 16});
  *append.mutable_v() = F32Tensor(RandomValues(kTokenFloats, 9), {1, 2, 16});
  append.set_step_id(101);
  for (int attempt = 0; attempt < 3; ++attempt) {
    headwise::v1::AppendResponse appended;
    ASSERT_TRUE(stub_->Append(Ctx().get(), append, &appended).ok());
    EXPECT_EQ(appended.layer_length(), 6);
  }
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{6, 6}));
  // Prefill: small outputs are kept, so the retry answers them.
  headwise::v1::PrefillRequest prefill = PrefillRequest(handle, 0, 2, 70);
  prefill.set_step_id(102);
  headwise::v1::PrefillResponse p1, p2;
  ASSERT_TRUE(stub_->Prefill(Ctx().get(), prefill, &p1).ok());
  ASSERT_TRUE(stub_->Prefill(Ctx().get(), prefill, &p2).ok());
  EXPECT_EQ(TensorFloats(p2.o()), TensorFloats(p1.o()));
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{8, 6}));
  // The id reused by another kind of call on that layer is refused, changing nothing.
  headwise::v1::DecodeStepResponse misuse;
  EXPECT_EQ(Decode(DecodeRequest(handle, 0, 9, /*step_id=*/102), &misuse).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  // Only the last step of a layer is remembered: after another step on layer 1, id 101 is new.
  ASSERT_TRUE(stub_->Prefill(Ctx().get(), PrefillRequest(handle, 1, 2, 80), &p1).ok());
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{8, 8}));
  headwise::v1::AppendResponse appended;
  ASSERT_TRUE(stub_->Append(Ctx().get(), append, &appended).ok());
  EXPECT_EQ(appended.layer_length(), 9);
  // Truncate forgets every layer's step.
  headwise::v1::TruncateRequest truncate;
  truncate.set_handle(handle);
  truncate.set_length(8);
  headwise::v1::TruncateResponse truncated;
  ASSERT_TRUE(stub_->Truncate(Ctx().get(), truncate, &truncated).ok());
  ASSERT_TRUE(stub_->Append(Ctx().get(), append, &appended).ok());
  EXPECT_EQ(appended.layer_length(), 9);
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{8, 9}));
}

TEST_F(AtomicityTest, StepIdsOfDurableSequencesSurviveARestart) {
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence(/*durable=*/true);
  Fill(handle, 20, 1);
  headwise::v1::DecodeStepResponse first, retry;
  ASSERT_TRUE(Decode(DecodeRequest(handle, 0, 7, /*step_id=*/1), &first).ok());
  headwise::v1::PrefillRequest prefill = PrefillRequest(handle, 1, 1, 70);
  prefill.set_step_id(2);
  headwise::v1::PrefillResponse prefilled;
  ASSERT_TRUE(stub_->Prefill(Ctx().get(), prefill, &prefilled).ok());
  Restart();
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{21, 21}));
  // The decode retry is recomputed (attend the same q): the same outputs.
  ASSERT_TRUE(Decode(DecodeRequest(handle, 0, 7, /*step_id=*/1), &retry).ok());
  EXPECT_EQ(retry.layer_length(), 21);
  const std::vector<float> o1 = TensorFloats(first.o()), o2 = TensorFloats(retry.o());
  const std::vector<float> l1 = TensorFloats(first.lse()), l2 = TensorFloats(retry.lse());
  ASSERT_EQ(o1.size(), o2.size());
  for (size_t i = 0; i < o1.size(); ++i) EXPECT_NEAR(o2[i], o1[i], 1e-6f) << i;
  for (size_t i = 0; i < l1.size(); ++i) EXPECT_NEAR(l2[i], l1[i], 1e-6f) << i;
  // The prefill's outputs are gone: ALREADY_EXISTS, and nothing appended.
  EXPECT_EQ(stub_->Prefill(Ctx().get(), prefill, &prefilled).error_code(),
            grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{21, 21}));
}

// The tenant lock is not held across the durable log's (fsynced) write: while a RegisterLayout
// of the tenant waits inside the log write, its data calls (which take the tenant lock for
// usage and quotas) still complete.
TEST_F(AtomicityTest, TenantLockIsNotHeldAcrossTheLogWrite) {
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence();
  absl::Notification in_write, release;
  DurableLog::SetWriteFaultForTesting([&](std::string_view what) {
    if (what == "PutLayout") {
      in_write.Notify();
      release.WaitForNotification();
    }
    return absl::OkStatus();
  });
  std::thread registering([&] {
    headwise::v1::RegisterLayoutRequest request;
    request.set_name("second");
    *request.mutable_layout() = TestLayout();
    headwise::v1::RegisterLayoutResponse response;
    EXPECT_TRUE(stub_->RegisterLayout(Ctx().get(), request, &response).ok());
  });
  in_write.WaitForNotification();
  // Would block until `release` if the write ran under the tenant lock.
  EXPECT_TRUE(
      Append(handle, 0, RandomValues(kTokenFloats, 1), RandomValues(kTokenFloats, 2), 1).ok());
  headwise::v1::StatsResponse stats;
  EXPECT_TRUE(stub_->Stats(Ctx().get(), headwise::v1::StatsRequest(), &stats).ok());
  EXPECT_EQ(stats.tenant_sequences(), 1u);
  release.Notify();
  registering.join();
  DurableLog::SetWriteFaultForTesting(nullptr);
  // The layout is usable once its registration returned.
  headwise::v1::CreateSequenceRequest create;
  create.set_layout_name("second");
  headwise::v1::CreateSequenceResponse created;
  EXPECT_TRUE(stub_->CreateSequence(Ctx().get(), create, &created).ok());
}

}  // namespace
}  // namespace headwise::testing
