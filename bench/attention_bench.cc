// Decode attention over a paged KV cache, side by side with two baselines measured in the same
// run on the same buffer:
//   * bw_ratio: the kernel's KV read rate over this machine's memory read bandwidth, measured
//     as a plain vectorized reduction over the very same KV pool with the same thread count;
//   * vs_scalar: speed-up over a straightforward scalar implementation (one thread).
// PyTorch's CPU attention is measured by bench/torch_attention.py on the same shapes;
// scripts/bench_attention.sh runs both and prints the comparison.
//
// Shapes: one KV head (4 query heads) and one Llama-3-8B layer (8 KV heads, 32 query heads),
// head_dim 128, f16 and bf16, contexts 4K, 64K and 1M tokens, 1 and 2 threads.

#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <tuple>
#include <vector>

#include "bench/membw.h"
#include "benchmark/benchmark.h"
#include "cachesvc/base/dtype.h"
#include "kernels/attention.h"
#include "kernels/cpu/cpu_attention.h"

namespace headwise::bench {
namespace {

constexpr int kHeadDim = 128;
constexpr int kPageTokens = 64;

// A paged cache of `kv_heads` heads x `tokens` tokens. Pages of a head are spread over the
// pool in a shuffled order, as an engine that allocates extents over time would leave them.
struct PagedCache {
  PagedCache(DType dtype, int kv_heads, int64_t tokens) : dtype(dtype), kv_heads(kv_heads) {
    const int64_t pages_per_head = (tokens + kPageTokens - 1) / kPageTokens;
    const int64_t pages = pages_per_head * kv_heads;
    page_bytes = kernels::PageBytes(kPageTokens, kHeadDim, dtype);
    // A KV pool is a few large, long-lived allocations: back it with transparent huge pages,
    // as a production pool would, so the benchmark measures attention and not TLB misses.
    pool_bytes = pages * page_bytes;
    void* mem =
        mmap(nullptr, pool_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) std::abort();
    madvise(mem, pool_bytes, MADV_HUGEPAGE);
    pool.reset(static_cast<std::byte*>(mem));
    // Random values in a 64 MiB block, repeated: enough to defeat caches, cheap to make.
    const int64_t block_elems = std::min<int64_t>(pages * page_bytes / 2, int64_t{32} << 20);
    std::mt19937 rng(17);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (int64_t i = 0; i < block_elems; ++i) StoreFromFloat(pool.get(), dtype, i, normal(rng));
    const int64_t block_bytes = block_elems * 2;
    for (int64_t at = block_bytes; at < pages * page_bytes; at += block_bytes) {
      std::memcpy(pool.get() + at, pool.get(),
                  std::min<int64_t>(block_bytes, pages * page_bytes - at));
    }
    std::vector<int32_t> slots(pages);
    for (int64_t i = 0; i < pages; ++i) slots[i] = static_cast<int32_t>(i);
    // Shuffle within windows of 64 pages: scattered like real allocation, but not so random
    // that the benchmark measures TLB misses instead of attention.
    for (int64_t i = 0; i < pages; i += 64) {
      std::shuffle(slots.begin() + i, slots.begin() + std::min(pages, i + 64), rng);
    }
    indices = slots;
    indptr.push_back(0);
    for (int h = 0; h < kv_heads; ++h) {
      indptr.push_back(static_cast<int32_t>((h + 1) * pages_per_head));
      last_page_len.push_back(static_cast<int32_t>(tokens - (pages_per_head - 1) * kPageTokens));
    }
    kv_bytes = tokens * kv_heads * 2 * kHeadDim * static_cast<int64_t>(DTypeSize(dtype));
  }

  kernels::PagedKvView view() const {
    kernels::PagedKvView kv;
    kv.pool = pool.get();
    kv.indptr = indptr.data();
    kv.indices = indices.data();
    kv.last_page_len = last_page_len.data();
    kv.num_slots = static_cast<int64_t>(indices.size());
    kv.num_kv_heads = kv_heads;
    kv.page_tokens = kPageTokens;
    kv.head_dim = kHeadDim;
    kv.dtype = dtype;
    return kv;
  }

  DType dtype;
  int kv_heads;
  int64_t page_bytes = 0;
  int64_t kv_bytes = 0;
  struct Unmap {
    int64_t* bytes;
    void operator()(std::byte* p) const { munmap(p, *bytes); }
  };
  int64_t pool_bytes = 0;
  std::unique_ptr<std::byte, Unmap> pool{nullptr, Unmap{&pool_bytes}};
  std::vector<int32_t> indptr, indices, last_page_len;
};

// The scalar baseline: what one writes first. Two passes per query head, dtype conversion per
// element, no blocking, no SIMD, one thread.
void NaiveDecode(const kernels::PagedKvView& kv, const float* q, int num_q_heads, float* o) {
  const int group = num_q_heads / kv.num_kv_heads;
  const int d = kv.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t page_elems = int64_t{kv.page_tokens} * d;
  std::vector<float> scores;
  for (int qh = 0; qh < num_q_heads; ++qh) {
    const int h = qh / group;
    const int64_t n = kv.HeadTokens(h);
    scores.assign(n, 0.0f);
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; ++i) {
      const void* page = kv.pool + kv.indices[kv.indptr[h] + i / kv.page_tokens] * 2 * page_elems *
                                       static_cast<int64_t>(DTypeSize(kv.dtype));
      float dot = 0.0f;
      for (int c = 0; c < d; ++c) {
        dot += q[qh * d + c] * LoadAsFloat(page, kv.dtype, (i % kv.page_tokens) * d + c);
      }
      scores[i] = dot * scale;
      mx = std::max(mx, scores[i]);
    }
    float sum = 0.0f;
    for (int64_t i = 0; i < n; ++i) sum += scores[i] = std::exp(scores[i] - mx);
    for (int c = 0; c < d; ++c) o[qh * d + c] = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      const void* page = kv.pool + kv.indices[kv.indptr[h] + i / kv.page_tokens] * 2 * page_elems *
                                       static_cast<int64_t>(DTypeSize(kv.dtype));
      const float p = scores[i] / sum;
      for (int c = 0; c < d; ++c) {
        o[qh * d + c] += p * LoadAsFloat(page, kv.dtype, page_elems + (i % kv.page_tokens) * d + c);
      }
    }
  }
}

double Seconds(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

// Median of `reps` timings of fn().
template <typename Fn>
double MedianSeconds(int reps, Fn fn) {
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    t.push_back(Seconds(std::chrono::steady_clock::now() - start));
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// One cache per shape, kept while benchmarks of that shape run (1M tokens is 4 GiB).
PagedCache& CacheFor(DType dtype, int kv_heads, int64_t tokens) {
  static std::unique_ptr<PagedCache> cache;
  if (!cache || cache->dtype != dtype || cache->kv_heads != kv_heads ||
      cache->indptr.back() != (tokens + kPageTokens - 1) / kPageTokens * kv_heads) {
    cache.reset();  // Free the old one first: two 1M-token layers need not fit together.
    cache = std::make_unique<PagedCache>(dtype, kv_heads, tokens);
  }
  return *cache;
}

// Scalar time per shape, measured once and shared by the thread-count variants.
double NaiveSeconds(const PagedCache& cache, const std::vector<float>& q, int num_q_heads) {
  static std::map<std::tuple<int, int, int64_t>, double> memo;
  const auto key = std::make_tuple(static_cast<int>(cache.dtype), cache.kv_heads, cache.kv_bytes);
  if (auto it = memo.find(key); it != memo.end()) return it->second;
  std::vector<float> o(q.size());
  const double s =
      MedianSeconds(1, [&] { NaiveDecode(cache.view(), q.data(), num_q_heads, o.data()); });
  memo[key] = s;
  return s;
}

void BM_DecodeAttention(benchmark::State& state) {
  const DType dtype = static_cast<DType>(state.range(0));
  const int kv_heads = static_cast<int>(state.range(1));
  const int64_t tokens = state.range(2);
  const int threads = static_cast<int>(state.range(3));
  const int num_q_heads = kv_heads * 4;
  PagedCache& cache = CacheFor(dtype, kv_heads, tokens);
  std::vector<float> q(num_q_heads * kHeadDim);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& x : q) x = normal(rng);
  std::vector<float> o(q.size()), lse(num_q_heads);

  kernels::DecodeArgs args;
  args.q = q.data();
  args.num_q_heads = num_q_heads;
  args.o = o.data();
  args.lse = lse.data();
  args.num_threads = threads;
  for (auto _ : state) {
    if (!kernels::DecodeAttention(cache.view(), args).ok()) {
      state.SkipWithError("DecodeAttention failed");
      break;
    }
    benchmark::DoNotOptimize(o.data());
  }
  // Medians for the ratios: the kernel and its baselines timed back to back, same pool,
  // same thread count. on the same pool, same thread count.
  const double reduce_s = MedianSeconds(3, [&] {
    benchmark::DoNotOptimize(SumBytesAsF32(cache.pool.get(), cache.kv_bytes, threads));
  });
  const double attend_s =
      MedianSeconds(3, [&] { (void)kernels::DecodeAttention(cache.view(), args); });
  const double naive_s = NaiveSeconds(cache, q, num_q_heads);
  state.counters["KV_GBps"] = cache.kv_bytes / attend_s / 1e9;
  state.counters["membw_GBps"] = cache.kv_bytes / reduce_s / 1e9;
  state.counters["bw_ratio"] = reduce_s / attend_s;
  state.counters["vs_scalar"] = naive_s / attend_s;
  state.counters["KV_MiB"] = cache.kv_bytes / 1048576.0;
  // The compute ceiling: the KV read rate at which this core's peak multiply-add rate is used up
  // (2 * g * head_dim multiply-adds per token of K and V), per thread, times threads.
  static const double peak_madds = PeakMultiplyAddsPerSecond();
  const double token_bytes = 2.0 * kHeadDim * static_cast<double>(DTypeSize(dtype));
  state.counters["fma_bound_GBps"] =
      peak_madds / (2.0 * (num_q_heads / kv_heads) * kHeadDim) * token_bytes * threads / 1e9;
  state.SetBytesProcessed(state.iterations() * cache.kv_bytes);
}

void Shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"dtype", "kv_heads", "tokens", "threads"});
  for (int64_t tokens : {int64_t{4096}, int64_t{65536}, int64_t{1} << 20}) {
    for (int kv_heads : {1, 8}) {
      for (DType dtype : {DType::kF16, DType::kBF16}) {
        for (int threads : {1, 2}) {
          b->Args({static_cast<int64_t>(dtype), kv_heads, tokens, threads});
        }
      }
    }
  }
}

BENCHMARK(BM_DecodeAttention)
    ->Apply(Shapes)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.3);

// Causal prefill of T new tokens over `cached` tokens per head (0: an empty cache), one Llama-3-8B
// layer (32 query / 8 KV heads, head_dim 128, f16 K/V), as in issue 16. kernel 0: PrefillAttention
// (the blocked kernel); kernel 1: the previous row-blocked kernel (cpu::PrefillRowwise), in the
// same run. GFLOPs counts the useful FLOPs, 2 * T^2 * head_dim * Hq; peak_ratio divides by
// the measured multiply-add peak (2 FLOPs each) times threads.
void BM_Prefill(benchmark::State& state) {
  const bool rowwise = state.range(0) == 1;
  const int t_new = static_cast<int>(state.range(1));
  const int threads = static_cast<int>(state.range(2));
  const int64_t cached = state.range(3);
  constexpr int kKvHeads = 8, kQHeads = 32;
  const DType dtype = DType::kF16;
  std::mt19937 rng(9);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> q(int64_t{t_new} * kQHeads * kHeadDim);
  for (float& x : q) x = normal(rng);
  std::vector<std::byte> k_new(int64_t{t_new} * kKvHeads * kHeadDim * DTypeSize(dtype));
  std::vector<std::byte> v_new(k_new.size());
  for (int64_t i = 0; i < int64_t{t_new} * kKvHeads * kHeadDim; ++i) {
    StoreFromFloat(k_new.data(), dtype, i, normal(rng));
    StoreFromFloat(v_new.data(), dtype, i, normal(rng));
  }
  std::vector<float> o(q.size());
  const std::vector<int32_t> indptr(kKvHeads + 1, 0), last(kKvHeads, 1);
  kernels::PagedKvView kv;
  if (cached > 0) {
    kv = CacheFor(dtype, kKvHeads, cached).view();
  } else {
    kv.indptr = indptr.data();
    kv.last_page_len = last.data();
    kv.num_kv_heads = kKvHeads;
    kv.page_tokens = kPageTokens;
    kv.head_dim = kHeadDim;
    kv.dtype = dtype;
  }
  kernels::PrefillArgs args;
  args.num_tokens = t_new;
  args.q = q.data();
  args.k_new = k_new.data();
  args.v_new = v_new.data();
  args.num_q_heads = kQHeads;
  args.o = o.data();
  args.num_threads = threads;
  for (auto _ : state) {
    if (rowwise) {
      kernels::cpu::PrefillRowwise(kv, args);
    } else if (!kernels::PrefillAttention(kv, args).ok()) {
      state.SkipWithError("PrefillAttention failed");
      break;
    }
    benchmark::DoNotOptimize(o.data());
  }
  // Causal chunk plus the cached tokens every new token sees (QK and PV).
  const double flops = (2.0 * t_new * t_new + 4.0 * t_new * cached) * kHeadDim * kQHeads;
  static const double peak_madds = PeakMultiplyAddsPerSecond();
  state.counters["GFLOPs"] =
      benchmark::Counter(flops / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_GFLOPs"] = 2.0 * peak_madds * threads / 1e9;
}

BENCHMARK(BM_Prefill)
    ->ArgNames({"rowwise", "T", "threads", "cached"})
    ->ArgsProduct({{0, 1}, {1024, 2048}, {1, 2}, {0}})
    ->ArgsProduct({{0}, {4096}, {1, 2}, {0}})  // The previous kernel takes seconds here.
    // Short chunks over a long cache (chunked prefill, speculative verification).
    ->ArgsProduct({{0, 1}, {1, 4, 16, 64}, {2}, {8192}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.5);

}  // namespace
}  // namespace headwise::bench

BENCHMARK_MAIN();
