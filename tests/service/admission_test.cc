// Fairness and admission (issue 14 item 1): one tenant's bulk work cannot starve another's
// decode steps, per-tenant limits refuse rather than queue, a cancelled queued call leaves the
// queue without running, and per-call token limits bound a single call's cost.
//
// Each test holds the workers deterministically: a Prefill blocks in the before-outputs hook
// until the test releases it. No assertion depends on timing; a deadline only turns a would-be
// hang of the old FIFO pool into a failure.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "cachesvc/service/headwise_service.h"
#include "service_fixture.h"

namespace headwise::testing {
namespace {

constexpr int kTokenFloats = 2 * 16;  // One token of TestLayout(): 2 KV heads x 16.

class AdmissionTest : public ServiceTest {
 protected:
  void TearDown() override {
    Release();
    for (auto& t : threads_) t.join();
    HeadwiseService::SetBeforeOutputsHookForTesting(nullptr);
    ServiceTest::TearDown();
  }

  // From now on every Prefill blocks after its engine call until Release().
  void BlockPrefills() {
    HeadwiseService::SetBeforeOutputsHookForTesting([this](std::string_view rpc) {
      if (rpc != "Prefill") return;
      absl::MutexLock lock(&mu_);
      ++blocked_;
      mu_.Await(absl::Condition(&released_));
    });
  }
  void Release() {
    absl::MutexLock lock(&mu_);
    released_ = true;
  }
  // Waits until `n` prefills are blocked in the hook.
  void AwaitBlocked(int n) {
    absl::MutexLock lock(&mu_);
    auto enough = [this, n]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return blocked_ >= n; };
    mu_.Await(absl::Condition(&enough));
  }

  static headwise::v1::PrefillRequest Prefill(const std::string& handle, int tokens,
                                              uint32_t seed) {
    headwise::v1::PrefillRequest request;
    request.set_handle(handle);
    request.set_layer(0);
    *request.mutable_q() = F32Tensor(RandomValues(tokens * 4 * 16, seed), {tokens, 4, 16});
    *request.mutable_k() =
        F32Tensor(RandomValues(tokens * kTokenFloats, seed + 1), {tokens, 2, 16});
    *request.mutable_v() =
        F32Tensor(RandomValues(tokens * kTokenFloats, seed + 2), {tokens, 2, 16});
    return request;
  }

  // Sends a Prefill on its own thread; its status lands in statuses_[i].
  void PrefillAsync(const std::string& handle, int i, const std::string& token = kAliceToken) {
    threads_.emplace_back([this, handle, i, token] {
      headwise::v1::PrefillResponse response;
      grpc::Status status =
          stub_->Prefill(Ctx(token).get(), Prefill(handle, 4, 100 + i), &response);
      absl::MutexLock lock(&mu_);
      statuses_[i] = status.error_code();
    });
  }

  FairScheduler::Counters Counters() { return server_->service()->scheduler_counters(); }

  absl::Mutex mu_;
  bool released_ ABSL_GUARDED_BY(mu_) = false;
  int blocked_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<int, grpc::StatusCode> statuses_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> threads_;
};

// With 3 workers, bulk work takes at most 2: a decode step of another tenant runs while alice's
// prefills hold every bulk worker and more wait behind them. Under the old FIFO pool the third
// prefill took the last worker and the decode step waited for a prefill to finish (here: its
// deadline).
TEST_F(AdmissionTest, DecodeStepRunsWhileAnotherTenantFloodsPrefills) {
  StartServer();
  RegisterLayout();
  RegisterLayout(kBobToken);
  std::vector<std::string> alice;
  for (int i = 0; i < 4; ++i) alice.push_back(CreateSequence());
  const std::string bob = CreateSequence(false, kBobToken);
  BlockPrefills();
  for (int i = 0; i < 4; ++i) PrefillAsync(alice[i], i);
  AwaitBlocked(2);
  // The other two wait in the bulk lane.
  while (Counters().queued[1] < 2) std::this_thread::yield();

  auto ctx = Ctx(kBobToken);
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  headwise::v1::DecodeStepResponse response;
  grpc::Status status = stub_->DecodeStep(ctx.get(), DecodeRequest(bob, 0, 7), &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(Lengths(bob, kBobToken), (std::vector<int64_t>{1, 0}));
  {
    absl::MutexLock lock(&mu_);
    EXPECT_EQ(blocked_, 2);  // Alice's prefills are still held: nothing was reordered away.
  }
  Release();
  for (auto& t : threads_) t.join();
  threads_.clear();
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(statuses_[i], grpc::StatusCode::OK) << i;
    EXPECT_EQ(Lengths(alice[i]), (std::vector<int64_t>{4, 0}));
  }
}

// A tenant at its max_calls is refused at once with RESOURCE_EXHAUSTED; another tenant is not.
TEST_F(AdmissionTest, TenantCallLimitRefusesInsteadOfQueuing) {
  config_.mutable_tenants(0)->mutable_quota()->set_max_calls(2);
  StartServer();
  RegisterLayout();
  RegisterLayout(kBobToken);
  const std::string a = CreateSequence(), b = CreateSequence(), c = CreateSequence();
  BlockPrefills();
  PrefillAsync(a, 0);
  PrefillAsync(b, 1);
  AwaitBlocked(2);
  headwise::v1::PrefillResponse response;
  grpc::Status refused = stub_->Prefill(Ctx().get(), Prefill(c, 4, 9), &response);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(refused.error_message().find("limit 2"), std::string::npos) << refused.error_message();
  // Every call counts, cheap ones too: alice cannot even look until one finishes.
  EXPECT_EQ(Lengths(c), std::vector<int64_t>{});
  EXPECT_EQ(Counters().rejected, 2);
  // Bob is unaffected.
  const std::string bob = CreateSequence(false, kBobToken);
  headwise::v1::DecodeStepResponse step;
  EXPECT_TRUE(stub_->DecodeStep(Ctx(kBobToken).get(), DecodeRequest(bob, 0, 3), &step).ok());
  Release();
  for (auto& t : threads_) t.join();
  threads_.clear();
  EXPECT_EQ(Lengths(c), (std::vector<int64_t>{0, 0}));  // Refused: nothing changed.
  EXPECT_EQ(Lengths(a), (std::vector<int64_t>{4, 0}));
}

// A queued call whose client cancels leaves the queue at once and never runs.
TEST_F(AdmissionTest, CancelledQueuedCallNeverRuns) {
  StartServer();
  RegisterLayout();
  const std::string a = CreateSequence(), b = CreateSequence(), c = CreateSequence();
  BlockPrefills();
  PrefillAsync(a, 0);
  PrefillAsync(b, 1);
  AwaitBlocked(2);
  grpc::ClientContext* cancel_me = nullptr;
  absl::Mutex ctx_mu;
  std::thread queued([&] {
    auto ctx = Ctx();
    {
      absl::MutexLock lock(&ctx_mu);
      cancel_me = ctx.get();
    }
    headwise::v1::PrefillResponse response;
    grpc::Status status = stub_->Prefill(ctx.get(), Prefill(c, 4, 11), &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED);
    absl::MutexLock lock(&ctx_mu);
    cancel_me = nullptr;
  });
  while (Counters().queued[1] < 1) std::this_thread::yield();
  {
    absl::MutexLock lock(&ctx_mu);
    ASSERT_NE(cancel_me, nullptr);
    cancel_me->TryCancel();
  }
  queued.join();
  while (Counters().cancelled < 1) std::this_thread::yield();
  EXPECT_EQ(Counters().queued[1], 0);
  Release();
  for (auto& t : threads_) t.join();
  threads_.clear();
  EXPECT_EQ(Lengths(a), (std::vector<int64_t>{4, 0}));
  EXPECT_EQ(Lengths(c), (std::vector<int64_t>{0, 0}));  // The cancelled prefill never ran.
  const std::string metrics = server_->RenderMetrics();
  EXPECT_NE(metrics.find("headwise_calls_cancelled_total 1"), std::string::npos) << metrics;
}

// admission.max_prefill_tokens_per_call and max_append_tokens_per_call bound one call; a call
// over them is RESOURCE_EXHAUSTED and changes nothing.
TEST_F(AdmissionTest, PerCallTokenLimits) {
  config_.mutable_admission()->set_max_prefill_tokens_per_call(8);
  config_.mutable_admission()->set_max_append_tokens_per_call(6);
  StartServer();
  RegisterLayout();
  const std::string seq = CreateSequence();
  headwise::v1::PrefillResponse response;
  grpc::Status big = stub_->Prefill(Ctx().get(), Prefill(seq, 9, 1), &response);
  EXPECT_EQ(big.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(big.error_message().find("max_prefill_tokens_per_call"), std::string::npos)
      << big.error_message();
  EXPECT_EQ(Lengths(seq), (std::vector<int64_t>{0, 0}));
  EXPECT_TRUE(stub_->Prefill(Ctx().get(), Prefill(seq, 8, 2), &response).ok());
  EXPECT_EQ(Lengths(seq), (std::vector<int64_t>{8, 0}));
  const std::string other = CreateSequence();
  EXPECT_EQ(
      Append(other, 0, RandomValues(7 * kTokenFloats, 3), RandomValues(7 * kTokenFloats, 4), 7)
          .error_code(),
      grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(Lengths(other), (std::vector<int64_t>{0, 0}));
  EXPECT_TRUE(
      Append(other, 0, RandomValues(6 * kTokenFloats, 5), RandomValues(6 * kTokenFloats, 6), 6)
          .ok());
  EXPECT_EQ(Lengths(other), (std::vector<int64_t>{6, 0}));
}

TEST_F(AdmissionTest, ConfigRejectsZeroLimits) {
  config_.mutable_admission()->set_max_queued_calls(0);
  EXPECT_FALSE(ResolveConfig(config_, "").ok());
}

}  // namespace
}  // namespace headwise::testing
