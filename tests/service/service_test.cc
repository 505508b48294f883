// The gRPC service end to end in-process: a real HeadwiseServer on a temporary Unix socket,
// called through the generated stub.
#include <fcntl.h>
#include <httplib.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <string>
#include <vector>

#include "cachesvc/engine.h"
#include "tests/service/service_fixture.h"

namespace headwise::testing {
namespace {

using headwise::v1::AttendResponse;

constexpr int kTokenFloats = 2 * 16;  // num_kv_heads * head_dim.

// The same appends and queries through the in-process engine, as the reference.
class ReferenceEngine {
 public:
  ReferenceEngine() {
    EngineOptions options;
    options.device_budget_bytes = uint64_t{64} << 20;
    options.host_budget_bytes = uint64_t{64} << 20;
    engine_ = *Engine::Create(options);
    ModelLayout layout;
    layout.num_layers = 2;
    layout.num_q_heads = 4;
    layout.num_kv_heads = 2;
    layout.head_dim = 16;
    layout.dtype = DType::kF32;
    layout.page_tokens = 16;
    EXPECT_TRUE(engine_->RegisterLayout("test", layout).ok());
    seq_ = *engine_->CreateSequence("test", headwise::v1::PolicySpec());
  }
  void Append(int layer, const std::vector<float>& k, const std::vector<float>& v, int tokens) {
    auto bytes = [](const std::vector<float>& x) {
      return absl::Span<const std::byte>(reinterpret_cast<const std::byte*>(x.data()),
                                         x.size() * sizeof(float));
    };
    ASSERT_TRUE(
        engine_->Append(seq_, LayerId(layer), bytes(k), bytes(v), tokens, DType::kF32).ok());
  }
  void Attend(int layer, const std::vector<float>& q, std::vector<float>* o,
              std::vector<float>* lse) {
    o->assign(4 * 16, 0.0f);
    lse->assign(4, 0.0f);
    ASSERT_TRUE(
        engine_->Attend(seq_, LayerId(layer), q, absl::MakeSpan(*o), absl::MakeSpan(*lse)).ok());
  }

 private:
  std::unique_ptr<Engine> engine_;
  SequenceId seq_;
};

TEST_F(ServiceTest, RoundTripEqualsInProcessEngine) {
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence();
  ASSERT_EQ(handle.size(), 32u);
  ReferenceEngine reference;
  uint32_t seed = 1;
  for (int tokens : {21, 19}) {  // Two steps; the second crosses a page boundary.
    for (int layer = 0; layer < 2; ++layer) {
      auto k = RandomValues(tokens * kTokenFloats, seed++);
      auto v = RandomValues(tokens * kTokenFloats, seed++);
      ASSERT_TRUE(Append(handle, layer, k, v, tokens).ok());
      reference.Append(layer, k, v, tokens);
    }
  }
  for (int layer = 0; layer < 2; ++layer) {
    auto q = RandomValues(4 * 16, seed++);
    AttendResponse response;
    grpc::Status status = Attend(handle, layer, q, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    std::vector<float> o, lse;
    reference.Attend(layer, q, &o, &lse);
    EXPECT_EQ(TensorFloats(response.o()), o);
    EXPECT_EQ(TensorFloats(response.lse()), lse);
    EXPECT_EQ(response.o().shape_size(), 2);
    EXPECT_EQ(response.lse().shape(0), 4);
  }

  // DecodeStep appends one token, then attends: the same as Append + Attend in the engine.
  for (int layer = 0; layer < 2; ++layer) {
    auto q = RandomValues(4 * 16, seed++);
    auto k = RandomValues(kTokenFloats, seed++);
    auto v = RandomValues(kTokenFloats, seed++);
    headwise::v1::DecodeStepRequest request;
    request.set_handle(handle);
    request.set_layer(layer);
    *request.mutable_q() = F32Tensor(q, {4, 16});
    *request.mutable_k() = F32Tensor(k, {1, 2, 16});
    *request.mutable_v() = F32Tensor(v, {1, 2, 16});
    headwise::v1::DecodeStepResponse response;
    grpc::Status status = stub_->DecodeStep(Ctx().get(), request, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    reference.Append(layer, k, v, 1);
    std::vector<float> o, lse;
    reference.Attend(layer, q, &o, &lse);
    EXPECT_EQ(TensorFloats(response.o()), o);
    EXPECT_EQ(TensorFloats(response.lse()), lse);
    EXPECT_EQ(response.layer_length(), 41);
  }

  // DecodeStream: per-layer steps on one stream, answers in order.
  grpc::ClientContext stream_ctx;
  stream_ctx.AddMetadata("authorization", std::string("Bearer ") + kAliceToken);
  auto stream = stub_->DecodeStream(&stream_ctx);
  for (int step = 0; step < 3; ++step) {
    for (int layer = 0; layer < 2; ++layer) {
      auto q = RandomValues(4 * 16, seed++);
      auto k = RandomValues(kTokenFloats, seed++);
      auto v = RandomValues(kTokenFloats, seed++);
      headwise::v1::StreamStepRequest request;
      if (step == 0 && layer == 0) request.set_handle(handle);
      request.set_layer(layer);
      *request.mutable_q() = F32Tensor(q, {4, 16});
      *request.mutable_k() = F32Tensor(k, {1, 2, 16});
      *request.mutable_v() = F32Tensor(v, {1, 2, 16});
      ASSERT_TRUE(stream->Write(request));
      headwise::v1::DecodeStepResponse response;
      ASSERT_TRUE(stream->Read(&response));
      reference.Append(layer, k, v, 1);
      std::vector<float> o, lse;
      reference.Attend(layer, q, &o, &lse);
      EXPECT_EQ(TensorFloats(response.o()), o);
      EXPECT_EQ(response.layer_length(), 42 + step);
    }
  }
  stream->WritesDone();
  grpc::Status status = stream->Finish();
  EXPECT_TRUE(status.ok()) << status.error_message();

  headwise::v1::SequenceInfo info;
  headwise::v1::GetSequenceRequest get;
  get.set_handle(handle);
  ASSERT_TRUE(stub_->GetSequence(Ctx().get(), get, &info).ok());
  EXPECT_EQ(info.layer_lengths_size(), 2);
  EXPECT_EQ(info.layer_lengths(1), 44);
  EXPECT_GT(info.device_bytes(), 0u);
  EXPECT_FALSE(info.durable());
}

TEST_F(ServiceTest, BadInputsGetExactCodesAndTheServerKeepsServing) {
  StartServer();
  RegisterLayout();
  RegisterLayout(kBobToken);
  const std::string handle = CreateSequence();
  auto k = RandomValues(4 * kTokenFloats, 1);
  auto v = RandomValues(4 * kTokenFloats, 2);
  ASSERT_TRUE(Append(handle, 0, k, v, 4).ok());

  auto append_code = [&](headwise::v1::AppendRequest request,
                         const std::string& token = kAliceToken) {
    headwise::v1::AppendResponse response;
    return stub_->Append(Ctx(token).get(), request, &response).error_code();
  };
  headwise::v1::AppendRequest good;
  good.set_handle(handle);
  good.set_layer(1);
  *good.mutable_k() = F32Tensor(k, {4, 2, 16});
  *good.mutable_v() = F32Tensor(v, {4, 2, 16});

  {  // Wrong shape (same byte count, heads and head_dim swapped).
    auto request = good;
    *request.mutable_k() = F32Tensor(k, {4, 16, 2});
    EXPECT_EQ(append_code(request), grpc::StatusCode::INVALID_ARGUMENT);
  }
  {  // Wrong dtype.
    auto request = good;
    request.mutable_v()->set_dtype(headwise::v1::DTYPE_BF16);
    EXPECT_EQ(append_code(request), grpc::StatusCode::INVALID_ARGUMENT);
  }
  {  // Payload size not the shape's.
    auto request = good;
    request.mutable_k()->mutable_data()->pop_back();
    EXPECT_EQ(append_code(request), grpc::StatusCode::INVALID_ARGUMENT);
  }
  {  // v's token count differs from k's.
    auto request = good;
    *request.mutable_v() = F32Tensor(RandomValues(3 * kTokenFloats, 3), {3, 2, 16});
    EXPECT_EQ(append_code(request), grpc::StatusCode::INVALID_ARGUMENT);
  }
  {  // Layer out of range.
    auto request = good;
    request.set_layer(2);
    EXPECT_EQ(append_code(request), grpc::StatusCode::INVALID_ARGUMENT);
  }
  {  // No payload.
    auto request = good;
    request.mutable_k()->clear_data();
    request.mutable_k()->clear_payload();
    EXPECT_EQ(append_code(request), grpc::StatusCode::INVALID_ARGUMENT);
  }
  {  // Unknown (well-formed) handle and a forged one.
    auto request = good;
    request.set_handle("0123456789abcdef0123456789abcdef");
    EXPECT_EQ(append_code(request), grpc::StatusCode::NOT_FOUND);
    request.set_handle(handle.substr(0, 31) + (handle[31] == '0' ? "1" : "0"));
    EXPECT_EQ(append_code(request), grpc::StatusCode::NOT_FOUND);
    request.set_handle("../../etc/passwd");
    EXPECT_EQ(append_code(request), grpc::StatusCode::NOT_FOUND);
  }
  // Another tenant's handle is NOT_FOUND, for reads and writes alike.
  EXPECT_EQ(append_code(good, kBobToken), grpc::StatusCode::NOT_FOUND);
  {
    AttendResponse response;
    EXPECT_EQ(Attend(handle, 0, RandomValues(64, 4), &response, kBobToken).error_code(),
              grpc::StatusCode::NOT_FOUND);
    headwise::v1::ReleaseRequest release;
    release.set_handle(handle);
    headwise::v1::ReleaseResponse released;
    EXPECT_EQ(stub_->Release(Ctx(kBobToken).get(), release, &released).error_code(),
              grpc::StatusCode::NOT_FOUND);
  }
  // Missing or wrong token.
  EXPECT_EQ(append_code(good, ""), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(append_code(good, "alice-token-012345678"), grpc::StatusCode::UNAUTHENTICATED);
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", kAliceToken);  // No "Bearer ".
    headwise::v1::HealthResponse health;
    EXPECT_EQ(stub_->Health(&ctx, headwise::v1::HealthRequest(), &health).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  {                           // Bigger than max_message_bytes (1 MiB): refused by gRPC itself.
    const int tokens = 5000;  // 5000 * 32 floats * 4 bytes * 2 > 1 MiB.
    auto big = RandomValues(tokens * kTokenFloats, 5);
    auto request = good;
    *request.mutable_k() = F32Tensor(big, {tokens, 2, 16});
    *request.mutable_v() = F32Tensor(big, {tokens, 2, 16});
    EXPECT_EQ(append_code(request), grpc::StatusCode::RESOURCE_EXHAUSTED);
  }
  {  // Staged bytes outside the region, and a region that does not exist.
    headwise::v1::OpenStagingRequest open;
    open.set_size(4096);
    headwise::v1::OpenStagingResponse region;
    ASSERT_TRUE(stub_->OpenStaging(Ctx().get(), open, &region).ok());
    auto request = good;
    auto* staged = request.mutable_k()->mutable_staged();
    staged->set_region_id(region.region_id());
    staged->set_offset(4096 - 100);
    staged->set_length(k.size() * sizeof(float));
    EXPECT_EQ(append_code(request), grpc::StatusCode::INVALID_ARGUMENT);
    staged->set_offset(UINT64_MAX - 10);  // Overflowing offset + length.
    EXPECT_EQ(append_code(request), grpc::StatusCode::INVALID_ARGUMENT);
    staged->set_offset(0);
    staged->set_region_id("feedfacefeedfacefeedfacefeedface");
    EXPECT_EQ(append_code(request), grpc::StatusCode::INVALID_ARGUMENT);
    // Bob cannot use Alice's region.
    staged->set_region_id(region.region_id());
    RegisterLayout(kBobToken);
    request.set_handle(CreateSequence(false, kBobToken));
    request.set_layer(0);
    EXPECT_EQ(append_code(request, kBobToken), grpc::StatusCode::INVALID_ARGUMENT);
    // Output placement outside the region.
    headwise::v1::AttendRequest attend;
    attend.set_handle(handle);
    *attend.mutable_q() = F32Tensor(RandomValues(64, 6), {4, 16});
    attend.mutable_output()->set_region_id(region.region_id());
    attend.mutable_output()->set_offset(4000);
    AttendResponse response;
    EXPECT_EQ(stub_->Attend(Ctx().get(), attend, &response).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
  }
  {  // Quota: bob may hold one sequence (created above).
    headwise::v1::CreateSequenceRequest request;
    request.set_layout_name("test");
    headwise::v1::CreateSequenceResponse response;
    EXPECT_EQ(stub_->CreateSequence(Ctx(kBobToken).get(), request, &response).error_code(),
              grpc::StatusCode::RESOURCE_EXHAUSTED);
    request.set_layout_name("no-such-layout");
    EXPECT_EQ(stub_->CreateSequence(Ctx().get(), request, &response).error_code(),
              grpc::StatusCode::NOT_FOUND);
  }
  {  // A query of the wrong shape and dtype.
    headwise::v1::AttendRequest attend;
    attend.set_handle(handle);
    *attend.mutable_q() = F32Tensor(RandomValues(64, 7), {2, 32});
    AttendResponse response;
    EXPECT_EQ(stub_->Attend(Ctx().get(), attend, &response).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
    attend.mutable_q()->set_dtype(headwise::v1::DTYPE_F16);
    EXPECT_EQ(stub_->Attend(Ctx().get(), attend, &response).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
  }

  // The valid request still works after all of the above.
  {
    headwise::v1::AppendResponse response;
    grpc::Status status = stub_->Append(Ctx().get(), good, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(response.layer_length(), 4);
  }
  {
    headwise::v1::SequenceInfo info;
    headwise::v1::GetSequenceRequest get;
    get.set_handle(handle);
    ASSERT_TRUE(stub_->GetSequence(Ctx().get(), get, &info).ok());
    EXPECT_EQ(info.layer_lengths(0), 4);
    EXPECT_EQ(info.layer_lengths(1), 4);
  }

  // Released: every call on the handle is NOT_FOUND.
  headwise::v1::ReleaseRequest release;
  release.set_handle(handle);
  headwise::v1::ReleaseResponse released;
  ASSERT_TRUE(stub_->Release(Ctx().get(), release, &released).ok());
  EXPECT_EQ(stub_->Release(Ctx().get(), release, &released).error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(append_code(good), grpc::StatusCode::NOT_FOUND);
  AttendResponse response;
  EXPECT_EQ(Attend(handle, 0, RandomValues(64, 8), &response).error_code(),
            grpc::StatusCode::NOT_FOUND);
  headwise::v1::GetSequenceRequest get;
  get.set_handle(handle);
  headwise::v1::SequenceInfo info;
  EXPECT_EQ(stub_->GetSequence(Ctx().get(), get, &info).error_code(), grpc::StatusCode::NOT_FOUND);

  headwise::v1::HealthResponse health;
  ASSERT_TRUE(stub_->Health(Ctx().get(), headwise::v1::HealthRequest(), &health).ok());
  EXPECT_EQ(health.status(), "SERVING");
  EXPECT_GE(server_->metrics().RequestCount("Append", "INVALID_ARGUMENT"), 5u);
  EXPECT_GE(server_->metrics().RequestCount("Append", "UNAUTHENTICATED"), 2u);
}

TEST_F(ServiceTest, SocketIsPrivate) {
  StartServer();
  struct stat st;
  ASSERT_EQ(stat(server_->unix_socket().c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ASSERT_EQ(stat((dir_ + "/run").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  // A second server on the same socket is refused while the first one lives...
  auto resolved = ResolveConfig(config_, "");
  ASSERT_TRUE(resolved.ok());
  resolved->set_data_dir("");
  auto second = HeadwiseServer::Start(*resolved);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
  // ...and the socket file goes away with the server.
  const std::string path = server_->unix_socket();
  server_.reset();
  EXPECT_NE(stat(path.c_str(), &st), 0);
}

TEST_F(ServiceTest, StaleSocketIsReplaced) {
  std::filesystem::create_directories(dir_ + "/run");
  const std::string path = dir_ + "/run/hw.sock";
  const int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  close(fd);  // Bound, never listened, never unlinked: what a killed daemon leaves.
  StartServer();
  headwise::v1::HealthResponse health;
  EXPECT_TRUE(stub_->Health(Ctx().get(), headwise::v1::HealthRequest(), &health).ok());
}

TEST_F(ServiceTest, StagedTensorsRoundTripAndRegionsAreUnlinked) {
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence();
  headwise::v1::OpenStagingRequest open;
  open.set_size(1 << 16);
  headwise::v1::OpenStagingResponse region;
  ASSERT_TRUE(stub_->OpenStaging(Ctx().get(), open, &region).ok());
  EXPECT_EQ(region.size(), 1u << 16);

  const int fd = shm_open(region.shm_name().c_str(), O_RDWR, 0);
  ASSERT_GE(fd, 0) << region.shm_name();
  struct stat st;
  ASSERT_EQ(fstat(fd, &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  auto* base =
      static_cast<char*>(mmap(nullptr, region.size(), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
  close(fd);
  ASSERT_NE(base, MAP_FAILED);

  const int tokens = 7;
  const size_t kv_bytes = tokens * kTokenFloats * sizeof(float);
  ReferenceEngine reference;
  for (int layer = 0; layer < 2; ++layer) {
    auto k = RandomValues(tokens * kTokenFloats, 10 + layer);
    auto v = RandomValues(tokens * kTokenFloats, 20 + layer);
    std::memcpy(base + 128, k.data(), kv_bytes);
    std::memcpy(base + 128 + kv_bytes, v.data(), kv_bytes);
    headwise::v1::AppendRequest request;
    request.set_handle(handle);
    request.set_layer(layer);
    for (auto* t : {request.mutable_k(), request.mutable_v()}) {
      t->set_dtype(headwise::v1::DTYPE_F32);
      for (int64_t d : {tokens, 2, 16}) t->add_shape(d);
    }
    request.mutable_k()->mutable_staged()->set_region_id(region.region_id());
    request.mutable_k()->mutable_staged()->set_offset(128);
    request.mutable_k()->mutable_staged()->set_length(kv_bytes);
    request.mutable_v()->mutable_staged()->set_region_id(region.region_id());
    request.mutable_v()->mutable_staged()->set_offset(128 + kv_bytes);
    request.mutable_v()->mutable_staged()->set_length(kv_bytes);
    headwise::v1::AppendResponse response;
    grpc::Status status = stub_->Append(Ctx().get(), request, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(response.layer_length(), tokens);
    reference.Append(layer, k, v, tokens);
  }
  auto q = RandomValues(64, 30);
  headwise::v1::AttendRequest attend;
  attend.set_handle(handle);
  attend.set_layer(1);
  *attend.mutable_q() = F32Tensor(q, {4, 16});
  attend.mutable_output()->set_region_id(region.region_id());
  attend.mutable_output()->set_offset(8192);
  AttendResponse response;
  ASSERT_TRUE(stub_->Attend(Ctx().get(), attend, &response).ok());
  ASSERT_TRUE(response.o().has_staged());
  EXPECT_EQ(response.o().staged().offset(), 8192u);
  EXPECT_EQ(response.lse().staged().offset(), 8192u + 64 * sizeof(float));
  std::vector<float> o(64), lse(4), want_o, want_lse;
  std::memcpy(o.data(), base + 8192, 64 * sizeof(float));
  std::memcpy(lse.data(), base + 8192 + 64 * sizeof(float), 4 * sizeof(float));
  reference.Attend(1, q, &want_o, &want_lse);
  EXPECT_EQ(o, want_o);
  EXPECT_EQ(lse, want_lse);
  munmap(base, region.size());

  headwise::v1::CloseStagingRequest close_request;
  close_request.set_region_id(region.region_id());
  headwise::v1::CloseStagingResponse closed;
  ASSERT_TRUE(stub_->CloseStaging(Ctx().get(), close_request, &closed).ok());
  EXPECT_LT(shm_open(region.shm_name().c_str(), O_RDWR, 0), 0);
  EXPECT_EQ(errno, ENOENT);
  EXPECT_EQ(stub_->CloseStaging(Ctx().get(), close_request, &closed).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);

  // Regions still open at shutdown are unlinked too.
  ASSERT_TRUE(stub_->OpenStaging(Ctx().get(), open, &region).ok());
  server_.reset();
  EXPECT_LT(shm_open(region.shm_name().c_str(), O_RDWR, 0), 0);
}

TEST_F(ServiceTest, DurableSequencesSurviveARestartAndCacheSequencesDoNot) {
  StartServer();
  RegisterLayout();
  const std::string durable = CreateSequence(/*durable=*/true);
  const std::string cache = CreateSequence(/*durable=*/false);
  uint32_t seed = 100;
  // Durable: 24 tokens, truncated to 20, then 9 more; cache: 5 tokens.
  for (int tokens : {24, 9}) {
    for (int layer = 0; layer < 2; ++layer) {
      ASSERT_TRUE(Append(durable, layer, RandomValues(tokens * kTokenFloats, seed),
                         RandomValues(tokens * kTokenFloats, seed + 1), tokens)
                      .ok());
      seed += 2;
    }
    if (tokens == 24) {
      headwise::v1::TruncateRequest truncate;
      truncate.set_handle(durable);
      truncate.set_length(20);
      headwise::v1::TruncateResponse truncated;
      ASSERT_TRUE(stub_->Truncate(Ctx().get(), truncate, &truncated).ok());
    }
  }
  for (int layer = 0; layer < 2; ++layer) {
    ASSERT_TRUE(Append(cache, layer, RandomValues(5 * kTokenFloats, seed),
                       RandomValues(5 * kTokenFloats, seed + 1), 5)
                    .ok());
  }
  {  // A prefill chunk goes through the log too.
    headwise::v1::PrefillRequest prefill;
    prefill.set_handle(durable);
    prefill.set_layer(0);
    *prefill.mutable_q() = F32Tensor(RandomValues(3 * 64, 200), {3, 4, 16});
    *prefill.mutable_k() = F32Tensor(RandomValues(3 * kTokenFloats, 201), {3, 2, 16});
    *prefill.mutable_v() = F32Tensor(RandomValues(3 * kTokenFloats, 202), {3, 2, 16});
    headwise::v1::PrefillResponse response;
    grpc::Status status = stub_->Prefill(Ctx().get(), prefill, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(response.o().shape(0), 3);
    EXPECT_EQ(response.lse().data().size(), 3 * 4 * sizeof(float));
  }
  const auto q0 = RandomValues(64, 300), q1 = RandomValues(64, 301);
  AttendResponse before0, before1;
  ASSERT_TRUE(Attend(durable, 0, q0, &before0).ok());
  ASSERT_TRUE(Attend(durable, 1, q1, &before1).ok());

  // Crash: destroy the server (no graceful shutdown needed: writes were fsynced).
  stub_.reset();
  channel_.reset();
  server_.reset();
  StartServer();
  EXPECT_EQ(server_->restored_sequences(), 1);

  AttendResponse after0, after1;
  ASSERT_TRUE(Attend(durable, 0, q0, &after0).ok());
  ASSERT_TRUE(Attend(durable, 1, q1, &after1).ok());
  EXPECT_EQ(TensorFloats(after0.o()), TensorFloats(before0.o()));
  EXPECT_EQ(TensorFloats(after0.lse()), TensorFloats(before0.lse()));
  EXPECT_EQ(TensorFloats(after1.o()), TensorFloats(before1.o()));
  EXPECT_EQ(TensorFloats(after1.lse()), TensorFloats(before1.lse()));

  headwise::v1::GetSequenceRequest get;
  get.set_handle(durable);
  headwise::v1::SequenceInfo info;
  ASSERT_TRUE(stub_->GetSequence(Ctx().get(), get, &info).ok());
  EXPECT_TRUE(info.durable());
  EXPECT_EQ(info.layer_lengths(0), 32);
  EXPECT_EQ(info.layer_lengths(1), 29);
  // Another tenant still cannot see it.
  EXPECT_EQ(stub_->GetSequence(Ctx(kBobToken).get(), get, &info).error_code(),
            grpc::StatusCode::NOT_FOUND);
  get.set_handle(cache);
  EXPECT_EQ(stub_->GetSequence(Ctx().get(), get, &info).error_code(), grpc::StatusCode::NOT_FOUND);
  headwise::v1::ListSequencesResponse list;
  ASSERT_TRUE(stub_->ListSequences(Ctx().get(), headwise::v1::ListSequencesRequest(), &list).ok());
  ASSERT_EQ(list.sequences_size(), 1);
  EXPECT_EQ(list.sequences(0).handle(), durable);

  // The restored sequence keeps going (layer 1 catches up), and a release is durable too.
  ASSERT_TRUE(Append(durable, 1, RandomValues(3 * kTokenFloats, 400),
                     RandomValues(3 * kTokenFloats, 401), 3)
                  .ok());
  headwise::v1::ReleaseRequest release;
  release.set_handle(durable);
  headwise::v1::ReleaseResponse released;
  ASSERT_TRUE(stub_->Release(Ctx().get(), release, &released).ok());
  stub_.reset();
  channel_.reset();
  server_.reset();
  StartServer();
  EXPECT_EQ(server_->restored_sequences(), 0);
}

TEST_F(ServiceTest, MetricsEndpointServesPrometheusText) {
  config_.set_metrics_address("127.0.0.1:0");
  StartServer();
  ASSERT_GT(server_->metrics_port(), 0);
  headwise::v1::HealthResponse health;
  ASSERT_TRUE(stub_->Health(Ctx().get(), headwise::v1::HealthRequest(), &health).ok());
  EXPECT_EQ(stub_->Health(Ctx("nope").get(), headwise::v1::HealthRequest(), &health).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  httplib::Client client("127.0.0.1", server_->metrics_port());
  auto result = client.Get("/metrics");
  ASSERT_TRUE(result);
  EXPECT_EQ(result->status, 200);
  const std::string& body = result->body;
  EXPECT_NE(body.find("headwise_requests_total{rpc=\"Health\",code=\"OK\"} 1"), std::string::npos)
      << body;
  EXPECT_NE(body.find("headwise_requests_total{rpc=\"Health\",code=\"UNAUTHENTICATED\"} 1"),
            std::string::npos);
  for (const char* name :
       {"headwise_request_seconds_bucket{rpc=\"Health\",le=\"+Inf\"} 2",
        "headwise_tier_bytes{tier=\"device\"}",
        "headwise_bytes_moved_total{direction=", "headwise_evicted_pages_total",
        "headwise_merged_tokens_total 0", "headwise_stall_seconds_total", "headwise_sequences 0",
        "headwise_prefetch_pages_total{kind=\"late\"} 0", "headwise_prefetch_late_bytes_total 0"}) {
    EXPECT_NE(body.find(name), std::string::npos) << name;
  }
}

// A metrics token makes /metrics 401 without it (and with a wrong one); /healthz stays open. A
// daemon with tenants configured serves no metrics unless its config names an address.
TEST_F(ServiceTest, MetricsTokenAndMultiTenantDefault) {
  headwise::v1::DaemonConfig bare = config_;
  bare.clear_metrics_address();
  auto resolved = ResolveConfig(bare, "");
  ASSERT_TRUE(resolved.ok());
  EXPECT_EQ(resolved->metrics_address(), "");
  config_.set_metrics_address("127.0.0.1:0");
  config_.set_metrics_token("metrics-secret-42");
  StartServer();
  httplib::Client client("127.0.0.1", server_->metrics_port());
  auto denied = client.Get("/metrics");
  ASSERT_TRUE(denied);
  EXPECT_EQ(denied->status, 401);
  EXPECT_EQ(denied->body.find("headwise_"), std::string::npos);
  auto wrong = client.Get("/metrics", {{"Authorization", "Bearer metrics-secret-43"}});
  ASSERT_TRUE(wrong);
  EXPECT_EQ(wrong->status, 401);
  auto ok = client.Get("/metrics", {{"Authorization", "Bearer metrics-secret-42"}});
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200);
  EXPECT_NE(ok->body.find("headwise_sequences 0"), std::string::npos);
  auto health = client.Get("/healthz");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
}

TEST_F(ServiceTest, StatsAndForkAndTenantUsage) {
  StartServer();
  RegisterLayout();
  const std::string parent = CreateSequence();
  for (int layer = 0; layer < 2; ++layer) {
    ASSERT_TRUE(Append(parent, layer, RandomValues(20 * kTokenFloats, layer),
                       RandomValues(20 * kTokenFloats, 9 + layer), 20)
                    .ok());
  }
  headwise::v1::ForkRequest fork;
  fork.set_handle(parent);
  headwise::v1::ForkResponse child;
  ASSERT_TRUE(stub_->Fork(Ctx().get(), fork, &child).ok());
  ASSERT_EQ(child.handle().size(), 32u);
  EXPECT_NE(child.handle(), parent);
  auto q = RandomValues(64, 77);
  AttendResponse a, b;
  ASSERT_TRUE(Attend(parent, 1, q, &a).ok());
  ASSERT_TRUE(Attend(child.handle(), 1, q, &b).ok());
  EXPECT_EQ(TensorFloats(a.o()), TensorFloats(b.o()));

  headwise::v1::StatsResponse stats;
  ASSERT_TRUE(stub_->Stats(Ctx().get(), headwise::v1::StatsRequest(), &stats).ok());
  EXPECT_EQ(stats.sequences(), 2u);
  EXPECT_EQ(stats.tenant_sequences(), 2u);
  EXPECT_GT(stats.tenant_bytes(), 0u);
  ASSERT_GE(stats.tiers_size(), 2);
  EXPECT_EQ(stats.tiers(0).tier(), "device");
  ASSERT_TRUE(stub_->Stats(Ctx(kBobToken).get(), headwise::v1::StatsRequest(), &stats).ok());
  EXPECT_EQ(stats.tenant_sequences(), 0u);
  EXPECT_EQ(stats.tenant_bytes(), 0u);
}

TEST_F(ServiceTest, TierQuotaIsResourceExhaustedAndChangesNothing) {
  config_.mutable_tenants(0)->mutable_quota()->set_max_device_bytes(10 * 1024);
  StartServer();
  RegisterLayout();
  const std::string handle = CreateSequence();
  // 16 tokens * 2 heads * 16 dims * 4 bytes * 2 (K, V) = 4 KiB (one page per head) per layer:
  // two layers fit in 10 KiB, a third append does not.
  for (int layer = 0; layer < 2; ++layer) {
    ASSERT_TRUE(Append(handle, layer, RandomValues(16 * kTokenFloats, layer),
                       RandomValues(16 * kTokenFloats, 5 + layer), 16)
                    .ok());
  }
  EXPECT_EQ(
      Append(handle, 0, RandomValues(16 * kTokenFloats, 8), RandomValues(16 * kTokenFloats, 9), 16)
          .error_code(),
      grpc::StatusCode::RESOURCE_EXHAUSTED);
  headwise::v1::GetSequenceRequest get;
  get.set_handle(handle);
  headwise::v1::SequenceInfo info;
  ASSERT_TRUE(stub_->GetSequence(Ctx().get(), get, &info).ok());
  EXPECT_EQ(info.layer_lengths(0), 16);
}

TEST_F(ServiceTest, TcpListenerOnLoopback) {
  config_.set_tcp_address("127.0.0.1:0");
  StartServer();
  ASSERT_GT(server_->tcp_port(), 0);
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(server_->tcp_port()),
                                     grpc::InsecureChannelCredentials());
  auto stub = headwise::v1::Headwise::NewStub(channel);
  headwise::v1::HealthResponse health;
  grpc::Status status = stub->Health(Ctx().get(), headwise::v1::HealthRequest(), &health);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(health.status(), "SERVING");
}

TEST_F(ServiceTest, DecodeStreamErrorsEndTheStreamWithTheirCode) {
  StartServer();
  RegisterLayout();
  auto step = [](const std::string& handle) {
    headwise::v1::StreamStepRequest request;
    request.set_handle(handle);
    *request.mutable_q() = F32Tensor(RandomValues(64, 1), {4, 16});
    *request.mutable_k() = F32Tensor(RandomValues(kTokenFloats, 2), {1, 2, 16});
    *request.mutable_v() = F32Tensor(RandomValues(kTokenFloats, 3), {1, 2, 16});
    return request;
  };
  {  // Unknown handle.
    auto ctx = Ctx();
    auto stream = stub_->DecodeStream(ctx.get());
    stream->Write(step("0123456789abcdef0123456789abcdef"));
    headwise::v1::DecodeStepResponse response;
    EXPECT_FALSE(stream->Read(&response));
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::NOT_FOUND);
  }
  {  // No token.
    auto ctx = Ctx("");
    auto stream = stub_->DecodeStream(ctx.get());
    stream->Write(step(CreateSequence()));
    headwise::v1::DecodeStepResponse response;
    EXPECT_FALSE(stream->Read(&response));
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  {  // A bad shape after a good step.
    auto ctx = Ctx();
    auto stream = stub_->DecodeStream(ctx.get());
    ASSERT_TRUE(stream->Write(step(CreateSequence())));
    headwise::v1::DecodeStepResponse response;
    ASSERT_TRUE(stream->Read(&response));
    auto bad = step("");
    bad.set_layer(1);
    *bad.mutable_k() = F32Tensor(RandomValues(2 * kTokenFloats, 4), {2, 2, 16});
    stream->Write(bad);
    EXPECT_FALSE(stream->Read(&response));
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
}

}  // namespace
}  // namespace headwise::testing
