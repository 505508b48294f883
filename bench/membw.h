// Memory read bandwidth baseline for benchmarks: a plain vectorized reduction.
#ifndef HEADWISE_BENCH_MEMBW_H_
#define HEADWISE_BENCH_MEMBW_H_

#include <cstddef>
#include <cstdint>

namespace headwise::bench {

// Sums `bytes` bytes (a multiple of 64) read as f32 with `threads` OpenMP threads, using the
// widest SIMD the CPU has. The result is meaningless; the time it takes is the machine's read
// bandwidth for this buffer.
float SumBytesAsF32(const std::byte* data, int64_t bytes, int threads);

// This core's peak f32 multiply-add rate, in multiply-adds per second: 16 independent chains of
// vector FMAs at the widest SIMD width, one thread. Attention does 2 * g * head_dim
// multiply-adds per cached token (QK and PV for g query heads), so this bounds how fast any
// f32-accumulating kernel can read KV from cache.
double PeakMultiplyAddsPerSecond();

// The same measured on `threads` OpenMP threads at once (each running the 16 chains), summed:
// the multiply-add peak of the cores a `threads`-thread kernel runs on.
double PeakMultiplyAddsOnThreads(int threads);

}  // namespace headwise::bench

#endif  // HEADWISE_BENCH_MEMBW_H_
