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
// Shared per-target helpers (SoftmaxRow, SumOfLanes8, LoadAsF32).
#include "attend_common-inl.h"

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

template <int B, class DF, typename T>
void AttendBlock(DF df, int head_dim, const float* q, const int32_t* visible,
                 const TokenRows& tokens, int row0, int rows, float* m, float* l, float* o,
                 float* logits, float* s) {
  const T* k = static_cast<const T*>(tokens.k);
  const T* v = static_cast<const T*>(tokens.v);
  const int n = tokens.num_tokens;
  const int64_t stride = tokens.row_stride;
  const int chunks = head_dim / static_cast<int>(hn::Lanes(df));
  const auto load_k = [&](int t, int c) { return LoadAsF32(df, k + t * stride + c); };
  const auto load_v = [&](int t, int c) { return LoadAsF32(df, v + t * stride + c); };
  // Only the first row block prefetches; later blocks find the next page already in flight.
  const bool first_block = row0 == 0;
  // At most 8 tokens at once: U key vectors and B * U accumulators must fit the registers.
  ScoreTokens<B, std::clamp(kMaxAccumulators / B, 1, 8)>(
      df, head_dim, q, load_k, 0, n, n, nullptr, tokens.bias,
      first_block ? tokens.prefetch : nullptr, tokens.prefetch_bytes, s);
  if (!SoftmaxBlock<B>(df, head_dim, s, n, visible, row0, rows, m, l, o, logits)) return;
  // Unroll channels as far as head_dim allows. With 32 vector registers (AVX-512) PV keeps up to
  // 16 accumulators (B rows x U channel vectors), so each broadcast probability feeds more FMAs;
  // with 16 registers, 8.
  constexpr int kMaxU = std::max(1, kMaxAccumulators / B);
  const auto probs = [s](int) { return s; };
  if (kMaxU >= 4 && chunks % 4 == 0) {
    AccumulateValues<B, std::min(kMaxU, 4)>(df, head_dim, probs, n, load_v, o);
  } else if (kMaxU >= 2 && chunks % 2 == 0) {
    AccumulateValues<B, std::min(kMaxU, 2)>(df, head_dim, probs, n, load_v, o);
  } else {
    AccumulateValues<B, 1>(df, head_dim, probs, n, load_v, o);
  }
}

template <class DF, typename T>
void AttendRowsTyped(DF df, int head_dim, int rows, const float* q, const int32_t* visible,
                     const TokenRows& tokens, RowState state, float* logits, float* scratch) {
  ForEachRowBlock(rows, [&](auto block, int r) {
    constexpr int B = decltype(block)::value;
    AttendBlock<B, DF, T>(df, head_dim, q + int64_t{r} * head_dim, visible, tokens, r, rows,
                          state.m + r, state.l + r, state.o + int64_t{r} * head_dim, logits,
                          scratch);
  });
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
