// Test helpers for the service: a HeadwiseServer on a temporary Unix socket and data dir, stubs
// with a tenant's token, and tensors of random data.
#ifndef HEADWISE_TESTS_SERVICE_SERVICE_FIXTURE_H_
#define HEADWISE_TESTS_SERVICE_SERVICE_FIXTURE_H_

#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cachesvc/service/config.h"
#include "cachesvc/service/server.h"
#include "headwise/v1/service.grpc.pb.h"

namespace headwise::testing {

inline constexpr char kAliceToken[] = "alice-token-0123456789";
inline constexpr char kBobToken[] = "bob-token-9876543210";

// Two layers, 4 query heads over 2 KV heads, head_dim 16, f32, 16-token pages.
inline headwise::v1::ModelLayoutProto TestLayout() {
  headwise::v1::ModelLayoutProto layout;
  layout.set_num_layers(2);
  layout.set_num_q_heads(4);
  layout.set_num_kv_heads(2);
  layout.set_head_dim(16);
  layout.set_dtype(headwise::v1::DTYPE_F32);
  layout.set_page_tokens(16);
  return layout;
}

// Uniform in [-1, 1), never all zeros.
inline std::vector<float> RandomValues(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> out(n);
  for (float& x : out) x = dist(rng);
  return out;
}

inline headwise::v1::Tensor F32Tensor(const std::vector<float>& values,
                                      std::vector<int64_t> shape) {
  headwise::v1::Tensor t;
  t.set_dtype(headwise::v1::DTYPE_F32);
  for (int64_t d : shape) t.add_shape(d);
  t.set_data(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
  return t;
}

inline std::vector<float> TensorFloats(const headwise::v1::Tensor& t) {
  std::vector<float> out(t.data().size() / sizeof(float));
  std::memcpy(out.data(), t.data().data(), out.size() * sizeof(float));
  return out;
}

class ServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/hwsvcXXXXXX";
    ASSERT_NE(mkdtemp(pattern), nullptr);
    dir_ = pattern;
    config_.set_unix_socket(dir_ + "/run/hw.sock");
    config_.set_data_dir(dir_ + "/data");
    config_.set_metrics_address("");
    config_.set_device_budget_bytes(uint64_t{64} << 20);
    config_.set_host_budget_bytes(uint64_t{64} << 20);
    config_.set_max_message_bytes(uint64_t{1} << 20);
    config_.set_worker_threads(3);
    auto* alice = config_.add_tenants();
    alice->set_name("alice");
    alice->set_token(kAliceToken);
    auto* bob = config_.add_tenants();
    bob->set_name("bob");
    bob->set_token(kBobToken);
    bob->mutable_quota()->set_max_sequences(1);
  }

  void TearDown() override {
    server_.reset();
    std::filesystem::remove_all(dir_);
  }

  void StartServer() {
    auto resolved = ResolveConfig(config_, "");
    ASSERT_TRUE(resolved.ok()) << resolved.status();
    auto server = HeadwiseServer::Start(*resolved);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    args.SetMaxSendMessageSize(64 << 20);
    channel_ = grpc::CreateCustomChannel("unix:" + server_->unix_socket(),
                                         grpc::InsecureChannelCredentials(), args);
    stub_ = headwise::v1::Headwise::NewStub(channel_);
  }

  // A context carrying `token` (none when empty).
  static std::unique_ptr<grpc::ClientContext> Ctx(const std::string& token = kAliceToken) {
    auto ctx = std::make_unique<grpc::ClientContext>();
    if (!token.empty()) ctx->AddMetadata("authorization", "Bearer " + token);
    return ctx;
  }

  void RegisterLayout(const std::string& token = kAliceToken) {
    headwise::v1::RegisterLayoutRequest request;
    request.set_name("test");
    *request.mutable_layout() = TestLayout();
    headwise::v1::RegisterLayoutResponse response;
    grpc::Status status = stub_->RegisterLayout(Ctx(token).get(), request, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
  }

  std::string CreateSequence(bool durable = false, const std::string& token = kAliceToken,
                             const headwise::v1::PolicySpec& policy = {}) {
    headwise::v1::CreateSequenceRequest request;
    request.set_layout_name("test");
    request.set_durable(durable);
    *request.mutable_policy() = policy;
    headwise::v1::CreateSequenceResponse response;
    grpc::Status status = stub_->CreateSequence(Ctx(token).get(), request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response.handle();
  }

  grpc::Status Append(const std::string& handle, int layer, const std::vector<float>& k,
                      const std::vector<float>& v, int tokens,
                      const std::string& token = kAliceToken) {
    headwise::v1::AppendRequest request;
    request.set_handle(handle);
    request.set_layer(layer);
    *request.mutable_k() = F32Tensor(k, {tokens, 2, 16});
    *request.mutable_v() = F32Tensor(v, {tokens, 2, 16});
    headwise::v1::AppendResponse response;
    return stub_->Append(Ctx(token).get(), request, &response);
  }

  grpc::Status Attend(const std::string& handle, int layer, const std::vector<float>& q,
                      headwise::v1::AttendResponse* response,
                      const std::string& token = kAliceToken) {
    headwise::v1::AttendRequest request;
    request.set_handle(handle);
    request.set_layer(layer);
    *request.mutable_q() = F32Tensor(q, {4, 16});
    return stub_->Attend(Ctx(token).get(), request, response);
  }

  // A crash and a restart on the same data directory (durable sequences come back).
  void Restart() {
    stub_.reset();
    channel_.reset();
    server_.reset();
    StartServer();
  }

  // The per-layer lengths of `handle` (empty when GetSequence fails).
  std::vector<int64_t> Lengths(const std::string& handle, const std::string& token = kAliceToken) {
    headwise::v1::GetSequenceRequest request;
    request.set_handle(handle);
    headwise::v1::SequenceInfo info;
    if (!stub_->GetSequence(Ctx(token).get(), request, &info).ok()) return {};
    return {info.layer_lengths().begin(), info.layer_lengths().end()};
  }

  // A decode step of TestLayout() with random q, k, v from `seed`.
  static headwise::v1::DecodeStepRequest DecodeRequest(const std::string& handle, int layer,
                                                       uint32_t seed, uint64_t step_id = 0) {
    headwise::v1::DecodeStepRequest request;
    request.set_handle(handle);
    request.set_layer(layer);
    *request.mutable_q() = F32Tensor(RandomValues(4 * 16, seed), {4, 16});
    *request.mutable_k() = F32Tensor(RandomValues(2 * 16, seed + 1), {1, 2, 16});
    *request.mutable_v() = F32Tensor(RandomValues(2 * 16, seed + 2), {1, 2, 16});
    request.set_step_id(step_id);
    return request;
  }

  // A staging region opened through the service and mapped here too.
  struct MappedRegion {
    std::string id;
    std::string shm_name;
    char* base = nullptr;
    size_t size = 0;
    ~MappedRegion() {
      if (base != nullptr) munmap(base, size);
    }
  };
  std::unique_ptr<MappedRegion> OpenRegion(size_t size) {
    headwise::v1::OpenStagingRequest open;
    open.set_size(size);
    headwise::v1::OpenStagingResponse opened;
    grpc::Status status = stub_->OpenStaging(Ctx().get(), open, &opened);
    EXPECT_TRUE(status.ok()) << status.error_message();
    auto region = std::make_unique<MappedRegion>();
    region->id = opened.region_id();
    region->shm_name = opened.shm_name();
    const int fd = shm_open(opened.shm_name().c_str(), O_RDWR, 0);
    EXPECT_GE(fd, 0);
    if (fd < 0) return region;
    void* base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    EXPECT_NE(base, MAP_FAILED);
    if (base != MAP_FAILED) {
      region->base = static_cast<char*>(base);
      region->size = size;
    }
    return region;
  }
  grpc::Status CloseRegion(const std::string& id) {
    headwise::v1::CloseStagingRequest request;
    request.set_region_id(id);
    headwise::v1::CloseStagingResponse response;
    return stub_->CloseStaging(Ctx().get(), request, &response);
  }

  std::string dir_;
  headwise::v1::DaemonConfig config_;
  std::unique_ptr<HeadwiseServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<headwise::v1::Headwise::Stub> stub_;
};

}  // namespace headwise::testing

#endif  // HEADWISE_TESTS_SERVICE_SERVICE_FIXTURE_H_
