// A real 2^20-token sequence in the engine: two layers of Llama-3-8B's shape (8 KV heads, 32
// query heads, head_dim 128, f16; 8 GiB of K and V) with a device budget of 1/64 of the KV
// (128 MiB) and placement head_offload (HeadInfer, policies.md §1). A plain program, not a
// Google Benchmark: one 8 GiB setup does not fit the fixed-iteration model.
//
// What it does, in one process:
//   1. Side by side at a small context that fits the same device budget: head_offload,
//      layer_offload and device_only (the engine's own device-only time is the baseline there).
//   2. What happens at the full context with the other placements: device_only appends fail
//      with RESOURCE_EXHAUSTED once the device pool is full, layer_offload cannot stage a layer
//      longer than the device pool (shown on the shortest such sequence, to save memory).
//   3. The full sequence with head_offload: filled in chunks of K/V generated on the fly (no
//      copy is kept), then decode steps (Attend on each layer with the same random q); per
//      layer-step time (median), bytes moved host->device, device peak, and the share of copy
//      time hidden behind compute (engine counters).
//   4. Exactness: every query head's output and lse against a float64 reference that
//      regenerates the same K/V stream (streamed once per (layer, KV head)). Exits 1 on FAIL.
//   5. The raw kernel (kernels::DecodeAttention) over the same KV of layer 0 in plain host
//      memory, one KV head at a time (a 512 MiB buffer, refilled per head): the streaming
//      overhead is head_offload's layer time over this.
//
// Usage: million_tokens [--tokens N] [--steps S] [--chunk T] [--compute_threads N]
//                       [--copy_threads N]

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "cachesvc/base/dtype.h"
#include "cachesvc/base/layout.h"
#include "cachesvc/engine.h"
#include "headwise/v1/policy.pb.h"
#include "kernels/attention.h"

namespace headwise::bench {
namespace {

using Placement = headwise::v1::Placement;
using SteadyClock = std::chrono::steady_clock;

constexpr int kLayers = 2;
constexpr int kKvHeads = 8;
constexpr int kQHeads = 32;
constexpr int kGroup = kQHeads / kKvHeads;
constexpr int kHeadDim = 128;
constexpr int kPageTokens = 64;
// Bytes of K plus V per token of one (layer, KV head), and per token of the whole slice.
constexpr int64_t kHeadTokenBytes = 2 * kHeadDim * 2;
constexpr int64_t kTokenBytes = kHeadTokenBytes * kKvHeads * kLayers;
constexpr double kTolerance = 1e-3;

struct Flags {
  int64_t tokens = int64_t{1} << 20;
  int steps = 5;
  int chunk = 4096;
  int compute_threads = 1;
  int copy_threads = 2;
};

double Seconds(SteadyClock::time_point a, SteadyClock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double MiB(double bytes) { return bytes / (1024.0 * 1024.0); }
double GiB(double bytes) { return bytes / (1024.0 * 1024.0 * 1024.0); }

void Check(const absl::Status& st, const char* what) {
  if (!st.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, st.ToString().c_str());
    std::exit(2);
  }
}

// ---------------------------------------------------------------------------------------------
// The deterministic K/V stream. Any token's K and V can be recomputed from (layer, token, head),
// so neither the fill nor the reference keeps a copy. Every value is a multiple of 2^-10 in
// [-2, 2): exact in f16, so the reference sees exactly the stored values.
//   K = U{-2048..2047} / 1024.
//   V = (U{-512..511} + offset(layer, head, dim, token / 4096)) / 1024, offset in -1024..1023:
//     the offset changes every 4096 tokens, so an attention that skipped a block of tokens
//     would miss the reference by far more than the tolerance.

uint64_t SplitMix(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

class KvStream {
 public:
  KvStream() {
    for (int i = 0; i < 4096; ++i) {
      value_[i] = static_cast<float>(i - 2048) / 1024.0f;
      half_[i] = FloatToHalf(value_[i]);
      if (HalfToFloat(half_[i]) != value_[i]) std::abort();
    }
  }

  // Table indices (value = (index - 2048) / 1024) of K and V of one (layer, token, head).
  void Row(int layer, int64_t token, int head, uint16_t* k_index, uint16_t* v_index) const {
    uint64_t state = (static_cast<uint64_t>(layer) << 56) ^ (static_cast<uint64_t>(token) << 8) ^
                     static_cast<uint64_t>(head);
    uint64_t offset_state = (static_cast<uint64_t>(layer) << 56) ^
                            (static_cast<uint64_t>(token / 4096) << 8) ^
                            static_cast<uint64_t>(head) ^ 0x5555555555555555ull;
    for (int d = 0; d < kHeadDim; d += 4) {
      const uint64_t r = SplitMix(state);
      const uint64_t s = SplitMix(state);
      const uint64_t o = SplitMix(offset_state);
      for (int j = 0; j < 4; ++j) {
        k_index[d + j] = static_cast<uint16_t>((r >> (16 * j)) & 0xfff);
        const int noise = static_cast<int>((s >> (16 * j)) & 0x3ff) - 512;
        const int offset = static_cast<int>((o >> (16 * j)) & 0x7ff) - 1024;
        v_index[d + j] = static_cast<uint16_t>(noise + offset + 2048);
      }
    }
  }

  // K and V of tokens [begin, begin + n) of `layer`, [n][kKvHeads][kHeadDim] f16.
  void Chunk(int layer, int64_t begin, int n, uint16_t* k, uint16_t* v) const {
    uint16_t ki[kHeadDim], vi[kHeadDim];
    for (int t = 0; t < n; ++t) {
      for (int h = 0; h < kKvHeads; ++h) {
        Row(layer, begin + t, h, ki, vi);
        const int64_t at = (int64_t{t} * kKvHeads + h) * kHeadDim;
        for (int d = 0; d < kHeadDim; ++d) {
          k[at + d] = half_[ki[d]];
          v[at + d] = half_[vi[d]];
        }
      }
    }
  }

  float value(uint16_t index) const { return value_[index]; }
  uint16_t half(uint16_t index) const { return half_[index]; }

 private:
  float value_[4096];
  uint16_t half_[4096];
};

ModelLayout SliceLayout() {
  ModelLayout layout;
  layout.num_layers = kLayers;
  layout.num_q_heads = kQHeads;
  layout.num_kv_heads = kKvHeads;
  layout.head_dim = kHeadDim;
  layout.dtype = DType::kF16;
  layout.page_tokens = kPageTokens;
  return layout;
}

std::vector<float> RandomQuery(int layer) {
  std::mt19937 rng(1000 + layer);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> q(int64_t{kQHeads} * kHeadDim);
  for (float& x : q) x = normal(rng);
  return q;
}

// Appends tokens [0, tokens) to every layer in chunks; stops at the first error (returned with
// the tokens appended to every layer so far).
struct FillResult {
  absl::Status status;
  int64_t tokens = 0;
  double seconds = 0.0;
};

FillResult Fill(Engine& engine, const SequenceId& seq, const KvStream& stream, int64_t tokens,
                int chunk) {
  FillResult result;
  std::vector<uint16_t> k(int64_t{chunk} * kKvHeads * kHeadDim);
  std::vector<uint16_t> v(k.size());
  const auto start = SteadyClock::now();
  for (int64_t at = 0; at < tokens; at += chunk) {
    const int n = static_cast<int>(std::min<int64_t>(chunk, tokens - at));
    const size_t bytes = static_cast<size_t>(n) * kKvHeads * kHeadDim * 2;
    for (int l = 0; l < kLayers; ++l) {
      stream.Chunk(l, at, n, k.data(), v.data());
      result.status = engine.Append(
          seq, LayerId(l), absl::MakeConstSpan(reinterpret_cast<std::byte*>(k.data()), bytes),
          absl::MakeConstSpan(reinterpret_cast<std::byte*>(v.data()), bytes), n, DType::kF16);
      if (!result.status.ok()) {
        result.seconds = Seconds(start, SteadyClock::now());
        return result;
      }
    }
    result.tokens = at + n;
  }
  result.seconds = Seconds(start, SteadyClock::now());
  return result;
}

headwise::v1::PolicySpec Spec(Placement::Mode mode) {
  headwise::v1::PolicySpec spec;
  spec.mutable_placement()->set_mode(mode);
  return spec;
}

const char* ModeName(Placement::Mode mode) {
  switch (mode) {
    case Placement::DEVICE_ONLY:
      return "device_only";
    case Placement::LAYER_OFFLOAD:
      return "layer_offload";
    case Placement::HEAD_OFFLOAD:
      return "head_offload";
    default:
      return "?";
  }
}

std::unique_ptr<Engine> MakeEngine(uint64_t device_budget, uint64_t host_budget,
                                   const Flags& flags) {
  EngineOptions options;
  options.device_budget_bytes = device_budget;
  options.host_budget_bytes = host_budget;
  options.compute_threads = flags.compute_threads;
  options.copy_threads = flags.copy_threads;
  auto engine = Engine::Create(options);
  Check(engine.status(), "Engine::Create");
  Check((*engine)->RegisterLayout("llama3-8b-2l", SliceLayout()), "RegisterLayout");
  return std::move(*engine);
}

// Decode steps: Attend on every layer with that layer's q. Per layer-step time, bytes moved
// host->device, and stall / overlapped copy time.
struct StepStats {
  std::vector<double> seconds;
  std::vector<double> h2d_bytes;
  std::vector<double> hidden_share;  // overlapped / (overlapped + stall), per layer-step.
  double stall_ns = 0.0;
  double overlapped_ns = 0.0;
  std::vector<std::vector<float>> o, lse;  // Last step's outputs per layer.
  bool steps_identical = true;
};

StepStats RunSteps(Engine& engine, const SequenceId& seq, int steps) {
  StepStats out;
  out.o.assign(kLayers, std::vector<float>(int64_t{kQHeads} * kHeadDim));
  out.lse.assign(kLayers, std::vector<float>(kQHeads));
  std::vector<float> o(int64_t{kQHeads} * kHeadDim), lse(kQHeads);
  for (int step = 0; step < steps; ++step) {
    for (int l = 0; l < kLayers; ++l) {
      const std::vector<float> q = RandomQuery(l);
      const EngineStats before = engine.GetStats();
      const auto start = SteadyClock::now();
      Check(engine.Attend(seq, LayerId(l), q, absl::MakeSpan(o), absl::MakeSpan(lse)), "Attend");
      const double secs = Seconds(start, SteadyClock::now());
      const EngineStats after = engine.GetStats();
      out.seconds.push_back(secs);
      out.h2d_bytes.push_back(
          static_cast<double>(after.bytes_host_to_device - before.bytes_host_to_device));
      const double stall = static_cast<double>(after.stall_ns - before.stall_ns);
      const double overlapped = static_cast<double>(after.overlapped_ns - before.overlapped_ns);
      out.stall_ns += stall;
      out.overlapped_ns += overlapped;
      out.hidden_share.push_back(stall + overlapped > 0 ? overlapped / (stall + overlapped) : 0.0);
      if (step > 0 && (o != out.o[l] || lse != out.lse[l])) out.steps_identical = false;
      out.o[l] = o;
      out.lse[l] = lse;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Float64 reference over tokens [0, tokens) of one (layer, KV head), for its kGroup query heads:
// online softmax with exact rescaling.

void ReferenceHead(const KvStream& stream, int layer, int head, int64_t tokens, const float* q,
                   double* o, double* lse) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(kHeadDim));
  double qd[kGroup][kHeadDim];
  for (int g = 0; g < kGroup; ++g) {
    for (int d = 0; d < kHeadDim; ++d) qd[g][d] = q[g * kHeadDim + d];
  }
  double m[kGroup], sum[kGroup];
  std::vector<double> acc(kGroup * kHeadDim, 0.0);
  for (int g = 0; g < kGroup; ++g) {
    m[g] = -std::numeric_limits<double>::infinity();
    sum[g] = 0.0;
  }
  uint16_t ki[kHeadDim], vi[kHeadDim];
  double k[kHeadDim], v[kHeadDim];
  for (int64_t t = 0; t < tokens; ++t) {
    stream.Row(layer, t, head, ki, vi);
    for (int d = 0; d < kHeadDim; ++d) {
      k[d] = stream.value(ki[d]);
      v[d] = stream.value(vi[d]);
    }
    for (int g = 0; g < kGroup; ++g) {
      double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (int d = 0; d < kHeadDim; d += 4) {
        s0 += qd[g][d] * k[d];
        s1 += qd[g][d + 1] * k[d + 1];
        s2 += qd[g][d + 2] * k[d + 2];
        s3 += qd[g][d + 3] * k[d + 3];
      }
      const double logit = ((s0 + s1) + (s2 + s3)) * scale;
      double* a = &acc[g * kHeadDim];
      if (logit > m[g]) {
        const double r = std::exp(m[g] - logit);  // 0 for the first token.
        sum[g] *= r;
        for (int d = 0; d < kHeadDim; ++d) a[d] *= r;
        m[g] = logit;
      }
      const double w = std::exp(logit - m[g]);
      sum[g] += w;
      for (int d = 0; d < kHeadDim; ++d) a[d] += w * v[d];
    }
  }
  for (int g = 0; g < kGroup; ++g) {
    for (int d = 0; d < kHeadDim; ++d) o[g * kHeadDim + d] = acc[g * kHeadDim + d] / sum[g];
    lse[g] = m[g] + std::log(sum[g]);
  }
}

// Per layer: the worst query head's max |o - ref| / max |ref| and max |lse - ref_lse|.
struct CheckResult {
  double o_rel = 0.0;
  double lse_abs = 0.0;
  int worst_q_head = 0;
  bool pass = true;
};

CheckResult CheckLayer(const KvStream& stream, int layer, int64_t tokens,
                       const std::vector<float>& o, const std::vector<float>& lse) {
  const std::vector<float> q = RandomQuery(layer);
  std::vector<double> ro(int64_t{kQHeads} * kHeadDim), rlse(kQHeads);
#pragma omp parallel for schedule(dynamic, 1)
  for (int h = 0; h < kKvHeads; ++h) {
    ReferenceHead(stream, layer, h, tokens, &q[int64_t{h} * kGroup * kHeadDim],
                  &ro[int64_t{h} * kGroup * kHeadDim], &rlse[h * kGroup]);
  }
  CheckResult r;
  for (int qh = 0; qh < kQHeads; ++qh) {
    double err = 0.0, scale = 1e-30;
    for (int d = 0; d < kHeadDim; ++d) {
      const int64_t i = int64_t{qh} * kHeadDim + d;
      err = std::max(err, std::abs(double{o[i]} - ro[i]));
      scale = std::max(scale, std::abs(ro[i]));
    }
    const double rel = err / scale;
    const double lse_err = std::abs(double{lse[qh]} - rlse[qh]);
    if (!(rel < kTolerance) || !(lse_err < kTolerance)) r.pass = false;
    if (rel > r.o_rel) r.worst_q_head = qh;
    r.o_rel = std::max(r.o_rel, rel);
    r.lse_abs = std::max(r.lse_abs, lse_err);
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// The raw kernel over one KV head of `layer` in plain host memory, pages in order.

struct RawKernel {
  double layer_seconds = 0.0;  // Sum over heads of the median kernel time.
  double max_rel_vs_engine = 0.0;
};

RawKernel RunRawKernel(const KvStream& stream, int layer, int64_t tokens, int reps, int num_threads,
                       const std::vector<float>& engine_o) {
  const int64_t pages = (tokens + kPageTokens - 1) / kPageTokens;
  const int64_t page_bytes = kernels::PageBytes(kPageTokens, kHeadDim, DType::kF16);
  const size_t bytes = static_cast<size_t>(pages * page_bytes);
  void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) std::abort();
  auto* pool = static_cast<uint16_t*>(mem);
  std::vector<int32_t> indices(pages);
  for (int64_t i = 0; i < pages; ++i) indices[i] = static_cast<int32_t>(i);
  const int32_t indptr[2] = {0, static_cast<int32_t>(pages)};
  const int32_t last = static_cast<int32_t>(tokens - (pages - 1) * kPageTokens);
  kernels::PagedKvView kv;
  kv.pool = static_cast<const std::byte*>(mem);
  kv.indptr = indptr;
  kv.indices = indices.data();
  kv.last_page_len = &last;
  kv.num_slots = pages;
  kv.num_kv_heads = 1;
  kv.page_tokens = kPageTokens;
  kv.head_dim = kHeadDim;
  kv.dtype = DType::kF16;
  const std::vector<float> q = RandomQuery(layer);
  RawKernel out;
  std::vector<float> o(kGroup * kHeadDim), lse(kGroup);
  uint16_t ki[kHeadDim], vi[kHeadDim];
  for (int h = 0; h < kKvHeads; ++h) {
    for (int64_t t = 0; t < tokens; ++t) {
      stream.Row(layer, t, h, ki, vi);
      uint16_t* page = pool + (t / kPageTokens) * (page_bytes / 2);
      uint16_t* krow = page + (t % kPageTokens) * kHeadDim;
      uint16_t* vrow = page + (kPageTokens + t % kPageTokens) * kHeadDim;
      for (int d = 0; d < kHeadDim; ++d) {
        krow[d] = stream.half(ki[d]);
        vrow[d] = stream.half(vi[d]);
      }
    }
    kernels::DecodeArgs args;
    args.q = &q[int64_t{h} * kGroup * kHeadDim];
    args.num_q_heads = kGroup;
    args.o = o.data();
    args.lse = lse.data();
    args.num_threads = num_threads;
    std::vector<double> times;
    for (int r = 0; r < reps; ++r) {
      const auto start = SteadyClock::now();
      Check(kernels::DecodeAttention(kv, args), "DecodeAttention");
      times.push_back(Seconds(start, SteadyClock::now()));
    }
    out.layer_seconds += Median(times);
    double err = 0.0, scale = 1e-30;
    for (int i = 0; i < kGroup * kHeadDim; ++i) {
      const float e = engine_o[int64_t{h} * kGroup * kHeadDim + i];
      err = std::max(err, std::abs(double{o[i]} - e));
      scale = std::max(scale, std::abs(double{e}));
    }
    out.max_rel_vs_engine = std::max(out.max_rel_vs_engine, err / scale);
  }
  munmap(mem, bytes);
  return out;
}

Flags ParseFlags(int argc, char** argv) {
  Flags flags;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&]() -> long long {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", arg.c_str());
        std::exit(2);
      }
      return std::atoll(argv[++i]);
    };
    if (arg == "--tokens") {
      flags.tokens = value();
    } else if (arg == "--steps") {
      flags.steps = static_cast<int>(value());
    } else if (arg == "--chunk") {
      flags.chunk = static_cast<int>(value());
    } else if (arg == "--compute_threads") {
      flags.compute_threads = static_cast<int>(value());
    } else if (arg == "--copy_threads") {
      flags.copy_threads = static_cast<int>(value());
    } else {
      std::fprintf(stderr,
                   "usage: %s [--tokens N] [--steps S] [--chunk T] [--compute_threads N] "
                   "[--copy_threads N]\n",
                   argv[0]);
      std::exit(2);
    }
  }
  if (flags.tokens < 4096 || flags.tokens % kPageTokens != 0 || flags.steps < 1 ||
      flags.chunk < 1 || flags.compute_threads < 1 || flags.copy_threads < 1) {
    std::fprintf(stderr, "--tokens must be a multiple of 64 and >= 4096; others positive\n");
    std::exit(2);
  }
  return flags;
}

int Main(int argc, char** argv) {
  const Flags flags = ParseFlags(argc, argv);
  const KvStream stream;
  const int64_t kv_bytes = flags.tokens * kTokenBytes;
  const int64_t layer_bytes = kv_bytes / kLayers;
  const uint64_t device_budget = static_cast<uint64_t>(kv_bytes / 64);
  // The KV plus 1/16 for extent spares.
  const uint64_t host_budget = static_cast<uint64_t>(kv_bytes + kv_bytes / 16);
  std::printf(
      "million_tokens: %d layers x %d KV heads (%d query heads) x %lld tokens x D %d, f16\n",
      kLayers, kKvHeads, kQHeads, static_cast<long long>(flags.tokens), kHeadDim);
  std::printf(
      "KV %.3f GiB; device budget %.1f MiB (1/64); host budget %.3f GiB; page %d tokens; "
      "compute_threads %d, copy_threads %d, %d steps\n\n",
      GiB(kv_bytes), MiB(device_budget), GiB(host_budget), kPageTokens, flags.compute_threads,
      flags.copy_threads, flags.steps);
  bool all_pass = true;

  // 1. Side by side at a small context that fits the device budget in every placement.
  const int64_t small_tokens = std::max<int64_t>(
      kPageTokens, (device_budget * 3 / 4 / kTokenBytes) / kPageTokens * kPageTokens);
  std::printf("== 1. side by side at %lld tokens (KV %.1f MiB), same device budget %.1f MiB ==\n",
              static_cast<long long>(small_tokens), MiB(small_tokens * kTokenBytes),
              MiB(device_budget));
  std::printf("%-14s %14s %14s %12s %10s %8s\n", "placement", "median ms/layer", "H2D MiB/layer",
              "hidden", "vs device", "check");
  double small_device_only = 0.0;
  for (Placement::Mode mode :
       {Placement::DEVICE_ONLY, Placement::LAYER_OFFLOAD, Placement::HEAD_OFFLOAD}) {
    auto engine = MakeEngine(device_budget, host_budget, flags);
    auto seq = engine->CreateSequence("llama3-8b-2l", Spec(mode));
    Check(seq.status(), "CreateSequence");
    const FillResult fill = Fill(*engine, *seq, stream, small_tokens, flags.chunk);
    Check(fill.status, "fill (small)");
    RunSteps(*engine, *seq, 1);  // Warm-up: first touch of the staging slots.
    const StepStats st = RunSteps(*engine, *seq, std::max(flags.steps, 9));
    bool pass = st.steps_identical;
    for (int l = 0; l < kLayers; ++l) {
      pass = pass && CheckLayer(stream, l, small_tokens, st.o[l], st.lse[l]).pass;
    }
    all_pass = all_pass && pass;
    const double med = Median(st.seconds);
    if (mode == Placement::DEVICE_ONLY) small_device_only = med;
    const double hidden = st.stall_ns + st.overlapped_ns > 0
                              ? st.overlapped_ns / (st.stall_ns + st.overlapped_ns)
                              : 0.0;
    std::printf("%-14s %14.3f %14.1f %11.0f%% %9.2fx %8s\n", ModeName(mode), med * 1e3,
                MiB(Median(st.h2d_bytes)), hidden * 100, med / small_device_only,
                pass ? "PASS" : "FAIL");
  }

  // 2. The other placements at the full context.
  std::printf("\n== 2. device_only and layer_offload at %lld tokens, device budget %.1f MiB ==\n",
              static_cast<long long>(flags.tokens), MiB(device_budget));
  {
    auto engine = MakeEngine(device_budget, host_budget, flags);
    auto seq = engine->CreateSequence("llama3-8b-2l", Spec(Placement::DEVICE_ONLY));
    Check(seq.status(), "CreateSequence");
    // Small chunks, so that the last append that fits is found to within 256 tokens.
    const FillResult fill = Fill(*engine, *seq, stream, flags.tokens, 256);
    std::printf("device_only: needs %.1f MiB of device; appends stop after %lld tokens: %s\n",
                MiB(kv_bytes), static_cast<long long>(fill.tokens), fill.status.ToString().c_str());
    if (absl::IsResourceExhausted(fill.status) == false) all_pass = false;
  }
  {
    // The shortest sequence whose layer does not fit the device pool (not the full context:
    // the outcome is the same and it needs 8 GiB less memory).
    const int64_t tokens = (device_budget / (kHeadTokenBytes * kKvHeads) / 4096 + 1) * 4096;
    auto engine = MakeEngine(device_budget, host_budget, flags);
    auto seq = engine->CreateSequence("llama3-8b-2l", Spec(Placement::LAYER_OFFLOAD));
    Check(seq.status(), "CreateSequence");
    Check(Fill(*engine, *seq, stream, tokens, flags.chunk).status, "fill (layer_offload)");
    std::vector<float> o(kQHeads * kHeadDim), lse(kQHeads);
    const absl::Status st =
        engine->Attend(*seq, LayerId(0), RandomQuery(0), absl::MakeSpan(o), absl::MakeSpan(lse));
    std::printf(
        "layer_offload: stages a whole layer, %.1f MiB at %lld tokens; already at %lld "
        "tokens (a %.1f MiB layer) Attend gives: %s\n",
        MiB(layer_bytes), static_cast<long long>(flags.tokens), static_cast<long long>(tokens),
        MiB(tokens * kHeadTokenBytes * kKvHeads), st.ToString().c_str());
    if (absl::IsResourceExhausted(st) == false) all_pass = false;
  }

  // 3. The full sequence, head_offload.
  std::printf("\n== 3. head_offload at %lld tokens ==\n", static_cast<long long>(flags.tokens));
  auto engine = MakeEngine(device_budget, host_budget, flags);
  auto seq = engine->CreateSequence("llama3-8b-2l", Spec(Placement::HEAD_OFFLOAD));
  Check(seq.status(), "CreateSequence");
  const FillResult fill = Fill(*engine, *seq, stream, flags.tokens, flags.chunk);
  Check(fill.status, "fill (head_offload)");
  const EngineStats filled = engine->GetStats();
  std::printf("fill: %.1f s (%.2f GB/s of K+V appended, generated on the fly in chunks of %d)\n",
              fill.seconds, kv_bytes / fill.seconds / 1e9, flags.chunk);
  const StepStats st = RunSteps(*engine, *seq, flags.steps);
  const EngineStats after = engine->GetStats();
  std::vector<double> per_layer[kLayers];
  for (size_t i = 0; i < st.seconds.size(); ++i) per_layer[i % kLayers].push_back(st.seconds[i]);
  const double med = Median(st.seconds);
  const double hidden = st.stall_ns + st.overlapped_ns > 0
                            ? st.overlapped_ns / (st.stall_ns + st.overlapped_ns)
                            : 0.0;
  std::printf("device: peak %.1f MiB of %.1f MiB budget (%s), used now %.1f MiB%s\n",
              MiB(after.device.peak_bytes), MiB(after.device.budget_bytes),
              after.device.peak_bytes <= after.device.budget_bytes ? "within" : "OVER",
              MiB(after.device.used_bytes), after.device_emulated ? " (emulated device)" : "");
  std::printf("host: %.3f GiB used (%lld pages, %.3f GiB of page payload), peak %.3f GiB\n",
              GiB(filled.host.used_bytes), static_cast<long long>(filled.host_pages),
              GiB(static_cast<double>(filled.host_pages) * kPageTokens * kHeadTokenBytes),
              GiB(after.host.peak_bytes));
  std::printf(
      "layer-step (Attend of one layer): median %.3f s (layer 0 %.3f s, layer 1 %.3f s; "
      "min %.3f, max %.3f; %zu layer-steps)\n",
      med, Median(per_layer[0]), Median(per_layer[1]),
      *std::min_element(st.seconds.begin(), st.seconds.end()),
      *std::max_element(st.seconds.begin(), st.seconds.end()), st.seconds.size());
  std::printf("decode step (both layers): %.3f s median-based\n", med * kLayers);
  std::printf(
      "host->device per layer-step: %.1f MiB (the layer is %.1f MiB: ratio %.3f); per "
      "decode step %.1f MiB; %.2f GB/s effective\n",
      MiB(Median(st.h2d_bytes)), MiB(layer_bytes), Median(st.h2d_bytes) / layer_bytes,
      MiB(Median(st.h2d_bytes) * kLayers), Median(st.h2d_bytes) / med / 1e9);
  std::printf(
      "copy time hidden behind compute: %.0f%% overall (overlapped %.3f s, stall %.3f s); "
      "per layer-step median %.0f%% (min %.0f%%, max %.0f%%)\n",
      hidden * 100, st.overlapped_ns / 1e9, st.stall_ns / 1e9, Median(st.hidden_share) * 100,
      *std::min_element(st.hidden_share.begin(), st.hidden_share.end()) * 100,
      *std::max_element(st.hidden_share.begin(), st.hidden_share.end()) * 100);
  std::printf("steps bitwise identical: %s\n", st.steps_identical ? "yes" : "NO");
  if (after.device.peak_bytes > after.device.budget_bytes || !st.steps_identical) all_pass = false;

  // 4. Exactness against the float64 reference.
  std::printf("\n== 4. exactness vs float64 reference (every query head; tol %.0e) ==\n",
              kTolerance);
  for (int l = 0; l < kLayers; ++l) {
    const auto start = SteadyClock::now();
    const CheckResult r = CheckLayer(stream, l, flags.tokens, st.o[l], st.lse[l]);
    std::printf("layer %d: %s  max rel err of o %.3e (q head %d), max |lse err| %.3e  (%.1f s)\n",
                l, r.pass ? "PASS" : "FAIL", r.o_rel, r.worst_q_head, r.lse_abs,
                Seconds(start, SteadyClock::now()));
    all_pass = all_pass && r.pass;
  }

  // 5. The raw kernel over the same KV in host memory.
  std::printf("\n== 5. raw kernel over layer 0's KV in host memory (one head at a time) ==\n");
  const RawKernel raw = RunRawKernel(stream, 0, flags.tokens, 3, flags.compute_threads, st.o[0]);
  const double med0 = Median(per_layer[0]);
  std::printf(
      "kernels::DecodeAttention, 8 heads x %.1f MiB: %.3f s per layer (%.2f GB/s); "
      "max rel diff vs engine %.2e\n",
      MiB(flags.tokens * kHeadTokenBytes), raw.layer_seconds, layer_bytes / raw.layer_seconds / 1e9,
      raw.max_rel_vs_engine);
  std::printf("head_offload layer 0 / raw kernel: %.2fx (streaming overhead %.3f s per layer)\n",
              med0 / raw.layer_seconds, med0 - raw.layer_seconds);

  std::printf("\n%s\n", all_pass ? "PASS" : "FAIL");
  return all_pass ? 0 : 1;
}

}  // namespace
}  // namespace headwise::bench

int main(int argc, char** argv) { return headwise::bench::Main(argc, argv); }
