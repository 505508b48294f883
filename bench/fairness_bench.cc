// Fairness under a hostile mix (issue 14): tenant "bob" runs small decode steps while tenant
// "alice" floods prefills from several client threads at her limits. Prints bob's decode-step
// latency (p50, p99) unloaded and under the flood, measured in the same run against the same
// in-process daemon, their ratio (the target: p99 under load within 2x unloaded), alice's
// prefill throughput and how many of her calls admission refused.
//
//   build/bench/fairness_bench [--workers N] [--flooders N] [--steps N] [--prefill_tokens N]
#include <grpcpp/grpcpp.h>
#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "cachesvc/service/config.h"
#include "cachesvc/service/server.h"
#include "headwise/v1/service.grpc.pb.h"

namespace headwise {
namespace {

using Clock = std::chrono::steady_clock;
namespace v1 = headwise::v1;

constexpr char kAlice[] = "alice-bench-token-000000";
constexpr char kBob[] = "bob-bench-token-11111111";
constexpr int kQ = 8, kKv = 2, kD = 64;

struct Options {
  int workers = 2;
  int flooders = 3;
  int steps = 400;
  int prefill_tokens = 2048;
  int bob_context = 4096;
};

v1::Tensor Floats(int64_t n, std::vector<int64_t> shape, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> values(n);
  for (float& x : values) x = dist(rng);
  v1::Tensor t;
  t.set_dtype(v1::DTYPE_F32);
  for (int64_t d : shape) t.add_shape(d);
  t.set_data(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
  return t;
}

class Bench {
 public:
  explicit Bench(const Options& o) : o_(o) {}

  bool Start() {
    char pattern[] = "/tmp/hwfairXXXXXX";
    if (mkdtemp(pattern) == nullptr) return false;
    dir_ = pattern;
    v1::DaemonConfig config;
    config.set_unix_socket(dir_ + "/hw.sock");
    config.set_data_dir("");
    config.set_metrics_address("");
    config.set_device_budget_bytes(uint64_t{2} << 30);
    config.set_host_budget_bytes(uint64_t{1} << 30);
    config.set_worker_threads(o_.workers);
    config.set_log_level("error");
    for (auto [name, token] : {std::pair{"alice", kAlice}, std::pair{"bob", kBob}}) {
      auto* t = config.add_tenants();
      t->set_name(name);
      t->set_token(token);
    }
    auto resolved = ResolveConfig(config, "");
    if (!resolved.ok()) return Fail(resolved.status().ToString());
    auto server = HeadwiseServer::Start(*resolved);
    if (!server.ok()) return Fail(server.status().ToString());
    server_ = *std::move(server);
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    args.SetMaxSendMessageSize(64 << 20);
    channel_ = grpc::CreateCustomChannel("unix:" + server_->unix_socket(),
                                         grpc::InsecureChannelCredentials(), args);
    stub_ = v1::Headwise::NewStub(channel_);
    return Register(kAlice) && Register(kBob);
  }

  ~Bench() {
    server_.reset();
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }

  // Bob's decode-step latencies (seconds), `steps` of them, on a fresh sequence of bob_context
  // tokens.
  std::vector<double> BobSteps() {
    const std::string seq = Create(kBob);
    for (int t = 0; t < o_.bob_context; t += 1024) Prefill(kBob, seq, 1024, 17 + t);
    std::vector<double> latency;
    for (int i = 0; i < o_.steps; ++i) {
      v1::DecodeStepRequest request;
      request.set_handle(seq);
      request.set_layer(0);
      *request.mutable_q() = Floats(kQ * kD, {kQ, kD}, 1000 + i);
      *request.mutable_k() = Floats(kKv * kD, {1, kKv, kD}, 2000 + i);
      *request.mutable_v() = Floats(kKv * kD, {1, kKv, kD}, 3000 + i);
      v1::DecodeStepResponse response;
      const auto t0 = Clock::now();
      grpc::Status status = stub_->DecodeStep(Ctx(kBob).get(), request, &response);
      latency.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      if (!status.ok()) {
        std::fprintf(stderr, "bob's decode step failed: %s\n", status.error_message().c_str());
        ++bob_errors_;
      }
    }
    Release(kBob, seq);
    return latency;
  }

  // Alice's flood: `flooders` threads, each prefilling its own sequence chunk after chunk
  // (released and re-created every 8 chunks to stay within the budget) until `stop`.
  void Flood(std::atomic<bool>* stop) {
    for (int f = 0; f < o_.flooders; ++f) {
      flooders_.emplace_back([this, stop, f] {
        uint32_t seed = 100000 * (f + 1);
        while (!stop->load()) {
          const std::string seq = Create(kAlice);
          for (int c = 0; c < 8 && !stop->load(); ++c) {
            const grpc::StatusCode code = Prefill(kAlice, seq, o_.prefill_tokens, seed++);
            if (code == grpc::StatusCode::OK) {
              ++prefills_;
            } else if (code == grpc::StatusCode::RESOURCE_EXHAUSTED) {
              ++refused_;
            }
          }
          Release(kAlice, seq);
        }
      });
    }
  }
  void JoinFlood() {
    for (auto& t : flooders_) t.join();
    flooders_.clear();
  }

  int64_t prefills() const { return prefills_.load(); }
  int64_t refused() const { return refused_.load(); }
  int64_t bob_errors() const { return bob_errors_; }

 private:
  static std::unique_ptr<grpc::ClientContext> Ctx(const char* token) {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->AddMetadata("authorization", std::string("Bearer ") + token);
    return ctx;
  }
  static bool Fail(const std::string& what) {
    std::fprintf(stderr, "fairness_bench: %s\n", what.c_str());
    return false;
  }
  bool Register(const char* token) {
    v1::RegisterLayoutRequest request;
    request.set_name("bench");
    auto* l = request.mutable_layout();
    l->set_num_layers(1);
    l->set_num_q_heads(kQ);
    l->set_num_kv_heads(kKv);
    l->set_head_dim(kD);
    l->set_dtype(v1::DTYPE_F32);
    l->set_page_tokens(64);
    v1::RegisterLayoutResponse response;
    grpc::Status status = stub_->RegisterLayout(Ctx(token).get(), request, &response);
    return status.ok() || Fail(status.error_message());
  }
  std::string Create(const char* token) {
    v1::CreateSequenceRequest request;
    request.set_layout_name("bench");
    v1::CreateSequenceResponse response;
    grpc::Status status = stub_->CreateSequence(Ctx(token).get(), request, &response);
    if (!status.ok()) Fail(status.error_message());
    return response.handle();
  }
  void Release(const char* token, const std::string& handle) {
    v1::ReleaseRequest request;
    request.set_handle(handle);
    v1::ReleaseResponse response;
    stub_->Release(Ctx(token).get(), request, &response);
  }
  // The payload is drawn once per (thread, size) and reused: the clients share the daemon's
  // cores, so they must cost next to nothing.
  grpc::StatusCode Prefill(const char* token, const std::string& seq, int tokens, uint32_t seed) {
    thread_local v1::PrefillRequest request;
    if (request.q().shape_size() == 0 || request.q().shape(0) != tokens) {
      *request.mutable_q() = Floats(int64_t{tokens} * kQ * kD, {tokens, kQ, kD}, seed);
      *request.mutable_k() = Floats(int64_t{tokens} * kKv * kD, {tokens, kKv, kD}, seed + 1);
      *request.mutable_v() = Floats(int64_t{tokens} * kKv * kD, {tokens, kKv, kD}, seed + 2);
    }
    request.set_handle(seq);
    request.set_layer(0);
    v1::PrefillResponse response;
    return stub_->Prefill(Ctx(token).get(), request, &response).error_code();
  }

  const Options o_;
  std::string dir_;
  std::unique_ptr<HeadwiseServer> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Headwise::Stub> stub_;
  std::vector<std::thread> flooders_;
  std::atomic<int64_t> prefills_{0}, refused_{0};
  int64_t bob_errors_ = 0;
};

double Quantile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * (v.size() - 1) + 0.5))];
}

bool ParseFlags(int argc, char** argv, Options* o) {
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    int* target = flag == "--workers"          ? &o->workers
                  : flag == "--flooders"       ? &o->flooders
                  : flag == "--steps"          ? &o->steps
                  : flag == "--prefill_tokens" ? &o->prefill_tokens
                  : flag == "--bob_context"    ? &o->bob_context
                                               : nullptr;
    if (target == nullptr || !absl::SimpleAtoi(argv[i + 1], target) || *target < 1) {
      std::fprintf(stderr, "bad flag %s %s\n", argv[i], argv[i + 1]);
      return false;
    }
  }
  return true;
}

int Main(int argc, char** argv) {
  Options o;
  if (!ParseFlags(argc, argv, &o)) return 2;
  Bench bench(o);
  if (!bench.Start()) return 1;
  std::printf(
      "fairness_bench: %d workers, %d flooding client threads x %d-token prefills; bob: "
      "%d decode steps over %d tokens (8 q / 2 kv heads, d 64, f32)\n",
      o.workers, o.flooders, o.prefill_tokens, o.steps, o.bob_context);
  const std::vector<double> idle = bench.BobSteps();
  std::atomic<bool> stop{false};
  const auto t0 = Clock::now();
  bench.Flood(&stop);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // The flood is under way.
  const int64_t before = bench.prefills();
  const std::vector<double> loaded = bench.BobSteps();
  const int64_t during = bench.prefills() - before;
  stop = true;
  bench.JoinFlood();
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  const double p50i = Quantile(idle, 0.5), p99i = Quantile(idle, 0.99);
  const double p50l = Quantile(loaded, 0.5), p99l = Quantile(loaded, 0.99);
  std::printf("%-22s %10s %10s\n", "bob decode step", "p50 ms", "p99 ms");
  std::printf("%-22s %10.3f %10.3f\n", "unloaded", p50i * 1e3, p99i * 1e3);
  std::printf("%-22s %10.3f %10.3f\n", "under alice's flood", p50l * 1e3, p99l * 1e3);
  std::printf("%-22s %10.2fx %9.2fx   (target: p99 <= 2x)\n", "ratio", p50l / p50i, p99l / p99i);
  std::printf(
      "alice: %lld prefills while bob measured, %lld in all over %.1f s; %lld refused by "
      "admission; bob errors: %lld\n",
      static_cast<long long>(during), static_cast<long long>(bench.prefills()), seconds,
      static_cast<long long>(bench.refused()), static_cast<long long>(bench.bob_errors()));
  return bench.bob_errors() == 0 ? 0 : 1;
}

}  // namespace
}  // namespace headwise

int main(int argc, char** argv) { return headwise::Main(argc, argv); }
