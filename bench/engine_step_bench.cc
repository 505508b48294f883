// What the engine adds to one decode step of one layer, and whether layer_offload overlaps its
// copies. A plain program printing tables (a 4 GiB fill does not fit Google Benchmark's model).
//
// 1. device_only, one Llama-3-8B layer (32 query / 8 KV heads, head_dim 128, f16, 64-token pages)
//    per context length L and EngineOptions::compute_threads, interleaved rep by rep so that a
//    noisy machine hits all three alike: Engine::Attend at L; the raw kernels::DecodeAttention
//    over the same K/V in a plain page pool (each head's pages contiguous, private anonymous
//    memory like the emulated device pool, written head by head like an engine append); and
//    Engine::DecodeStep (token L + 1; L is a multiple of 64, so it opens a page per head) followed
//    by an untimed Truncate back to L. Per row: medians, (engine - kernel) / kernel, and
//    "paired", the median over reps of (Attend - kernel) / kernel within a rep.
// 2. layer_offload over several layers with a device budget of a few layers: a full decode step
//    (DecodeStep on every layer; the sequence grows a token a step unless --offload_truncate
//    truncates it back, untimed, after each), the copy engine's stall vs overlapped
//    time, bytes host->device, overlap share = overlapped / (stall + overlapped), and per layer
//    its time and copy stall (when layer l+1's copy overlaps layer l, layers 1.. stop stalling).
//    The same sequence placed device_only gives the step without copies: the difference is the
//    copy time not hidden, whatever the copy engine's accounting says.
//
// K/V: pseudo-random multiples of 2^-10 in [-2, 2) (exact in f16) from a counter per 4096-token
// chunk, so the engine and the raw pool get the same values without a copy; q is N(0, 1).
//
// Usage: engine_step_bench [--lengths 4096,65536,1048576] [--threads 1,2] [--min_reps N]
//            [--max_reps N] [--target_s S] [--offload_layers N] [--offload_tokens N]
//            [--offload_device_layers N] [--offload_steps N] [--offload_truncate]
//            [--copy_threads N] [--no_offload]
//            [--no_device_only]

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/types/span.h"
#include "cachesvc/base/dtype.h"
#include "cachesvc/base/layout.h"
#include "cachesvc/engine.h"
#include "headwise/v1/policy.pb.h"
#include "hwy/targets.h"
#include "kernels/attention.h"

namespace headwise::bench {
namespace {

using Placement = headwise::v1::Placement;
using SteadyClock = std::chrono::steady_clock;

constexpr int kKvHeads = 8;
constexpr int kQHeads = 32;
constexpr int kHeadDim = 128;
constexpr int kPageTokens = 64;
constexpr int kChunk = 4096;
// Bytes of K plus V per token of one layer (every KV head).
constexpr int64_t kLayerTokenBytes = int64_t{2} * kHeadDim * 2 * kKvHeads;

struct Flags {
  std::vector<int64_t> lengths = {4096, 65536, int64_t{1} << 20};
  std::vector<int64_t> threads = {1, 2};
  int min_reps = 5;
  int max_reps = 201;
  double target_s = 2.0;  // Time per row and per measured call kind, before the rep limits.
  int offload_layers = 4;
  int64_t offload_tokens = 65536;
  int offload_device_layers = 2;
  int offload_steps = 7;
  bool offload_truncate = false;  // Truncate back to the start length after every step.
  int copy_threads = 2;
  bool offload = true;
  bool device_only = true;
};

void Check(const absl::Status& st, const char* what) {
  if (!st.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, st.ToString().c_str());
    std::exit(2);
  }
}

double Since(SteadyClock::time_point start) {
  return std::chrono::duration<double>(SteadyClock::now() - start).count();
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double MiB(double bytes) { return bytes / (1024.0 * 1024.0); }

// ---------------------------------------------------------------------------------------------
// K/V values: chunk `c` (tokens [c * kChunk, ...)) of `layer` comes from its own SplitMix64
// stream, [n][kKvHeads][kHeadDim] f16 for K then V.

class KvGenerator {
 public:
  KvGenerator() {
    for (int i = 0; i < 4096; ++i) half_[i] = FloatToHalf(static_cast<float>(i - 2048) / 1024.0f);
  }

  void Chunk(int layer, int64_t begin, int n, std::vector<uint16_t>& k,
             std::vector<uint16_t>& v) const {
    const size_t elems = static_cast<size_t>(n) * kKvHeads * kHeadDim;
    k.resize(elems);
    v.resize(elems);
    uint64_t state = (static_cast<uint64_t>(layer) << 48) ^ static_cast<uint64_t>(begin);
    for (std::vector<uint16_t>* out : {&k, &v}) {
      for (size_t i = 0; i < elems; i += 4) {
        const uint64_t r = Next(state);
        for (int j = 0; j < 4; ++j) (*out)[i + j] = half_[(r >> (16 * j)) & 0xfff];
      }
    }
  }

 private:
  static uint64_t Next(uint64_t& state) {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint16_t half_[4096];
};

std::vector<float> RandomQuery(int layer) {
  std::mt19937 rng(1000 + layer);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> q(int64_t{kQHeads} * kHeadDim);
  for (float& x : q) x = normal(rng);
  return q;
}

absl::Span<const std::byte> Bytes(const std::vector<uint16_t>& x) {
  return absl::MakeConstSpan(reinterpret_cast<const std::byte*>(x.data()), x.size() * 2);
}

// ---------------------------------------------------------------------------------------------
// The raw kernel's pool: one layer, head h's pages at slots [h * pages, (h + 1) * pages).

class RawPool {
 public:
  explicit RawPool(int64_t tokens)
      : tokens_(tokens),
        pages_((tokens + kPageTokens - 1) / kPageTokens),
        bytes_(static_cast<size_t>(pages_ * kKvHeads * PageBytes())) {
    void* mem = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) std::abort();
    pool_ = static_cast<uint16_t*>(mem);
    for (int h = 0; h < kKvHeads; ++h) {
      indptr_.push_back(static_cast<int32_t>(h * pages_));
      last_.push_back(static_cast<int32_t>(tokens - (pages_ - 1) * kPageTokens));
    }
    indptr_.push_back(static_cast<int32_t>(kKvHeads * pages_));
    indices_.resize(kKvHeads * pages_);
    for (size_t i = 0; i < indices_.size(); ++i) indices_[i] = static_cast<int32_t>(i);
  }
  ~RawPool() { munmap(pool_, bytes_); }
  RawPool(const RawPool&) = delete;
  RawPool& operator=(const RawPool&) = delete;

  static int64_t PageBytes() { return kernels::PageBytes(kPageTokens, kHeadDim, DType::kF16); }

  // Stores tokens [begin, begin + n), k and v as Append takes them. Head by head, as the engine
  // writes an append: the order of first touch decides where the pages land in physical memory,
  // and token-major writes (all heads of a token, then the next token) made the 2^20-token kernel
  // 5-15% slower than the same kernel over the engine's pool in the development runs.
  void Store(int64_t begin, int n, const std::vector<uint16_t>& k, const std::vector<uint16_t>& v) {
    for (int h = 0; h < kKvHeads; ++h) {
      for (int t = 0; t < n; ++t) {
        const int64_t token = begin + t;
        uint16_t* page = pool_ + (h * pages_ + token / kPageTokens) * (PageBytes() / 2);
        const int64_t row = (token % kPageTokens) * kHeadDim;
        const size_t at = (static_cast<size_t>(t) * kKvHeads + h) * kHeadDim;
        std::copy_n(&k[at], kHeadDim, page + row);
        std::copy_n(&v[at], kHeadDim, page + kPageTokens * kHeadDim + row);
      }
    }
  }

  kernels::PagedKvView view() const {
    kernels::PagedKvView kv;
    kv.pool = reinterpret_cast<const std::byte*>(pool_);
    kv.indptr = indptr_.data();
    kv.indices = indices_.data();
    kv.last_page_len = last_.data();
    kv.num_slots = static_cast<int64_t>(indices_.size());
    kv.num_kv_heads = kKvHeads;
    kv.page_tokens = kPageTokens;
    kv.head_dim = kHeadDim;
    kv.dtype = DType::kF16;
    return kv;
  }

  int64_t tokens() const { return tokens_; }

 private:
  int64_t tokens_;
  int64_t pages_;
  size_t bytes_;
  uint16_t* pool_ = nullptr;
  std::vector<int32_t> indptr_, indices_, last_;
};

// ---------------------------------------------------------------------------------------------
// Engine set-up.

std::unique_ptr<Engine> MakeEngine(int layers, uint64_t device_budget, uint64_t host_budget,
                                   int compute_threads, int copy_threads) {
  EngineOptions options;
  options.device_budget_bytes = device_budget;
  options.host_budget_bytes = host_budget;
  options.compute_threads = compute_threads;
  options.copy_threads = copy_threads;
  auto engine = Engine::Create(options);
  Check(engine.status(), "Engine::Create");
  ModelLayout layout;
  layout.num_layers = layers;
  layout.num_q_heads = kQHeads;
  layout.num_kv_heads = kKvHeads;
  layout.head_dim = kHeadDim;
  layout.dtype = DType::kF16;
  layout.page_tokens = kPageTokens;
  Check((*engine)->RegisterLayout("llama3-8b", layout), "RegisterLayout");
  return std::move(*engine);
}

SequenceId NewSequence(Engine& engine, Placement::Mode mode) {
  headwise::v1::PolicySpec spec;
  spec.mutable_placement()->set_mode(mode);
  auto seq = engine.CreateSequence("llama3-8b", spec);
  Check(seq.status(), "CreateSequence");
  return *seq;
}

// Appends tokens [0, tokens) to every layer in kChunk-token chunks; stores layer 0's into `raw`
// too when given. Returns the seconds it took.
double Fill(Engine& engine, const SequenceId& seq, int layers, int64_t tokens,
            const KvGenerator& gen, RawPool* raw) {
  std::vector<uint16_t> k, v;
  const auto start = SteadyClock::now();
  for (int64_t at = 0; at < tokens; at += kChunk) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, tokens - at));
    for (int l = 0; l < layers; ++l) {
      gen.Chunk(l, at, n, k, v);
      Check(engine.Append(seq, LayerId(l), Bytes(k), Bytes(v), n, DType::kF16), "Append");
      if (l == 0 && raw != nullptr) raw->Store(at, n, k, v);
    }
  }
  return Since(start);
}

// Device bytes for `tokens` of `layers` layers, with room for the extent spares and the page
// a decode step opens.
uint64_t DeviceBytesFor(int layers, int64_t tokens) {
  const int64_t kv = int64_t{layers} * tokens * kLayerTokenBytes;
  return static_cast<uint64_t>(kv + kv / 32 + (int64_t{64} << 20));
}

// ---------------------------------------------------------------------------------------------
// Part 1: device_only, one layer.

int RepsFor(double seconds_per_call, const Flags& flags) {
  const double want = flags.target_s / std::max(seconds_per_call, 1e-6);
  return static_cast<int>(std::clamp<double>(want, flags.min_reps, flags.max_reps));
}

struct RowResult {
  int reps = 0;
  double attend_s = 0, kernel_s = 0, step_s = 0;  // Medians.
  double paired = 0;        // Median over reps of (attend - kernel) / kernel of the same rep.
  double max_rel_diff = 0;  // Engine Attend output vs the raw kernel's.
};

double MaxRelDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double err = 0, scale = 1e-30;
  for (size_t i = 0; i < a.size(); ++i) {
    err = std::max(err, std::abs(double{a[i]} - b[i]));
    scale = std::max(scale, std::abs(double{b[i]}));
  }
  return err / scale;
}

// Attend, kernel and DecodeStep (+ untimed Truncate) interleaved, rep by rep.
RowResult MeasureRow(Engine& engine, const SequenceId& seq, const RawPool& raw, int threads,
                     const Flags& flags) {
  const std::vector<float> q = RandomQuery(0);
  std::vector<float> o(q.size()), lse(kQHeads), ko(q.size()), klse(kQHeads);
  std::vector<uint16_t> nk, nv;
  KvGenerator().Chunk(0, raw.tokens(), 1, nk, nv);
  kernels::DecodeArgs args;
  args.q = q.data();
  args.num_q_heads = kQHeads;
  args.o = ko.data();
  args.lse = klse.data();
  args.num_threads = threads;
  const kernels::PagedKvView view = raw.view();
  auto attend = [&] {
    Check(engine.Attend(seq, LayerId(0), q, absl::MakeSpan(o), absl::MakeSpan(lse)), "Attend");
  };
  auto kernel = [&] { Check(kernels::DecodeAttention(view, args), "DecodeAttention"); };
  auto step = [&] {
    Check(engine.DecodeStep(seq, LayerId(0), q, Bytes(nk), Bytes(nv), DType::kF16,
                            absl::MakeSpan(o), absl::MakeSpan(lse)),
          "DecodeStep");
  };
  auto timed = [](auto fn) {
    const auto start = SteadyClock::now();
    fn();
    return Since(start);
  };
  // Warm-up (first touch of staging buffers and OpenMP teams), which also sizes the reps.
  attend();
  const double warm = timed(kernel);
  step();
  Check(engine.Truncate(seq, raw.tokens()), "Truncate");
  RowResult r;
  r.reps = RepsFor(warm, flags);
  std::vector<double> ta, tk, ts, paired;
  for (int i = 0; i < r.reps; ++i) {
    ta.push_back(timed(attend));
    tk.push_back(timed(kernel));
    ts.push_back(timed(step));
    Check(engine.Truncate(seq, raw.tokens()), "Truncate");
    paired.push_back((ta.back() - tk.back()) / tk.back());
  }
  r.paired = Median(paired);
  r.attend_s = Median(ta);
  r.kernel_s = Median(tk);
  r.step_s = Median(ts);
  attend();
  kernel();
  r.max_rel_diff = std::max(MaxRelDiff(o, ko), MaxRelDiff(lse, klse));
  return r;
}

double Percent(double engine_s, double kernel_s) {
  return 100.0 * (engine_s - kernel_s) / kernel_s;
}

bool RunDeviceOnly(const Flags& flags) {
  std::printf("== 1. device_only, one layer: engine vs raw kernel (interleaved, medians) ==\n");
  std::printf("%9s %3s %5s %10s %10s %9s %9s %11s %9s %8s %12s\n", "tokens", "thr", "reps",
              "attend ms", "kernel ms", "att-kern", "paired", "decode ms", "dec-kern", "KV GB/s",
              "|o-o_kern|");
  std::fflush(stdout);
  const KvGenerator gen;
  bool pass = true;
  for (const int64_t tokens : flags.lengths) {
    RawPool raw(tokens);
    bool raw_filled = false;
    for (const int64_t threads : flags.threads) {
      // Host budget: the host tier is not used by device_only; the smallest that holds pages.
      auto engine = MakeEngine(1, DeviceBytesFor(1, tokens), uint64_t{64} << 20,
                               static_cast<int>(threads), flags.copy_threads);
      const SequenceId seq = NewSequence(*engine, Placement::DEVICE_ONLY);
      const double fill_s = Fill(*engine, seq, 1, tokens, gen, raw_filled ? nullptr : &raw);
      raw_filled = true;
      const RowResult r = MeasureRow(*engine, seq, raw, static_cast<int>(threads), flags);
      pass = pass && r.max_rel_diff <= 1e-6;
      std::printf(
          "%9lld %3lld %5d %10.3f %10.3f %+8.2f%% %+8.2f%% %11.3f %+8.2f%% %8.2f %12.2e   "
          "(fill %.1f s)\n",
          static_cast<long long>(tokens), static_cast<long long>(threads), r.reps, r.attend_s * 1e3,
          r.kernel_s * 1e3, Percent(r.attend_s, r.kernel_s), 100.0 * r.paired, r.step_s * 1e3,
          Percent(r.step_s, r.kernel_s), tokens * kLayerTokenBytes / r.kernel_s / 1e9,
          r.max_rel_diff, fill_s);
      std::fflush(stdout);
    }
  }
  return pass;
}

// ---------------------------------------------------------------------------------------------
// Part 2: layer_offload over several layers.

// One layer's DecodeStep, or a sum of them: time and the engine's copy counters over it.
struct Call {
  double seconds = 0, stall_ns = 0, overlapped_ns = 0, h2d_bytes = 0;
  void operator+=(const Call& c) {
    seconds += c.seconds;
    stall_ns += c.stall_ns;
    overlapped_ns += c.overlapped_ns;
    h2d_bytes += c.h2d_bytes;
  }
};

Call TimedDecodeStep(Engine& engine, const SequenceId& seq, int layer, const std::vector<float>& q,
                     const std::vector<uint16_t>& k, const std::vector<uint16_t>& v) {
  std::vector<float> o(q.size()), lse(kQHeads);
  const EngineStats before = engine.GetStats();
  const auto start = SteadyClock::now();
  Check(engine.DecodeStep(seq, LayerId(layer), q, Bytes(k), Bytes(v), DType::kF16,
                          absl::MakeSpan(o), absl::MakeSpan(lse)),
        "DecodeStep");
  Call c;
  c.seconds = Since(start);
  const EngineStats after = engine.GetStats();
  c.stall_ns = static_cast<double>(after.stall_ns - before.stall_ns);
  c.overlapped_ns = static_cast<double>(after.overlapped_ns - before.overlapped_ns);
  c.h2d_bytes = static_cast<double>(after.bytes_host_to_device - before.bytes_host_to_device);
  return c;
}

struct StepRun {
  std::vector<Call> steps;                // Per step, summed over its layers.
  std::vector<std::vector<Call>> layers;  // [layer][step].
};

// Full decode steps: DecodeStep on every layer (a step's time is the sum of its layers' calls;
// the counters are read between them, untimed). The sequence grows by one token a step, as in a
// real decode loop, unless `truncate`: then an untimed Truncate back to `tokens` follows each.
StepRun RunSteps(Engine& engine, const SequenceId& seq, int layers, int64_t tokens, int steps,
                 bool truncate) {
  std::vector<std::vector<float>> q;
  for (int l = 0; l < layers; ++l) q.push_back(RandomQuery(l));
  std::vector<uint16_t> nk, nv;
  KvGenerator().Chunk(0, tokens, 1, nk, nv);
  StepRun run;
  run.layers.resize(layers);
  for (int s = -1; s < steps; ++s) {  // Step -1 warms up and is not recorded.
    Call step;
    for (int l = 0; l < layers; ++l) {
      const Call c = TimedDecodeStep(engine, seq, l, q[l], nk, nv);
      step += c;
      if (s >= 0) run.layers[l].push_back(c);
    }
    if (truncate) Check(engine.Truncate(seq, tokens), "Truncate");
    if (s >= 0) run.steps.push_back(step);
  }
  return run;
}

template <typename Field>
double MedianOf(const std::vector<Call>& calls, Field field) {
  std::vector<double> v;
  for (const Call& c : calls) v.push_back(field(c));
  return Median(v);
}

double Share(const Call& c) {
  const double copy = c.stall_ns + c.overlapped_ns;
  return copy > 0 ? c.overlapped_ns / copy : 0.0;
}

void PrintStepRun(const char* name, const StepRun& r) {
  Call total;
  for (const Call& c : r.steps) total += c;
  const double n = static_cast<double>(r.steps.size());
  std::printf(
      "%-14s step median %8.2f ms; H2D %.1f MiB/step; stall %.2f ms/step, overlapped %.2f "
      "ms/step; overlap share %.1f%% overall, per-step median %.1f%%\n",
      name, MedianOf(r.steps, [](const Call& c) { return c.seconds; }) * 1e3,
      MiB(total.h2d_bytes / n), total.stall_ns / n / 1e6, total.overlapped_ns / n / 1e6,
      100.0 * Share(total), 100.0 * MedianOf(r.steps, Share));
  std::printf("%-14s per layer, median ms (of which copy stall):", "");
  for (size_t l = 0; l < r.layers.size(); ++l) {
    std::printf(" L%zu %.2f (%.2f)", l,
                MedianOf(r.layers[l], [](const Call& c) { return c.seconds; }) * 1e3,
                MedianOf(r.layers[l], [](const Call& c) { return c.stall_ns; }) / 1e6);
  }
  std::printf("\n");
}

// What the timings say, independent of the copy engine's own accounting: the device_only step is
// the same work without copies, so the difference is the copy time the step did not hide.
void PrintExposedCopy(const StepRun& device_only, const StepRun& offload) {
  auto secs = [](const Call& c) { return c.seconds; };
  const double compute = MedianOf(device_only.steps, secs);
  const double measured = MedianOf(offload.steps, secs);
  std::printf(
      "layer_offload - device_only = %.2f ms/step of copy not hidden (%.0f%% of the device_only "
      "step); the compute thread stalled %.2f ms/step (median) on copies\n",
      (measured - compute) * 1e3, 100.0 * (measured - compute) / compute,
      MedianOf(offload.steps, [](const Call& c) { return c.stall_ns; }) / 1e6);
}

void RunLayerOffload(const Flags& flags) {
  const int layers = flags.offload_layers;
  const int64_t tokens = flags.offload_tokens;
  const int64_t layer_bytes = tokens * kLayerTokenBytes;
  const uint64_t kv = static_cast<uint64_t>(layers * layer_bytes);
  const uint64_t device = DeviceBytesFor(flags.offload_device_layers, tokens);
  std::printf(
      "\n== 2. layer_offload: %d layers x %lld tokens (%.0f MiB of KV, %.0f MiB per layer), "
      "device budget %.0f MiB (%d layers + spares), compute_threads 1, copy_threads %d, "
      "%d steps (DecodeStep on every layer, %s) ==\n",
      layers, static_cast<long long>(tokens), MiB(kv), MiB(layer_bytes), MiB(device),
      flags.offload_device_layers, flags.copy_threads, flags.offload_steps,
      flags.offload_truncate ? "truncated back after each" : "growing a token a step");
  const KvGenerator gen;
  StepRun base;
  {
    auto engine = MakeEngine(layers, DeviceBytesFor(layers, tokens), uint64_t{64} << 20, 1,
                             flags.copy_threads);
    const SequenceId seq = NewSequence(*engine, Placement::DEVICE_ONLY);
    Fill(*engine, seq, layers, tokens, gen, nullptr);
    base = RunSteps(*engine, seq, layers, tokens, flags.offload_steps, flags.offload_truncate);
  }
  StepRun offload;
  {
    auto engine =
        MakeEngine(layers, device, kv + kv / 16 + (uint64_t{64} << 20), 1, flags.copy_threads);
    const SequenceId seq = NewSequence(*engine, Placement::LAYER_OFFLOAD);
    Fill(*engine, seq, layers, tokens, gen, nullptr);
    offload = RunSteps(*engine, seq, layers, tokens, flags.offload_steps, flags.offload_truncate);
  }
  PrintStepRun("device_only", base);
  PrintStepRun("layer_offload", offload);
  PrintExposedCopy(base, offload);
}

// ---------------------------------------------------------------------------------------------

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown";
}

std::string LoadAverage() {
  std::ifstream in("/proc/loadavg");
  std::string a, b, c;
  in >> a >> b >> c;
  return a + " " + b + " " + c;
}

// The target Highway's dynamic dispatch picks: the best one both compiled and supported (lower
// target bits are better).
const char* SimdTarget() {
  const int64_t targets = hwy::SupportedTargets() & HWY_TARGETS;
  return hwy::TargetName(targets & -targets);
}

[[noreturn]] void Usage(const std::string& why) {
  std::fprintf(stderr, "%s (usage at the top of bench/engine_step_bench.cc)\n", why.c_str());
  std::exit(2);
}

std::vector<int64_t> ParseList(const char* flag, const char* text) {
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    int64_t x = 0;
    if (!absl::SimpleAtoi(part, &x) || x < 1) {
      Usage(std::string(flag) + ": bad value '" + std::string(part) + "'");
    }
    out.push_back(x);
  }
  return out;
}

Flags ParseFlags(int argc, char** argv) {
  Flags f;
  const std::vector<std::pair<std::string, int*>> ints = {
      {"--min_reps", &f.min_reps},
      {"--max_reps", &f.max_reps},
      {"--offload_layers", &f.offload_layers},
      {"--offload_device_layers", &f.offload_device_layers},
      {"--offload_steps", &f.offload_steps},
      {"--copy_threads", &f.copy_threads}};
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const std::vector<std::pair<std::string, std::pair<bool*, bool>>> switches = {
        {"--no_offload", {&f.offload, false}},
        {"--no_device_only", {&f.device_only, false}},
        {"--offload_truncate", {&f.offload_truncate, true}}};
    auto sw = std::find_if(switches.begin(), switches.end(),
                           [&](const auto& e) { return e.first == arg; });
    if (sw != switches.end()) {
      *sw->second.first = sw->second.second;
      continue;
    }
    if (i + 1 >= argc) Usage(arg + " needs a value");
    const char* value = argv[++i];
    if (arg == "--target_s") {
      f.target_s = std::atof(value);
      continue;
    }
    const std::vector<int64_t> list = ParseList(arg.c_str(), value);
    auto it = std::find_if(ints.begin(), ints.end(), [&](const auto& e) { return e.first == arg; });
    if (it != ints.end()) {
      *it->second = static_cast<int>(list.front());
    } else if (arg == "--lengths" || arg == "--threads") {
      (arg == "--lengths" ? f.lengths : f.threads) = list;
    } else if (arg == "--offload_tokens") {
      f.offload_tokens = list.front();
    } else {
      Usage("unknown flag " + arg);
    }
  }
  for (const int64_t t : f.lengths) {
    if (t % kPageTokens != 0) Usage("--lengths: " + std::to_string(t) + " is not a multiple of 64");
  }
  if (f.offload_tokens % kPageTokens != 0 || f.max_reps < f.min_reps) {
    Usage("--offload_tokens must be a multiple of 64 and --max_reps >= --min_reps");
  }
  return f;
}

int Main(int argc, char** argv) {
  const Flags flags = ParseFlags(argc, argv);
  const std::time_t now = std::time(nullptr);
  char date[32];
  std::strftime(date, sizeof(date), "%Y-%m-%d %H:%M UTC", std::gmtime(&now));
  std::printf(
      "engine_step_bench: Llama-3-8B layer shape (%d query heads, %d KV heads, head_dim %d, f16, "
      "%d-token pages)\nmachine: %s, %d CPUs online, Highway target %s; %s; load average %s\n\n",
      kQHeads, kKvHeads, kHeadDim, kPageTokens, CpuModel().c_str(),
      static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN)), SimdTarget(), date, LoadAverage().c_str());
  bool pass = true;
  if (flags.device_only) pass = RunDeviceOnly(flags);
  if (flags.offload) RunLayerOffload(flags);
  std::printf("\nload average at the end %s\n%s\n", LoadAverage().c_str(),
              !flags.device_only ? "(part 1 skipped: outputs not compared)"
              : pass             ? "PASS (engine outputs equal the raw kernel's)"
                                 : "FAIL: engine outputs differ from the raw kernel's");
  return pass ? 0 : 1;
}

}  // namespace
}  // namespace headwise::bench

int main(int argc, char** argv) { return headwise::bench::Main(argc, argv); }
