#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "membw.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// Must come after foreach_target.h.
#include "hwy/highway.h"

#ifndef HEADWISE_BENCH_MEMBW_ONCE_
#define HEADWISE_BENCH_MEMBW_ONCE_
#include <omp.h>

#include <chrono>

#include "bench/membw.h"
#endif

HWY_BEFORE_NAMESPACE();
namespace headwise::bench {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

float SumF32(const float* data, int64_t n) {
  const hn::ScalableTag<float> df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  // Four independent accumulators so the adds never wait on each other.
  auto a0 = hn::Zero(df), a1 = hn::Zero(df), a2 = hn::Zero(df), a3 = hn::Zero(df);
  int64_t i = 0;
  for (; i + 4 * lanes <= n; i += 4 * lanes) {
    a0 = hn::Add(a0, hn::LoadU(df, data + i));
    a1 = hn::Add(a1, hn::LoadU(df, data + i + lanes));
    a2 = hn::Add(a2, hn::LoadU(df, data + i + 2 * lanes));
    a3 = hn::Add(a3, hn::LoadU(df, data + i + 3 * lanes));
  }
  float sum = hn::GetLane(hn::SumOfLanes(df, hn::Add(hn::Add(a0, a1), hn::Add(a2, a3))));
  for (; i < n; ++i) sum += data[i];
  return sum;
}

double PeakMadds() {
  const hn::ScalableTag<float> df;
  constexpr int kChains = 16;
  constexpr int64_t kIters = 20'000'000;
  hn::Vec<decltype(df)> acc[kChains];
  for (auto& a : acc) a = hn::Set(df, 0.999f);
  const auto b = hn::Set(df, 0.9999f), c = hn::Set(df, 1e-4f);
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < kIters; ++i) {
    // Fully unrolled, so the chains live in registers.
#pragma GCC unroll 16
    for (int j = 0; j < kChains; ++j) acc[j] = hn::MulAdd(acc[j], b, c);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  auto sum = acc[0];
  for (int j = 1; j < kChains; ++j) sum = hn::Add(sum, acc[j]);
  volatile float sink = hn::GetLane(sum);
  (void)sink;
  return static_cast<double>(kIters) * kChains * hn::Lanes(df) / seconds;
}

}  // namespace HWY_NAMESPACE
}  // namespace headwise::bench
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace headwise::bench {

HWY_EXPORT(SumF32);
HWY_EXPORT(PeakMadds);

double PeakMultiplyAddsPerSecond() { return HWY_DYNAMIC_DISPATCH(PeakMadds)(); }

double PeakMultiplyAddsOnThreads(int threads) {
  double total = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  total += HWY_DYNAMIC_DISPATCH(PeakMadds)();
  return total;
}

float SumBytesAsF32(const std::byte* data, int64_t bytes, int threads) {
  const float* f = reinterpret_cast<const float*>(data);
  const int64_t n = bytes / 4;
  float total = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t begin = n * t / nt / 16 * 16, end = t + 1 == nt ? n : n * (t + 1) / nt / 16 * 16;
    total += HWY_DYNAMIC_DISPATCH(SumF32)(f + begin, end - begin);
  }
  return total;
}

}  // namespace headwise::bench
#endif  // HWY_ONCE
