// The CPU attention inner loop: folds a run of K/V token rows into the online-softmax state of
// a block of query rows. Compiled once per SIMD target by Highway; the best target the CPU
// supports is chosen at run time.
//
// Why the blocking looks the way it does: one K/V row is shared by every query row of its GQA
// group, so query rows are processed in blocks of up to 8 and each K/V element is converted
// from its storage dtype once per block. The number of independent FMA chains is kept at 8
// (rows x unrolled tokens for QK, rows x unrolled channels for PV) so that FMA latency, not
// the memory system, is never the limit.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "attend_rows.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// Must come after foreach_target.h.
#include "hwy/cache_control.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

#ifndef HEADWISE_KERNELS_CPU_ATTEND_ROWS_ONCE_
#define HEADWISE_KERNELS_CPU_ATTEND_ROWS_ONCE_
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "cpu_attention.h"
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

// Loops over the B rows of a block and the U unrolled tokens or channels have compile-time trip
// counts; they must be fully unrolled, or GCC keeps the accumulator arrays on the stack.
#define HEADWISE_UNROLL _Pragma("GCC unroll 16")
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

// Scores U tokens starting at t0 for the B rows: s[j * n + t] = q_j . k_t + bias_t.
template <int B, int U, class DF, typename T>
HWY_INLINE void ScoreTokenGroup(DF df, int head_dim, const float* HWY_RESTRICT q, const T* k,
                                int64_t stride, int t0, int n, const float* bias,
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
    for (int u = 0; u < U; ++u) kv[u] = LoadAsF32(df, k + (t0 + u) * stride + c);
    HEADWISE_UNROLL
    for (int j = 0; j < B; ++j) {
      const auto qv = hn::LoadU(df, q + j * head_dim + c);
      HEADWISE_UNROLL
      for (int u = 0; u < U; ++u) acc[j][u] = hn::MulAdd(qv, kv[u], acc[j][u]);
    }
  }
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
    for (int j = 0; j < B; ++j) s[j * n + t0 + u] = sums[j * U + u] + b;
  }
}

// s[j * n + t] = q_j . k_t + bias_t for the B rows of the block and the n tokens.
// U tokens are scored together so that B * U accumulators run in parallel.
template <int B, int U, class DF, typename T>
HWY_INLINE void ScoreTokens(DF df, int head_dim, const float* HWY_RESTRICT q, const T* k,
                            int64_t stride, int n, const float* bias, const std::byte* prefetch,
                            int64_t prefetch_bytes, float* HWY_RESTRICT s) {
  // Spread the prefetch of the next page evenly over this page's tokens.
  constexpr int64_t kLine = 64;
  const int64_t lines = prefetch != nullptr ? prefetch_bytes / kLine : 0;
  const int64_t lines_per_group = (lines + (n / U) - 1) / std::max(1, n / U);
  int64_t next_line = 0;
  int t = 0;
  for (; t + U <= n; t += U) {
    for (int64_t i = 0; i < lines_per_group && next_line < lines; ++i, ++next_line) {
      __builtin_prefetch(prefetch + next_line * kLine, 0, 2);  // To L2.
    }
    ScoreTokenGroup<B, U>(df, head_dim, q, k, stride, t, n, bias, s);
  }
  for (; t < n; ++t) ScoreTokenGroup<B, 1>(df, head_dim, q, k, stride, t, n, bias, s);
}

// o_j += sum_t p[j * n + t] * v_t for the B rows; U channel vectors are accumulated together.
template <int B, int U, class DF, typename T>
HWY_INLINE void AccumulateValues(DF df, int head_dim, const float* HWY_RESTRICT p, int n,
                                 const T* v, int64_t stride, float* HWY_RESTRICT o) {
  const int lanes = static_cast<int>(hn::Lanes(df));
  for (int c = 0; c < head_dim; c += U * lanes) {
    hn::Vec<DF> acc[B][U];
    HEADWISE_UNROLL
    for (int j = 0; j < B; ++j) {
      HEADWISE_UNROLL
      for (int u = 0; u < U; ++u) acc[j][u] = hn::LoadU(df, o + j * head_dim + c + u * lanes);
    }
    for (int t = 0; t < n; ++t) {
      const T* vt = v + t * stride + c;
      hn::Vec<DF> vv[U];
      HEADWISE_UNROLL
      for (int u = 0; u < U; ++u) vv[u] = LoadAsF32(df, vt + u * lanes);
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

template <int B, class DF, typename T>
void AttendBlock(DF df, int head_dim, const float* q, const int32_t* visible,
                 const TokenRows& tokens, int row0, int rows, float* m, float* l, float* o,
                 float* logits, float* s) {
  const T* k = static_cast<const T*>(tokens.k);
  const T* v = static_cast<const T*>(tokens.v);
  const int n = tokens.num_tokens;
  const int64_t stride = tokens.row_stride;
  const int chunks = head_dim / static_cast<int>(hn::Lanes(df));
  // Only the first row block prefetches; later blocks find the next page already in flight.
  const bool first_block = row0 == 0;
  // At most 8 tokens at once: U key vectors and B * U accumulators must fit the registers.
  ScoreTokens<B, std::clamp(kMaxAccumulators / B, 1, 8)>(df, head_dim, q, k, stride, n, tokens.bias,
                                                         first_block ? tokens.prefetch : nullptr,
                                                         tokens.prefetch_bytes, s);

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
  if (!any) return;
  // Unroll channels as far as head_dim allows. With 32 vector registers (AVX-512) PV keeps up to
  // 16 accumulators (B rows x U channel vectors), so each broadcast probability feeds more FMAs;
  // with 16 registers, 8.
  constexpr int kMaxU = std::max(1, kMaxAccumulators / B);
  if (kMaxU >= 4 && chunks % 4 == 0) {
    AccumulateValues<B, std::min(kMaxU, 4)>(df, head_dim, s, n, v, stride, o);
  } else if (kMaxU >= 2 && chunks % 2 == 0) {
    AccumulateValues<B, std::min(kMaxU, 2)>(df, head_dim, s, n, v, stride, o);
  } else {
    AccumulateValues<B, 1>(df, head_dim, s, n, v, stride, o);
  }
}

template <class DF, typename T>
void AttendRowsTyped(DF df, int head_dim, int rows, const float* q, const int32_t* visible,
                     const TokenRows& tokens, RowState state, float* logits, float* scratch) {
  int r = 0;
  auto run = [&](auto block) {
    constexpr int B = decltype(block)::value;
    AttendBlock<B, DF, T>(df, head_dim, q + int64_t{r} * head_dim, visible, tokens, r, rows,
                          state.m + r, state.l + r, state.o + int64_t{r} * head_dim, logits,
                          scratch);
    r += B;
  };
  while (rows - r >= 8) run(std::integral_constant<int, 8>());
  if (rows - r >= 4) run(std::integral_constant<int, 4>());
  if (rows - r >= 2) run(std::integral_constant<int, 2>());
  if (rows - r >= 1) run(std::integral_constant<int, 1>());
}

template <class DF>
void AttendRowsForTag(DF df, DType dtype, int head_dim, int rows, const float* q,
                      const int32_t* visible, const TokenRows& tokens, RowState state,
                      float* logits, float* scratch) {
  switch (dtype) {
    case DType::kF32:
      return AttendRowsTyped<DF, float>(df, head_dim, rows, q, visible, tokens, state, logits,
                                        scratch);
    case DType::kF16:
      return AttendRowsTyped<DF, hwy::float16_t>(df, head_dim, rows, q, visible, tokens, state,
                                                 logits, scratch);
    case DType::kBF16:
      return AttendRowsTyped<DF, hwy::bfloat16_t>(df, head_dim, rows, q, visible, tokens, state,
                                                  logits, scratch);
  }
}

void AttendRowsImpl(DType dtype, int head_dim, int rows, const float* q, const int32_t* visible,
                    const TokenRows& tokens, RowState state, float* logits, float* scratch) {
  // Every supported head_dim is a multiple of 8; all but 8 are multiples of 16, which the
  // widest vectors (16 f32 lanes) need.
  if (head_dim % 16 == 0) {
    const hn::CappedTag<float, 16> df;
    AttendRowsForTag(df, dtype, head_dim, rows, q, visible, tokens, state, logits, scratch);
  } else {
    const hn::CappedTag<float, 8> df;
    AttendRowsForTag(df, dtype, head_dim, rows, q, visible, tokens, state, logits, scratch);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace headwise::kernels::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace headwise::kernels::cpu {

HWY_EXPORT(AttendRowsImpl);

void AttendRows(DType dtype, int head_dim, int rows, const float* q, const int32_t* visible,
                const TokenRows& tokens, RowState state, float* logits, float* scratch) {
  HWY_DYNAMIC_DISPATCH(AttendRowsImpl)
  (dtype, head_dim, rows, q, visible, tokens, state, logits, scratch);
}

}  // namespace headwise::kernels::cpu
#endif  // HWY_ONCE
