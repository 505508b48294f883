// Per-target helpers shared by the CPU attention inner loops (attend_rows.cc for float pages,
// attend_quant_rows.cc for KIVI pages): f32 widening loads, an 8-way lane reduction and the
// online-softmax row update. Highway "-inl" header: included once per SIMD target after
// hwy/highway.h by a file that re-includes itself through foreach_target.h.

// Per-target include guard (Highway's convention for -inl headers).
#if defined(HEADWISE_KERNELS_CPU_ATTEND_COMMON_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef HEADWISE_KERNELS_CPU_ATTEND_COMMON_INL_H_
#undef HEADWISE_KERNELS_CPU_ATTEND_COMMON_INL_H_
#else
#define HEADWISE_KERNELS_CPU_ATTEND_COMMON_INL_H_
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

// Loops over the B rows of a block and the U unrolled tokens or channels have compile-time trip
// counts; they must be fully unrolled, or GCC keeps the accumulator arrays on the stack.
#ifndef HEADWISE_UNROLL
#define HEADWISE_UNROLL _Pragma("GCC unroll 16")
#endif

HWY_BEFORE_NAMESPACE();
namespace headwise::kernels::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

constexpr int kMaxBlockRows = 8;
// Independent accumulators the QK and PV loops keep in registers: 16 with the 32 vector
// registers of AVX-512, 8 with 16 registers.
#if HWY_TARGET <= HWY_AVX3
constexpr int kMaxAccumulators = 2 * kMaxBlockRows;
#else
constexpr int kMaxAccumulators = kMaxBlockRows;
#endif

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <class DF, typename T>
HWY_INLINE hn::Vec<DF> LoadAsF32(DF df, const T* HWY_RESTRICT p) {
  if constexpr (std::is_same_v<T, float>) {
    return hn::LoadU(df, p);
  } else {
    const hn::Rebind<T, DF> dt;
    return hn::PromoteTo(df, hn::LoadU(dt, p));
  }
}

// out[i] = sum of the lanes of v[i] for 8 vectors. On 16-lane targets the eight reductions share
// one shuffle tree (about a third of the instructions of eight separate reductions), which
// matters because QK scoring does one reduction per (token, query row).
template <class DF>
HWY_INLINE void SumOfLanes8(DF df, const hn::Vec<DF> (&v)[8], float* HWY_RESTRICT out) {
#if HWY_TARGET <= HWY_AVX3
  if constexpr (hn::MaxLanes(DF()) == 16) {
    // 512 -> 2 x 256: x_k = [v_2k | v_2k+1], each half a partial sum.
    hn::Vec<DF> x[4];
    HEADWISE_UNROLL
    for (int k = 0; k < 4; ++k) {
      x[k] = hn::Add(hn::ConcatLowerLower(df, v[2 * k + 1], v[2 * k]),
                     hn::ConcatUpperUpper(df, v[2 * k + 1], v[2 * k]));
    }
    // 256 -> 128: y0 blocks = [v0, v2, v1, v3], y1 blocks = [v4, v6, v5, v7].
    auto blocks = [](hn::Vec<DF> a, hn::Vec<DF> b) {
      return hn::Add(hn::OddEvenBlocks(hn::SwapAdjacentBlocks(b), a),
                     hn::OddEvenBlocks(b, hn::SwapAdjacentBlocks(a)));
    };
    const auto y0 = blocks(x[0], x[1]);
    const auto y1 = blocks(x[2], x[3]);
    // 128 -> lanes: in block k, lane 0 sums y0's block k and lane 1 sums y1's block k.
    const auto z = hn::Add(hn::InterleaveLower(df, y0, y1), hn::InterleaveUpper(df, y0, y1));
    const auto w = hn::Add(z, hn::Shuffle1032(z));
    HWY_ALIGN float lanes[16];
    hn::Store(w, df, lanes);
    out[0] = lanes[0];
    out[2] = lanes[4];
    out[1] = lanes[8];
    out[3] = lanes[12];
    out[4] = lanes[1];
    out[6] = lanes[5];
    out[5] = lanes[9];
    out[7] = lanes[13];
    return;
  }
#endif
  HEADWISE_UNROLL
  for (int i = 0; i < 8; ++i) out[i] = hn::GetLane(hn::SumOfLanes(df, v[i]));
}

// Online-softmax update of one row: turns its scores s[0, n) into probabilities relative to
// the new running max (tokens at or past `visible` get 0), rescales the row's output and
// denominator. Returns false when the row sees no token.
template <class DF>
HWY_INLINE bool SoftmaxRow(DF df, int head_dim, float* HWY_RESTRICT s, int n, int visible, float* m,
                           float* l, float* HWY_RESTRICT o) {
  if (visible <= 0) {
    std::fill(s, s + n, 0.0f);
    return false;
  }
  const int lanes = static_cast<int>(hn::Lanes(df));
  // A vector max: a scalar max chain over a page costs more than the page's FMAs.
  auto vblock_max = hn::Set(df, kNegInf);
  int t = 0;
  for (; t + lanes <= visible; t += lanes) vblock_max = hn::Max(vblock_max, hn::LoadU(df, s + t));
  float block_max = hn::GetLane(hn::MaxOfLanes(df, vblock_max));
  for (; t < visible; ++t) block_max = std::max(block_max, s[t]);
  const float new_max = std::max(*m, block_max);
  if (new_max == kNegInf) {  // Every visible logit is -inf (bias): nothing to add.
    std::fill(s, s + n, 0.0f);
    return false;
  }
  const auto vmax = hn::Set(df, new_max);
  auto vsum = hn::Zero(df);
  t = 0;
  for (; t + lanes <= visible; t += lanes) {
    const auto e = hn::Exp(df, hn::Sub(hn::LoadU(df, s + t), vmax));
    vsum = hn::Add(vsum, e);
    hn::StoreU(e, df, s + t);
  }
  float sum = hn::GetLane(hn::SumOfLanes(df, vsum));
  for (; t < visible; ++t) {
    s[t] = std::exp(s[t] - new_max);
    sum += s[t];
  }
  std::fill(s + visible, s + n, 0.0f);
  const float alpha = *m == kNegInf ? 0.0f : std::exp(*m - new_max);
  if (alpha != 1.0f) {
    const auto va = hn::Set(df, alpha);
    for (int c = 0; c < head_dim; c += lanes) {
      hn::StoreU(hn::Mul(hn::LoadU(df, o + c), va), df, o + c);
    }
  }
  *l = *l * alpha + sum;
  *m = new_max;
  return true;
}

// s[j * n + t0 + u] = sum of the lanes of acc[j][u] + row_offset[j] + bias[t0 + u] (either may
// be null) for the B rows and U tokens of a scoring step.
template <int B, int U, class DF>
HWY_INLINE void ReduceScores(DF df, const hn::Vec<DF> (&acc)[B][U], int t0, int n,
                             const float* row_offset, const float* bias, float* HWY_RESTRICT s) {
  float sums[B * U];
  if constexpr (B * U % 8 == 0) {
    HEADWISE_UNROLL
    for (int base = 0; base < B * U; base += 8) {
      hn::Vec<DF> flat[8];
      HEADWISE_UNROLL
      for (int i = 0; i < 8; ++i) flat[i] = acc[(base + i) / U][(base + i) % U];
      SumOfLanes8(df, flat, sums + base);
    }
  } else {
    HEADWISE_UNROLL
    for (int j = 0; j < B; ++j) {
      HEADWISE_UNROLL
      for (int u = 0; u < U; ++u) sums[j * U + u] = hn::GetLane(hn::SumOfLanes(df, acc[j][u]));
    }
  }
  HEADWISE_UNROLL
  for (int u = 0; u < U; ++u) {
    const float b = bias != nullptr ? bias[t0 + u] : 0.0f;
    HEADWISE_UNROLL
    for (int j = 0; j < B; ++j) {
      s[j * n + t0 + u] = sums[j * U + u] + b + (row_offset != nullptr ? row_offset[j] : 0.0f);
    }
  }
}

// Scores U tokens starting at t0 for the B rows: s[j * n + t] = q_j . k_t + row_offset[j] +
// bias[t], where load(t, c) returns the f32 lanes of key channels c.. of token t (converted or
// dequantized in registers). row_offset and bias may be null.
template <int B, int U, class DF, class LoadK>
HWY_INLINE void ScoreTokenGroup(DF df, int head_dim, const float* HWY_RESTRICT q, LoadK load,
                                int t0, int n, const float* row_offset, const float* bias,
                                float* HWY_RESTRICT s) {
  const int lanes = static_cast<int>(hn::Lanes(df));
  hn::Vec<DF> acc[B][U];
  HEADWISE_UNROLL
  for (int j = 0; j < B; ++j) {
    HEADWISE_UNROLL
    for (int u = 0; u < U; ++u) acc[j][u] = hn::Zero(df);
  }
  for (int c = 0; c < head_dim; c += lanes) {
    hn::Vec<DF> kv[U];
    HEADWISE_UNROLL
    for (int u = 0; u < U; ++u) kv[u] = load(t0 + u, c);
    HEADWISE_UNROLL
    for (int j = 0; j < B; ++j) {
      const auto qv = hn::LoadU(df, q + j * head_dim + c);
      HEADWISE_UNROLL
      for (int u = 0; u < U; ++u) acc[j][u] = hn::MulAdd(qv, kv[u], acc[j][u]);
    }
  }
  ReduceScores<B, U>(df, acc, t0, n, row_offset, bias, s);
}

// ScoreTokenGroup over tokens [t_begin, t_end) of the n, U tokens at a time so that B * U
// accumulators run in parallel, spreading the prefetch of `prefetch_bytes` at `prefetch` (the
// next page, to L2) evenly over the tokens.
template <int B, int U, class DF, class LoadK>
HWY_INLINE void ScoreTokens(DF df, int head_dim, const float* HWY_RESTRICT q, LoadK load,
                            int t_begin, int t_end, int n, const float* row_offset,
                            const float* bias, const std::byte* prefetch, int64_t prefetch_bytes,
                            float* HWY_RESTRICT s) {
  constexpr int64_t kLine = 64;
  const int steps = std::max(1, (t_end - t_begin) / U);
  const int64_t lines = prefetch != nullptr ? prefetch_bytes / kLine : 0;
  const int64_t lines_per_step = (lines + steps - 1) / steps;
  int64_t next_line = 0;
  int t = t_begin;
  for (; t + U <= t_end; t += U) {
    for (int64_t i = 0; i < lines_per_step && next_line < lines; ++i, ++next_line) {
      __builtin_prefetch(prefetch + next_line * kLine, 0, 2);
    }
    ScoreTokenGroup<B, U>(df, head_dim, q, load, t, n, row_offset, bias, s);
  }
  for (; t < t_end; ++t) ScoreTokenGroup<B, 1>(df, head_dim, q, load, t, n, row_offset, bias, s);
}

// o_j += sum_t w[j * n + t] * v_t for the B rows, U channel vectors at a time, where load(t, c)
// returns value channels c.. of token t and weights(c) the weights w of the U * Lanes channels
// from c (one array for all of them).
template <int B, int U, class DF, class Weights, class LoadV>
HWY_INLINE void AccumulateValues(DF df, int head_dim, Weights weights, int n, LoadV load,
                                 float* HWY_RESTRICT o) {
  const int lanes = static_cast<int>(hn::Lanes(df));
  for (int c = 0; c < head_dim; c += U * lanes) {
    const float* HWY_RESTRICT p = weights(c);
    hn::Vec<DF> acc[B][U];
    HEADWISE_UNROLL
    for (int j = 0; j < B; ++j) {
      HEADWISE_UNROLL
      for (int u = 0; u < U; ++u) acc[j][u] = hn::LoadU(df, o + j * head_dim + c + u * lanes);
    }
    for (int t = 0; t < n; ++t) {
      hn::Vec<DF> vv[U];
      HEADWISE_UNROLL
      for (int u = 0; u < U; ++u) vv[u] = load(t, c + u * lanes);
      HEADWISE_UNROLL
      for (int j = 0; j < B; ++j) {
        const auto pj = hn::Set(df, p[j * n + t]);
        HEADWISE_UNROLL
        for (int u = 0; u < U; ++u) acc[j][u] = hn::MulAdd(pj, vv[u], acc[j][u]);
      }
    }
    HEADWISE_UNROLL
    for (int j = 0; j < B; ++j) {
      HEADWISE_UNROLL
      for (int u = 0; u < U; ++u) hn::StoreU(acc[j][u], df, o + j * head_dim + c + u * lanes);
    }
  }
}

// The online-softmax step of a block of B rows (rows row0.. of `rows`) over scores s[j * n + t]:
// writes logits (if not null, [t * rows + r], -inf past a row's visible limit), turns s into
// probabilities and rescales m, l, o. Returns false when no row sees a token.
template <int B, class DF>
HWY_INLINE bool SoftmaxBlock(DF df, int head_dim, float* HWY_RESTRICT s, int n,
                             const int32_t* visible, int row0, int rows, float* m, float* l,
                             float* o, float* logits) {
  bool any = false;
  HEADWISE_UNROLL
  for (int j = 0; j < B; ++j) {
    const int r = row0 + j;
    const int vis = visible != nullptr ? std::min(n, visible[r]) : n;
    if (logits != nullptr) {
      for (int t = 0; t < n; ++t) logits[int64_t{t} * rows + r] = t < vis ? s[j * n + t] : kNegInf;
    }
    any |= SoftmaxRow(df, head_dim, s + j * n, n, vis, m + j, l + j, o + j * head_dim);
  }
  return any;
}

// Calls fn(std::integral_constant<int, B>(), r) for blocks of B = 8, 4, 2, 1 rows covering
// rows [0, rows), r being each block's first row.
template <class Fn>
HWY_INLINE void ForEachRowBlock(int rows, Fn fn) {
  int r = 0;
  while (rows - r >= 8) {
    fn(std::integral_constant<int, 8>(), r);
    r += 8;
  }
  if (rows - r >= 4) {
    fn(std::integral_constant<int, 4>(), r);
    r += 4;
  }
  if (rows - r >= 2) {
    fn(std::integral_constant<int, 2>(), r);
    r += 2;
  }
  if (rows - r >= 1) fn(std::integral_constant<int, 1>(), r);
}

}  // namespace HWY_NAMESPACE
}  // namespace headwise::kernels::cpu
HWY_AFTER_NAMESPACE();

#endif  // HEADWISE_KERNELS_CPU_ATTEND_COMMON_INL_H_
