// Hardening of the service (issue 14): quotas that hold under concurrency, Stats that shows a
// tenant only its own figures, non-finite K/V/Q refused by name, and error messages that do not
// overflow. Each test failed on the code before the fix (see the commit that added it).
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "cachesvc/service/durable_log.h"
#include "cachesvc/service/tenants.h"
#include "tests/service/service_fixture.h"

namespace headwise::testing {
namespace {

// gtest without gmock: the message, when it does not start with / contain the text.
::testing::AssertionResult StartsWith(const std::string& message, const std::string& prefix) {
  if (absl::StartsWith(message, prefix)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "'" << message << "' does not start with '" << prefix << "'";
}
::testing::AssertionResult Contains(const std::string& message, const std::string& part) {
  if (absl::StrContains(message, part)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "'" << message << "' does not contain '" << part << "'";
}

constexpr char kOpsToken[] = "ops-token-5555555555";
// TestLayout(): one token of one layer is 2 heads * 16 dims * 4 bytes * 2 (K, V) = 256 bytes; a
// page is 16 tokens of one head: 16 * 16 * 4 * 2 = 2 KiB.
constexpr int kTokenFloats = 2 * 16;
constexpr int64_t kPageBytes = 2048;
// Page-aligned appends of 256 KiB (64 pages per head), so what an append may take (its
// reservation) is exactly what it takes.
constexpr int kAppendTokens = 1024;
constexpr uint64_t kAppendBytes = kAppendTokens * 256;
constexpr int kCalls = 16;
constexpr int kFit = 4;

class HardeningTest : public ServiceTest {
 protected:
  // Appends kAppendTokens tokens to layer 0 of every handle at once (one thread each, released
  // together) and returns the number accepted; every other call must be RESOURCE_EXHAUSTED.
  // `on_refused` runs in the caller's thread after each refusal.
  int AppendConcurrently(
      const std::vector<std::string>& handles, const std::function<void()>& on_refused = [] {}) {
    const std::vector<float> k = RandomValues(kAppendTokens * kTokenFloats, 1);
    const std::vector<float> v = RandomValues(kAppendTokens * kTokenFloats, 2);
    absl::Notification go;
    std::atomic<int> accepted{0};
    std::vector<std::thread> threads;
    for (const std::string& handle : handles) {
      threads.emplace_back([&, handle] {
        go.WaitForNotification();
        const grpc::Status status = Append(handle, 0, k, v, kAppendTokens);
        if (status.ok()) {
          ++accepted;
          return;
        }
        EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
            << status.error_message();
        on_refused();
      });
    }
    go.Notify();
    for (std::thread& t : threads) t.join();
    return accepted.load();
  }

  headwise::v1::StatsResponse Stats(const std::string& token = kAliceToken) {
    headwise::v1::StatsResponse stats;
    const grpc::Status status =
        stub_->Stats(Ctx(token).get(), headwise::v1::StatsRequest(), &stats);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return stats;
  }

  // The sum of GetSequence's device bytes over `handles`.
  uint64_t DeviceBytes(const std::vector<std::string>& handles) {
    uint64_t sum = 0;
    for (const std::string& handle : handles) {
      headwise::v1::GetSequenceRequest request;
      request.set_handle(handle);
      headwise::v1::SequenceInfo info;
      EXPECT_TRUE(stub_->GetSequence(Ctx().get(), request, &info).ok());
      sum += info.device_bytes();
    }
    return sum;
  }

  // Starts the server; Alice gets one sequence holding 16 tokens in layer 0: one page per kv
  // head (2 pages, 4 KiB) on the device.
  void StartWithOnePagePerHead() {
    StartServer();
    RegisterLayout();
    const std::string handle = CreateSequence();
    ASSERT_TRUE(Append(handle, 0, RandomValues(16 * kTokenFloats, 1),
                       RandomValues(16 * kTokenFloats, 2), 16)
                    .ok());
  }

  void ReleaseAll(const std::vector<std::string>& handles) {
    for (const std::string& handle : handles) {
      headwise::v1::ReleaseRequest request;
      request.set_handle(handle);
      headwise::v1::ReleaseResponse response;
      EXPECT_TRUE(stub_->Release(Ctx().get(), request, &response).ok());
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Item 3: quotas hold under concurrency.

// A sync point between admission and the engine call (each durable append waits in its log write
// until every call has either reached that write or been answered) makes the race certain: with
// a check-then-update quota all 16 calls pass the check before any updates the usage. With the
// quota reserved before the work, exactly the 4 that fit reach the engine.
TEST_F(HardeningTest, QuotaIsReservedBeforeTheWorkNotCheckedThenUpdated) {
  config_.set_worker_threads(kCalls);  // Every call can be in flight at once.
  config_.mutable_tenants(0)->mutable_quota()->set_max_device_bytes(kFit * kAppendBytes);
  StartServer();
  RegisterLayout();
  std::vector<std::string> handles;
  for (int i = 0; i < kCalls; ++i) handles.push_back(CreateSequence(/*durable=*/true));

  absl::Mutex mu;
  int in_write = 0, refused = 0;
  DurableLog::SetWriteFaultForTesting([&](std::string_view what) {
    if (what != "PutAppend") return absl::OkStatus();
    absl::MutexLock lock(&mu);
    ++in_write;
    auto all_decided = [&] { return in_write + refused == kCalls; };
    // Bounded, so that a bug fails the counts below instead of hanging.
    mu.AwaitWithTimeout(absl::Condition(&all_decided), absl::Seconds(60));
    return absl::OkStatus();
  });
  const int accepted = AppendConcurrently(handles, [&] {
    absl::MutexLock lock(&mu);
    ++refused;
  });
  DurableLog::SetWriteFaultForTesting(nullptr);

  EXPECT_EQ(accepted, kFit);
  EXPECT_EQ(refused, kCalls - kFit);
  EXPECT_EQ(DeviceBytes(handles), kFit * kAppendBytes);
  const headwise::v1::StatsResponse stats = Stats();
  EXPECT_EQ(stats.tenant_bytes(), kFit * kAppendBytes);
  ASSERT_GE(stats.tiers_size(), 1);
  EXPECT_EQ(stats.tiers(0).tier(), "device");
  EXPECT_LE(stats.tiers(0).peak_bytes(), kFit * kAppendBytes);  // Never above the quota.
}

// The same contention without a sync point, on cache sequences, sampled by a Stats poller: the
// tenant's bytes never pass the quota, exactly what fits is accepted, and once released every
// reservation is back (the whole quota can be used again).
TEST_F(HardeningTest, ConcurrentAppendsAcceptExactlyWhatFits) {
  config_.set_worker_threads(8);
  const uint64_t quota = kFit * kAppendBytes;
  config_.mutable_tenants(0)->mutable_quota()->set_max_device_bytes(quota);
  StartServer();
  RegisterLayout();
  for (int round = 0; round < 3; ++round) {
    std::vector<std::string> handles;
    for (int i = 0; i < kCalls; ++i) handles.push_back(CreateSequence());
    std::atomic<bool> done{false};
    std::atomic<uint64_t> most_seen{0};
    std::thread poller([&] {
      while (!done.load()) {
        const uint64_t bytes = Stats().tenant_bytes();
        if (bytes > most_seen.load()) most_seen.store(bytes);
      }
    });
    const int accepted = AppendConcurrently(handles);
    done.store(true);
    poller.join();
    EXPECT_EQ(accepted, kFit) << "round " << round;
    EXPECT_LE(most_seen.load(), quota) << "round " << round;
    EXPECT_EQ(DeviceBytes(handles), quota) << "round " << round;
    const headwise::v1::StatsResponse stats = Stats();
    EXPECT_EQ(stats.tenant_bytes(), quota);
    EXPECT_LE(stats.tiers(0).peak_bytes(), quota);
    ReleaseAll(handles);
    EXPECT_EQ(Stats().tenant_bytes(), 0u);
  }
}

// A call refused after its reservation (here: the durable log write fails) gives it back.
TEST_F(HardeningTest, AReservationIsGivenBackWhenTheCallFails) {
  config_.mutable_tenants(0)->mutable_quota()->set_max_device_bytes(kAppendBytes);
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence(/*durable=*/true);
  const std::vector<float> k = RandomValues(kAppendTokens * kTokenFloats, 3);
  const std::vector<float> v = RandomValues(kAppendTokens * kTokenFloats, 4);
  DurableLog::SetWriteFaultForTesting([](std::string_view what) {
    return what == "PutAppend" ? absl::UnavailableError("injected") : absl::OkStatus();
  });
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(Append(handle, 0, k, v, kAppendTokens).error_code(), grpc::StatusCode::UNAVAILABLE);
  }
  DurableLog::SetWriteFaultForTesting(nullptr);
  const grpc::Status status = Append(handle, 0, k, v, kAppendTokens);
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(Stats().tenant_bytes(), kAppendBytes);
}

// What an append may take is whole pages per head (it is reserved as such), and what the tenant
// is charged is the pages the engine holds. Hand-computed with 16-token pages and 2 kv heads.
TEST_F(HardeningTest, QuotaCountsWholePages) {
  config_.mutable_tenants(0)->mutable_quota()->set_max_device_bytes(8 * kPageBytes);
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence();
  auto append = [&](int layer, int tokens, uint32_t seed) {
    return Append(handle, layer, RandomValues(tokens * kTokenFloats, seed),
                  RandomValues(tokens * kTokenFloats, seed + 1), tokens);
  };
  // 1 token per layer: each may take 1 page per head (2 pages, 4 KiB) and does; the tenant is
  // charged 4 KiB per layer, not the 256 bytes sent.
  ASSERT_TRUE(append(0, 1, 5).ok());
  ASSERT_TRUE(append(1, 1, 7).ok());
  EXPECT_EQ(Stats().tenant_bytes(), 4u * kPageBytes);
  // 16 more per layer: each may take 1 page per head (8 + 4 <= 16 KiB, then 12 + 4: admitted)
  // and takes exactly that (17 tokens are 2 pages per head).
  ASSERT_TRUE(append(0, 16, 9).ok());
  EXPECT_EQ(Stats().tenant_bytes(), 6u * kPageBytes);
  ASSERT_TRUE(append(1, 16, 11).ok());
  EXPECT_EQ(Stats().tenant_bytes(), 8u * kPageBytes);
  // The quota is full: even a token that fits in its head's tail page is refused (an append is
  // admitted only when every page it may take fits).
  EXPECT_EQ(append(0, 1, 13).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{17, 17}));
}

TEST(TierLedgerTest, ReservationsCountUntilSettledOrDestroyed) {
  headwise::v1::TenantQuota quota;
  quota.set_max_host_bytes(100);
  TierLedger ledger(quota);
  absl::StatusOr<TierLedger::Reservation> a = ledger.Reserve(Tier::kHost, 60);
  ASSERT_TRUE(a.ok());
  EXPECT_TRUE(absl::IsResourceExhausted(ledger.Reserve(Tier::kHost, 41).status()));
  {
    absl::StatusOr<TierLedger::Reservation> b = ledger.Reserve(Tier::kHost, 40);
    ASSERT_TRUE(b.ok());
    EXPECT_EQ(ledger.snapshot().reserved[1], 100);
  }  // Destroyed unsettled: given back.
  EXPECT_EQ(ledger.snapshot().reserved[1], 60);
  // The engine took 50 of the 60: charged 50, the reservation gone in the same step.
  ledger.Settle({0, 50, 0}, {0, 5, 0}, &*a);
  EXPECT_EQ(a->bytes(), 0u);
  TierLedger::Snapshot s = ledger.snapshot();
  EXPECT_EQ(s.bytes[1], 50);
  EXPECT_EQ(s.pages[1], 5);
  EXPECT_EQ(s.reserved[1], 0);
  EXPECT_TRUE(ledger.Reserve(Tier::kHost, 50).ok());
  EXPECT_FALSE(ledger.Reserve(Tier::kHost, 51).ok());
  // No device quota: anything is admitted, but a host tier past its quota refuses appends
  // anywhere.
  EXPECT_TRUE(ledger.Reserve(Tier::kDevice, uint64_t{1} << 40).ok());
  ledger.Settle({0, 60, 0}, {0, 6, 0});
  EXPECT_TRUE(absl::IsResourceExhausted(ledger.Reserve(Tier::kDevice, 1).status()));
  EXPECT_EQ(ledger.snapshot().peak[1], 110);
  // A reservation bigger than the quota itself (no overflow in the check).
  TierLedger fresh(quota);
  EXPECT_FALSE(fresh.Reserve(Tier::kHost, UINT64_MAX).ok());
}

// ---------------------------------------------------------------------------------------------
// Item 7: Stats shows a tenant its own figures only.

TEST_F(HardeningTest, StatsShowsATenantOnlyItsOwnFigures) {
  config_.mutable_tenants(0)->mutable_quota()->set_max_device_bytes(uint64_t{1} << 20);
  ASSERT_NO_FATAL_FAILURE(StartWithOnePagePerHead());
  // Bob holds nothing and sees nothing of Alice's.
  const headwise::v1::StatsResponse bob = Stats(kBobToken);
  EXPECT_EQ(bob.sequences(), 0u);
  EXPECT_EQ(bob.pages(), 0u);
  EXPECT_EQ(bob.tenant_bytes(), 0u);
  EXPECT_EQ(bob.bytes_host_to_device() + bob.bytes_device_to_host(), 0u);
  ASSERT_GE(bob.tiers_size(), 2);
  for (const auto& tier : bob.tiers()) {
    EXPECT_EQ(tier.used_bytes(), 0u) << tier.tier();
    EXPECT_EQ(tier.peak_bytes(), 0u) << tier.tier();
    EXPECT_EQ(tier.budget_bytes(), 0u) << tier.tier();  // Bob has no byte quota.
  }
  // Alice sees her own: 1 sequence, 2 pages (one per kv head) of 2 KiB on the device, her quota.
  const headwise::v1::StatsResponse alice = Stats();
  EXPECT_EQ(alice.sequences(), 1u);
  EXPECT_EQ(alice.pages(), 2u);
  EXPECT_EQ(alice.tenant_bytes(), 2u * kPageBytes);
  EXPECT_EQ(alice.tiers(0).tier(), "device");
  EXPECT_EQ(alice.tiers(0).used_bytes(), 2u * kPageBytes);
  EXPECT_EQ(alice.tiers(0).peak_bytes(), 2u * kPageBytes);
  EXPECT_EQ(alice.tiers(0).budget_bytes(), uint64_t{1} << 20);
  EXPECT_EQ(alice.tiers(1).used_bytes(), 0u);
}

TEST_F(HardeningTest, AnAdminTenantSeesTheDaemonWideFigures) {
  auto* ops = config_.add_tenants();
  ops->set_name("ops");
  ops->set_token(kOpsToken);
  ops->set_admin(true);
  ASSERT_NO_FATAL_FAILURE(StartWithOnePagePerHead());
  const headwise::v1::StatsResponse admin = Stats(kOpsToken);
  EXPECT_EQ(admin.sequences(), 1u);  // Alice's.
  EXPECT_EQ(admin.pages(), 2u);
  EXPECT_EQ(admin.tenant_sequences(), 0u);  // Its own.
  EXPECT_EQ(admin.tenant_bytes(), 0u);
  ASSERT_GE(admin.tiers_size(), 2);
  EXPECT_EQ(admin.tiers(0).budget_bytes(), uint64_t{64} << 20);  // The device tier budget.
  EXPECT_GE(admin.tiers(0).used_bytes(), 2u * kPageBytes);
}

// ---------------------------------------------------------------------------------------------
// Item 7: tokens from a file (the daemon's and the CLI's --token_file).

TEST(TokenFileTest, ReadsOneWordAndQuotesNothing) {
  char pattern[] = "/tmp/hwtokXXXXXX";
  ASSERT_NE(mkdtemp(pattern), nullptr);
  const std::string dir = pattern;
  auto write = [&](const std::string& name, const std::string& text) {
    const std::string path = dir + "/" + name;
    std::FILE* f = std::fopen(path.c_str(), "w");
    std::fwrite(text.data(), 1, text.size(), f);
    std::fclose(f);
    return path;
  };
  absl::StatusOr<std::string> token = ReadTokenFile(write("good", "  s3cr3t-Token_1\r\n"));
  ASSERT_TRUE(token.ok()) << token.status();
  EXPECT_EQ(*token, "s3cr3t-Token_1");
  EXPECT_TRUE(absl::IsInvalidArgument(ReadTokenFile(write("empty", "\n\t ")).status()));
  const absl::Status two = ReadTokenFile(write("two", "hidden words\n")).status();
  EXPECT_TRUE(absl::IsInvalidArgument(two));
  EXPECT_FALSE(absl::StrContains(two.message(), "hidden")) << two;
  EXPECT_TRUE(
      absl::IsInvalidArgument(ReadTokenFile(write("nul", std::string("a\0b", 3))).status()));
  EXPECT_TRUE(absl::IsNotFound(ReadTokenFile(dir + "/missing").status()));
  EXPECT_TRUE(absl::IsFailedPrecondition(ReadTokenFile(dir).status()));  // A directory.
  EXPECT_TRUE(absl::IsFailedPrecondition(
      ReadTokenFile(write("big", std::string(kMaxTokenFileBytes + 1, 'x'))).status()));
  std::filesystem::remove_all(dir);
}

TEST(TokenFileTest, TheBuiltInDefaultTenantIsAnAdmin) {
  absl::StatusOr<headwise::v1::DaemonConfig> config = ResolveConfig({}, "t0k");
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_EQ(config->tenants_size(), 1);
  EXPECT_EQ(config->tenants(0).token(), "t0k");
  EXPECT_TRUE(config->tenants(0).admin());
}

// ---------------------------------------------------------------------------------------------
// Item 7: NaN and infinities are refused, naming the tensor.

headwise::v1::Tensor RawTensor(headwise::v1::DTypeProto dtype, std::vector<int64_t> shape,
                               const void* data, size_t bytes) {
  headwise::v1::Tensor t;
  t.set_dtype(dtype);
  for (int64_t d : shape) t.add_shape(d);
  t.set_data(data, bytes);
  return t;
}

std::vector<float> WithValueAt(std::vector<float> values, size_t i, float x) {
  values[i] = x;
  return values;
}

TEST_F(HardeningTest, NonFiniteF32InputsAreInvalidArgumentNamingTheTensor) {
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> k = RandomValues(4 * kTokenFloats, 1);
  const std::vector<float> v = RandomValues(4 * kTokenFloats, 2);

  grpc::Status status = Append(handle, 0, WithValueAt(k, 37, nan), v, 4);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(StartsWith(status.error_message(), "k: element 37 is NaN"));
  status = Append(handle, 0, k, WithValueAt(v, 0, -inf), 4);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(StartsWith(status.error_message(), "v: element 0 is -Inf"));
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{0, 0}));  // Nothing appended.
  ASSERT_TRUE(Append(handle, 0, k, v, 4).ok());

  headwise::v1::AttendResponse attended;
  status = Attend(handle, 0, WithValueAt(RandomValues(4 * 16, 3), 63, inf), &attended);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(StartsWith(status.error_message(), "q: element 63 is +Inf"));

  headwise::v1::DecodeStepRequest step = DecodeRequest(handle, 0, 4);
  step.mutable_q()->mutable_data()->replace(5 * sizeof(float), sizeof(float),
                                            reinterpret_cast<const char*>(&nan), sizeof(float));
  headwise::v1::DecodeStepResponse stepped;
  status = stub_->DecodeStep(Ctx().get(), step, &stepped);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(StartsWith(status.error_message(), "q: element 5 is NaN"));

  headwise::v1::DecodeStepBatchRequest batch;
  batch.set_layer(0);
  auto* item = batch.add_items();
  const headwise::v1::DecodeStepRequest good = DecodeRequest(handle, 0, 5);
  item->set_handle(handle);
  *item->mutable_q() = good.q();
  *item->mutable_k() = F32Tensor(WithValueAt(RandomValues(kTokenFloats, 6), 31, inf), {1, 2, 16});
  *item->mutable_v() = good.v();
  headwise::v1::DecodeStepBatchResponse batched;
  ASSERT_TRUE(stub_->DecodeStepBatch(Ctx().get(), batch, &batched).ok());
  ASSERT_EQ(batched.results_size(), 1);
  EXPECT_EQ(batched.results(0).code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_TRUE(StartsWith(batched.results(0).message(), "k: element 31 is +Inf"));

  headwise::v1::PrefillRequest prefill;
  prefill.set_handle(handle);
  prefill.set_layer(1);
  *prefill.mutable_k() = F32Tensor(RandomValues(2 * kTokenFloats, 7), {2, 2, 16});
  *prefill.mutable_v() = F32Tensor(RandomValues(2 * kTokenFloats, 8), {2, 2, 16});
  *prefill.mutable_q() = F32Tensor(WithValueAt(RandomValues(2 * 4 * 16, 9), 100, nan), {2, 4, 16});
  headwise::v1::PrefillResponse prefilled;
  status = stub_->Prefill(Ctx().get(), prefill, &prefilled);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(StartsWith(status.error_message(), "q: element 100 is NaN"));
  EXPECT_EQ(Lengths(handle), (std::vector<int64_t>{4, 0}));  // Only the one good append.
}

TEST_F(HardeningTest, NonFiniteStagedInputIsRefused) {
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence();
  auto region = OpenRegion(4096);
  ASSERT_NE(region->base, nullptr);
  std::vector<float> k = RandomValues(kTokenFloats, 1);
  k[3] = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> v = RandomValues(kTokenFloats, 2);
  std::memcpy(region->base, k.data(), k.size() * sizeof(float));
  std::memcpy(region->base + 1024, v.data(), v.size() * sizeof(float));
  headwise::v1::AppendRequest request;
  request.set_handle(handle);
  request.set_layer(0);
  for (auto [tensor, offset] : {std::pair{request.mutable_k(), 0}, {request.mutable_v(), 1024}}) {
    tensor->set_dtype(headwise::v1::DTYPE_F32);
    for (int64_t d : {1, 2, 16}) tensor->add_shape(d);
    tensor->mutable_staged()->set_region_id(region->id);
    tensor->mutable_staged()->set_offset(offset);
    tensor->mutable_staged()->set_length(kTokenFloats * sizeof(float));
  }
  headwise::v1::AppendResponse response;
  grpc::Status status = stub_->Append(Ctx().get(), request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(StartsWith(status.error_message(), "k: element 3 is NaN"));
  k[3] = 0.5f;
  std::memcpy(region->base, k.data(), k.size() * sizeof(float));
  status = stub_->Append(Ctx().get(), request, &response);
  EXPECT_TRUE(status.ok()) << status.error_message();
}

// f16 and bf16 have their own NaN/Inf bit patterns; the largest finite values and subnormals
// are accepted.
TEST_F(HardeningTest, NonFiniteHalfPrecisionBitPatternsAreRefused) {
  StartServer();
  struct Case {
    headwise::v1::DTypeProto dtype;
    const char* layout;
    uint16_t bits;
    const char* kind;  // nullptr: finite, accepted.
  };
  const Case cases[] = {
      {headwise::v1::DTYPE_F16, "half", 0x7e00, "NaN"},
      {headwise::v1::DTYPE_F16, "half", 0xfc01, "NaN"},
      {headwise::v1::DTYPE_F16, "half", 0x7c00, "+Inf"},
      {headwise::v1::DTYPE_F16, "half", 0xfc00, "-Inf"},
      {headwise::v1::DTYPE_F16, "half", 0x7bff, nullptr},  // 65504
      {headwise::v1::DTYPE_F16, "half", 0x0001, nullptr},  // Subnormal.
      {headwise::v1::DTYPE_BF16, "brain", 0x7fc0, "NaN"},
      {headwise::v1::DTYPE_BF16, "brain", 0xff81, "NaN"},
      {headwise::v1::DTYPE_BF16, "brain", 0x7f80, "+Inf"},
      {headwise::v1::DTYPE_BF16, "brain", 0xff80, "-Inf"},
      {headwise::v1::DTYPE_BF16, "brain", 0x7f7f, nullptr},  // The largest finite.
  };
  for (const char* name : {"half", "brain"}) {
    headwise::v1::RegisterLayoutRequest request;
    request.set_name(name);
    *request.mutable_layout() = TestLayout();
    request.mutable_layout()->set_dtype(std::string(name) == "half" ? headwise::v1::DTYPE_F16
                                                                    : headwise::v1::DTYPE_BF16);
    headwise::v1::RegisterLayoutResponse response;
    ASSERT_TRUE(stub_->RegisterLayout(Ctx().get(), request, &response).ok());
  }
  for (const Case& c : cases) {
    headwise::v1::CreateSequenceRequest create;
    create.set_layout_name(c.layout);
    headwise::v1::CreateSequenceResponse created;
    ASSERT_TRUE(stub_->CreateSequence(Ctx().get(), create, &created).ok());
    std::vector<uint16_t> v(2 * kTokenFloats, 0x3c00);  // 1.0 in f16; 1.875 in bf16.
    std::vector<uint16_t> k = v;
    k[kTokenFloats + 7] = c.bits;
    headwise::v1::AppendRequest append;
    append.set_handle(created.handle());
    append.set_layer(0);
    *append.mutable_k() = RawTensor(c.dtype, {2, 2, 16}, k.data(), k.size() * 2);
    *append.mutable_v() = RawTensor(c.dtype, {2, 2, 16}, v.data(), v.size() * 2);
    headwise::v1::AppendResponse appended;
    const grpc::Status status = stub_->Append(Ctx().get(), append, &appended);
    const std::string what = absl::StrCat(c.layout, " bits 0x", absl::Hex(c.bits));
    if (c.kind == nullptr) {
      EXPECT_TRUE(status.ok()) << what << ": " << status.error_message();
    } else {
      EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << what;
      EXPECT_TRUE(StartsWith(status.error_message(),
                             absl::StrCat("k: element ", kTokenFloats + 7, " is ", c.kind)))
          << what;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Item 7: the gate-count message does not overflow.

TEST_F(HardeningTest, GateCountMessageDoesNotOverflow) {
  StartServer();
  RegisterLayout();
  headwise::v1::CreateSequenceRequest request;
  request.set_layout_name("test");
  auto* gates = request.mutable_policy()
                    ->mutable_head_roles()
                    ->mutable_duo_attention()
                    ->mutable_inline_gates();
  gates->set_num_layers(65536);
  gates->set_num_kv_heads(65536);
  gates->add_gates(0.5);
  headwise::v1::CreateSequenceResponse response;
  const grpc::Status status = stub_->CreateSequence(Ctx().get(), request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(Contains(status.error_message(), "65536 x 65536 needs 4294967296 values, got 1"));
}

}  // namespace
}  // namespace headwise::testing
