// rpc_bench: what the gRPC edge costs, measured in one run against a real `headwised` that the
// benchmark starts itself (temporary socket and data dir, Unix socket transport):
//   - an empty Health call: round-trip time (1 thread) and throughput (4 and 16 threads);
//   - a fused DecodeStep of one Llama-3-8B layer (8 KV heads, 32 q heads, head_dim 128, f16)
//     over a 4096-token sequence, with inline payloads, with staged payloads, and on a stream;
//   - the same step in-process (Engine::Append + Engine::Attend, cachesvc/engine.h): the kernel
//     and engine time with no RPC at all;
//   - staged payload bandwidth (a 256-token Append, 1 MiB of K+V, through a staging region)
//     against inline payloads and against memcpy of the same bytes;
//   - AppendLayers of a Llama-3-8B-shaped layout (32 layers): every layer of a chunk in one call
//     from one staging region, at 16 MiB per call (128 tokens) and 1 MiB (8 tokens), against
//     memcpy of the same bytes in the same run;
//   - a bare gRPC callback service (Health answered on the gRPC thread: no auth, no worker pool)
//     in this process on a Unix socket of the same kind: what gRPC alone costs here.
// At the end it prints the ratio decode step / (empty call + in-process step); the target is
// <= 1.5. bench/RESULTS.md ("## RPC") holds the latest figures.
//
//   build-client/bench/rpc_bench --benchmark_repetitions=5 --benchmark_report_aggregates_only
#include <benchmark/benchmark.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cachesvc/base/dtype.h"
#include "cachesvc/base/layout.h"
#include "cachesvc/engine.h"
#include "clients/cpp/client.h"
#include "headwise/v1/service.grpc.pb.h"
#include "tests/e2e/daemon_process.h"

namespace headwise {
namespace {

using client::Client;
using client::Sequence;
using client::StagingRegion;

constexpr int kContext = 4096;
// The sequence is truncated back to kContext every this many steps, so every step attends over
// 4096..4096+kRegrowSteps tokens.
constexpr int kRegrowSteps = 64;
constexpr int kBandwidthTokens = 256;
// AppendLayers chunks of the 32-layer layout: 128 tokens = 16 MiB of K+V, 8 tokens = 1 MiB.
constexpr int kChunkTokensLarge = 128;
constexpr int kChunkTokensSmall = 8;

ModelLayout LlamaLayer() {
  ModelLayout layout;
  layout.num_layers = 1;
  layout.num_q_heads = 32;
  layout.num_kv_heads = 8;
  layout.head_dim = 128;
  layout.dtype = DType::kF16;
  layout.page_tokens = 64;
  return layout;
}

// Llama-3-8B: 32 layers of LlamaLayer().
ModelLayout Llama3_8b() {
  ModelLayout layout = LlamaLayer();
  layout.num_layers = 32;
  return layout;
}

// The bare gRPC service: Health finished on the gRPC thread.
class BareService final : public headwise::v1::Headwise::CallbackService {
  grpc::ServerUnaryReactor* Health(grpc::CallbackServerContext* ctx,
                                   const headwise::v1::HealthRequest*,
                                   headwise::v1::HealthResponse* response) override {
    response->set_status("SERVING");
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
};

std::vector<std::byte> RandomKv(std::mt19937& rng, const ModelLayout& layout, int tokens) {
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  const size_t n = static_cast<size_t>(tokens) * layout.num_kv_heads * layout.head_dim;
  std::vector<std::byte> out(n * DTypeSize(layout.dtype));
  for (size_t i = 0; i < n; ++i) StoreFromFloat(out.data(), layout.dtype, i, dist(rng));
  return out;
}

std::vector<float> RandomQ(std::mt19937& rng, const ModelLayout& layout) {
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  std::vector<float> q(static_cast<size_t>(layout.num_q_heads) * layout.head_dim);
  for (float& x : q) x = dist(rng);
  return q;
}

void Check(const absl::Status& status, const char* what) {
  if (!status.ok()) {
    std::fprintf(stderr, "rpc_bench: %s: %s\n", what, status.ToString().c_str());
    std::exit(1);
  }
}

// Everything the benchmarks share; set up once in main().
struct World {
  ModelLayout layout = LlamaLayer();
  std::unique_ptr<testing::TempDir> dir;
  std::unique_ptr<testing::DaemonProcess> daemon;
  std::unique_ptr<Client> client;
  std::unique_ptr<Engine> engine;
  std::vector<float> q;
  std::vector<std::byte> k1, v1;              // One token.
  std::vector<std::byte> k_bulk, v_bulk;      // kBandwidthTokens tokens.
  std::vector<std::byte> prefix_k, prefix_v;  // kContext tokens.
  BareService bare_service;
  std::unique_ptr<grpc::Server> bare_server;
  std::unique_ptr<headwise::v1::Headwise::Stub> bare_stub;
};
World* world = nullptr;

Sequence NewRemoteSequence() {
  absl::StatusOr<Sequence> seq =
      world->client->CreateSequence("llama3-8b-layer", headwise::v1::PolicySpec(), false);
  Check(seq.status(), "CreateSequence");
  Check(world->client->Append(*seq, 0, world->prefix_k, world->prefix_v, kContext).status(),
        "Append prefix");
  return *seq;
}

SequenceId NewLocalSequence() {
  absl::StatusOr<SequenceId> seq =
      world->engine->CreateSequence("llama3-8b-layer", headwise::v1::PolicySpec());
  Check(seq.status(), "engine CreateSequence");
  Check(world->engine->Append(*seq, LayerId(0), world->prefix_k, world->prefix_v, kContext,
                              world->layout.dtype),
        "engine Append prefix");
  return *seq;
}

void BM_HealthEmptyCall(benchmark::State& state) {
  for (auto _ : state) Check(world->client->Health().status(), "Health");
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_HealthEmptyCall)->UseRealTime()->Threads(1)->Threads(4)->Threads(16);

void BM_BareGrpcEmptyCall(benchmark::State& state) {
  for (auto _ : state) {
    grpc::ClientContext context;
    headwise::v1::HealthResponse response;
    const grpc::Status status =
        world->bare_stub->Health(&context, headwise::v1::HealthRequest(), &response);
    if (!status.ok()) Check(absl::UnavailableError(status.error_message()), "bare Health");
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_BareGrpcEmptyCall)->UseRealTime()->Threads(1);

void BM_DecodeStepInline(benchmark::State& state) {
  const Sequence seq = NewRemoteSequence();
  int steps = 0;
  for (auto _ : state) {
    Check(world->client->DecodeStep(seq, 0, world->q, world->k1, world->v1).status(), "DecodeStep");
    if (++steps % kRegrowSteps == 0) {
      state.PauseTiming();
      Check(world->client->Truncate(seq, kContext), "Truncate");
      state.ResumeTiming();
    }
  }
  Check(world->client->Release(seq), "Release");
}
BENCHMARK(BM_DecodeStepInline)->UseRealTime();

// q at 0, k at 64 KiB, v at 128 KiB, outputs at 192 KiB of one region.
constexpr uint64_t kQOff = 0, kKOff = 64 << 10, kVOff = 128 << 10, kOutOff = 192 << 10;

StagingRegion StagedInputs() {
  absl::StatusOr<StagingRegion> region = world->client->OpenStaging(256 << 10);
  Check(region.status(), "OpenStaging");
  std::memcpy(region->data() + kQOff, world->q.data(), world->q.size() * sizeof(float));
  std::memcpy(region->data() + kKOff, world->k1.data(), world->k1.size());
  std::memcpy(region->data() + kVOff, world->v1.data(), world->v1.size());
  return *std::move(region);
}

void BM_DecodeStepStaged(benchmark::State& state) {
  const Sequence seq = NewRemoteSequence();
  StagingRegion region = StagedInputs();
  int steps = 0;
  for (auto _ : state) {
    Check(world->client->DecodeStep(seq, 0, region, kQOff, kKOff, kVOff, kOutOff).status(),
          "DecodeStep staged");
    if (++steps % kRegrowSteps == 0) {
      state.PauseTiming();
      Check(world->client->Truncate(seq, kContext), "Truncate");
      state.ResumeTiming();
    }
  }
  Check(world->client->Release(seq), "Release");
}
BENCHMARK(BM_DecodeStepStaged)->UseRealTime();

void BM_DecodeStreamStaged(benchmark::State& state) {
  const Sequence seq = NewRemoteSequence();
  StagingRegion region = StagedInputs();
  int steps = 0;
  auto stream = world->client->OpenDecodeStream(seq);
  Check(stream.status(), "OpenDecodeStream");
  for (auto _ : state) {
    Check((*stream)->Step(0, region, kQOff, kKOff, kVOff, kOutOff).status(), "Step");
    if (++steps % kRegrowSteps == 0) {
      state.PauseTiming();
      Check(world->client->Truncate(seq, kContext), "Truncate");
      state.ResumeTiming();
    }
  }
  Check((*stream)->Finish(), "Finish");
  Check(world->client->Release(seq), "Release");
}
BENCHMARK(BM_DecodeStreamStaged)->UseRealTime();

void BM_DecodeStepInProcess(benchmark::State& state) {
  const SequenceId seq = NewLocalSequence();
  std::vector<float> o(world->q.size()), lse(world->layout.num_q_heads);
  int steps = 0;
  for (auto _ : state) {
    Check(world->engine->Append(seq, LayerId(0), world->k1, world->v1, 1, world->layout.dtype),
          "engine Append");
    Check(world->engine->Attend(seq, LayerId(0), world->q, absl::MakeSpan(o), absl::MakeSpan(lse)),
          "engine Attend");
    if (++steps % kRegrowSteps == 0) {
      state.PauseTiming();
      Check(world->engine->Truncate(seq, kContext), "engine Truncate");
      state.ResumeTiming();
    }
  }
  Check(world->engine->Release(seq), "engine Release");
}
BENCHMARK(BM_DecodeStepInProcess)->UseRealTime();

void BM_AttendInProcess(benchmark::State& state) {
  const SequenceId seq = NewLocalSequence();
  std::vector<float> o(world->q.size()), lse(world->layout.num_q_heads);
  for (auto _ : state) {
    Check(world->engine->Attend(seq, LayerId(0), world->q, absl::MakeSpan(o), absl::MakeSpan(lse)),
          "engine Attend");
  }
  Check(world->engine->Release(seq), "engine Release");
}
BENCHMARK(BM_AttendInProcess)->UseRealTime();

// Bulk appends of kBandwidthTokens tokens; the sequence restarts from empty every 32 appends.
void BulkAppend(benchmark::State& state, bool staged) {
  absl::StatusOr<Sequence> seq =
      world->client->CreateSequence("llama3-8b-layer", headwise::v1::PolicySpec(), false);
  Check(seq.status(), "CreateSequence");
  const uint64_t kv_bytes = world->k_bulk.size();
  absl::StatusOr<StagingRegion> region = world->client->OpenStaging(2 * kv_bytes);
  Check(region.status(), "OpenStaging");
  std::memcpy(region->data(), world->k_bulk.data(), kv_bytes);
  std::memcpy(region->data() + kv_bytes, world->v_bulk.data(), kv_bytes);
  int appends = 0;
  for (auto _ : state) {
    absl::StatusOr<int64_t> length =
        staged ? world->client->Append(*seq, 0, *region, 0, kv_bytes, kBandwidthTokens)
               : world->client->Append(*seq, 0, world->k_bulk, world->v_bulk, kBandwidthTokens);
    Check(length.status(), "bulk Append");
    if (++appends % 32 == 0) {
      state.PauseTiming();
      Check(world->client->Truncate(*seq, 0), "Truncate");
      state.ResumeTiming();
    }
  }
  state.SetBytesProcessed(state.iterations() * 2 * kv_bytes);
  Check(world->client->Release(*seq), "Release");
}
void BM_AppendBulkStaged(benchmark::State& state) { BulkAppend(state, true); }
void BM_AppendBulkInline(benchmark::State& state) { BulkAppend(state, false); }
BENCHMARK(BM_AppendBulkStaged)->UseRealTime();
BENCHMARK(BM_AppendBulkInline)->UseRealTime();

// AppendLayers of state.range(0) tokens on every layer of the 32-layer layout, staged in one
// region (layer-major); the sequence restarts from empty every 16 calls.
void BM_AppendLayersStaged(benchmark::State& state) {
  const int tokens = static_cast<int>(state.range(0));
  const ModelLayout layout = Llama3_8b();
  absl::StatusOr<Sequence> seq =
      world->client->CreateSequence("llama3-8b", headwise::v1::PolicySpec(), false);
  Check(seq.status(), "CreateSequence llama3-8b");
  const uint64_t bytes = client::StagedLayersBytes(layout, tokens);
  absl::StatusOr<StagingRegion> region = world->client->OpenStaging(bytes);
  Check(region.status(), "OpenStaging");
  std::mt19937 rng(7);
  const std::vector<std::byte> kv = RandomKv(rng, layout, tokens);
  for (uint64_t at = 0; at < bytes; at += kv.size()) {
    std::memcpy(region->data() + at, kv.data(), kv.size());
  }
  int calls = 0;
  for (auto _ : state) {
    Check(world->client->AppendLayers(*seq, *region, 0, tokens).status(), "AppendLayers");
    if (++calls % 16 == 0) {
      state.PauseTiming();
      Check(world->client->Truncate(*seq, 0), "Truncate");
      state.ResumeTiming();
    }
  }
  state.SetBytesProcessed(state.iterations() * bytes);
  Check(world->client->Release(*seq), "Release");
}
BENCHMARK(BM_AppendLayersStaged)->UseRealTime()->Arg(kChunkTokensLarge)->Arg(kChunkTokensSmall);

// memcpy of state.range(0) bytes (default: the 1 MiB of the 256-token Append).
void BM_MemcpyBulk(benchmark::State& state) {
  const size_t bytes =
      state.range(0) > 0 ? static_cast<size_t>(state.range(0)) : 2 * world->k_bulk.size();
  std::vector<std::byte> src(bytes), dst(bytes);
  for (size_t at = 0; at < bytes; at += world->k_bulk.size()) {
    std::memcpy(src.data() + at, world->k_bulk.data(), std::min(bytes - at, world->k_bulk.size()));
  }
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), bytes);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * bytes);
}
BENCHMARK(BM_MemcpyBulk)->UseRealTime()->Arg(0)->Arg(16 << 20);

// Keeps the real time per iteration of each benchmark (the median when repeated) for the ratios.
class RatioReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      if (run.run_type == Run::RT_Aggregate && run.aggregate_name != "median") continue;
      std::string name = run.run_name.str();
      seconds_[name] = run.GetAdjustedRealTime() * 1e-9;  // Default unit: ns.
      if (run.counters.count("bytes_per_second")) {
        bandwidth_[name] = run.counters.at("bytes_per_second");
      }
    }
    ConsoleReporter::ReportRuns(runs);
  }
  double Seconds(const std::string& name) const {
    auto it = seconds_.find(name);
    return it == seconds_.end() ? 0 : it->second;
  }
  double Bandwidth(const std::string& name) const {
    auto it = bandwidth_.find(name);
    return it == bandwidth_.end() ? 0 : it->second;
  }

 private:
  std::map<std::string, double> seconds_;
  std::map<std::string, double> bandwidth_;
};

void PrintRatios(const RatioReporter& r) {
  const double empty = r.Seconds("BM_HealthEmptyCall/real_time/threads:1");
  const double local = r.Seconds("BM_DecodeStepInProcess/real_time");
  const double attend = r.Seconds("BM_AttendInProcess/real_time");
  std::printf("\n== RPC ratios (median real time) ==\n");
  std::printf(
      "empty call        %8.1f us   in-process step %8.1f us   in-process attend %8.1f us\n",
      empty * 1e6, local * 1e6, attend * 1e6);
  for (const char* name : {"BM_DecodeStepInline/real_time", "BM_DecodeStepStaged/real_time",
                           "BM_DecodeStreamStaged/real_time"}) {
    const double step = r.Seconds(name);
    if (step == 0 || empty + local == 0) continue;
    std::printf("%-32s %8.1f us   / (empty + in-process step) = %.2f  (target <= 1.5)\n", name,
                step * 1e6, step / (empty + local));
  }
  const double bare = r.Seconds("BM_BareGrpcEmptyCall/real_time/threads:1");
  if (bare > 0) {
    std::printf("empty call / bare gRPC empty call (%.1f us) = %.2f  (target <= 1.3)\n", bare * 1e6,
                empty / bare);
  }
  const double staged = r.Bandwidth("BM_AppendBulkStaged/real_time");
  const double inline_bw = r.Bandwidth("BM_AppendBulkInline/real_time");
  const double memcpy_bw = r.Bandwidth("BM_MemcpyBulk/0/real_time");
  const double memcpy16_bw = r.Bandwidth("BM_MemcpyBulk/16777216/real_time");
  const double layers16 = r.Bandwidth("BM_AppendLayersStaged/128/real_time");
  const double layers1 = r.Bandwidth("BM_AppendLayersStaged/8/real_time");
  if (memcpy16_bw > 0 && memcpy_bw > 0) {
    std::printf(
        "AppendLayers staged: 16 MiB/call %.2f GB/s = %.2f of memcpy 16 MiB (%.2f GB/s, target "
        ">= 0.5); 1 MiB/call %.2f GB/s = %.2f of memcpy 1 MiB (%.2f GB/s, target >= 0.25)\n",
        layers16 / 1e9, layers16 / memcpy16_bw, memcpy16_bw / 1e9, layers1 / 1e9,
        layers1 / memcpy_bw, memcpy_bw / 1e9);
  }
  if (memcpy_bw > 0) {
    std::printf(
        "staged append %.2f GB/s, inline append %.2f GB/s, memcpy %.2f GB/s: staged/memcpy "
        "= %.2f, staged/inline = %.2f\n",
        staged / 1e9, inline_bw / 1e9, memcpy_bw / 1e9, staged / memcpy_bw,
        inline_bw > 0 ? staged / inline_bw : 0.0);
  }
}

}  // namespace
}  // namespace headwise

int main(int argc, char** argv) {
  using namespace headwise;
  benchmark::Initialize(&argc, argv);
  World w;
  world = &w;
  std::mt19937 rng(31337);
  w.q = RandomQ(rng, w.layout);
  w.k1 = RandomKv(rng, w.layout, 1);
  w.v1 = RandomKv(rng, w.layout, 1);
  w.k_bulk = RandomKv(rng, w.layout, kBandwidthTokens);
  w.v_bulk = RandomKv(rng, w.layout, kBandwidthTokens);
  w.prefix_k = RandomKv(rng, w.layout, kContext);
  w.prefix_v = RandomKv(rng, w.layout, kContext);

  w.dir = std::make_unique<testing::TempDir>();
  testing::DaemonOptions options;
  options.work_dir = w.dir->path();
  options.token = "bench-token";
  absl::StatusOr<std::unique_ptr<testing::DaemonProcess>> daemon =
      testing::DaemonProcess::Start(options);
  Check(daemon.status(), "start headwised");
  w.daemon = *std::move(daemon);
  absl::StatusOr<std::unique_ptr<Client>> c = w.daemon->Connect("bench-token");
  Check(c.status(), "connect");
  w.client = *std::move(c);
  Check(w.client->RegisterLayout("llama3-8b-layer", w.layout), "RegisterLayout");
  Check(w.client->RegisterLayout("llama3-8b", Llama3_8b()), "RegisterLayout llama3-8b");
  {
    grpc::ServerBuilder builder;
    const std::string bare_socket = "unix:" + w.dir->path() + "/bare.sock";
    builder.AddListeningPort(bare_socket, grpc::InsecureServerCredentials());
    builder.RegisterService(&w.bare_service);
    w.bare_server = builder.BuildAndStart();
    if (w.bare_server == nullptr) Check(absl::InternalError("cannot start"), "bare gRPC server");
    w.bare_stub = headwise::v1::Headwise::NewStub(
        grpc::CreateChannel(bare_socket, grpc::InsecureChannelCredentials()));
  }

  EngineOptions engine_options;
  engine_options.device_budget_bytes = uint64_t{512} << 20;
  engine_options.host_budget_bytes = uint64_t{512} << 20;
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(engine_options);
  Check(engine.status(), "Engine::Create");
  w.engine = *std::move(engine);
  Check(w.engine->RegisterLayout("llama3-8b-layer", w.layout), "engine RegisterLayout");

  RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  PrintRatios(reporter);
  w.client.reset();
  w.bare_stub.reset();
  w.bare_server->Shutdown();
  Check(w.daemon->Terminate().status(), "stop headwised");
  benchmark::Shutdown();
  return 0;
}
