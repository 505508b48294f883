// The attention inner loop over one KIVI page (int8 / int4 / int2 codes with per-group f32
// scales and minimums, kernels/cpu/quant_layout.h), read directly: no dequantized copy of the
// page is made. Compiled once per SIMD target by Highway; the best target is chosen at run time.
//
// Why it is cheap: dequantization is folded into the query and the probabilities.
//   * Keys are quantized per channel over a group of G tokens: k̂_tc = code_tc s_gc + min_gc, so
//     q . k̂_t = (q ⊙ s_g) . code_t + q . min_g. The scaled query q ⊙ s_g and the offset q . min_g
//     are computed once per group and row; scoring a token is then an FMA of codes widened to
//     f32 in registers, as for an f16 page.
//   * Values are quantized per token over a group of G channels: v̂_tc = code_tc s_tj + min_tj,
//     so sum_t p_t v̂_tc = sum_t (p_t s_tj) code_tc + sum_t p_t min_tj. The weights p_t s_tj are
//     formed once per token and group, and the minimum term is one add per channel per page.
// Codes are unpacked to the natural channel order with byte shuffles (interleaving the nibble
// or crumb planes), so a vector never mixes value groups (its lanes divide G).

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "attend_quant_rows.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// Must come after foreach_target.h.
#include "hwy/highway.h"
// Shared per-target helpers (ScoreTokens, AccumulateValues, SoftmaxBlock).
#include "attend_common-inl.h"

#ifndef HEADWISE_KERNELS_CPU_ATTEND_QUANT_ROWS_ONCE_
#define HEADWISE_KERNELS_CPU_ATTEND_QUANT_ROWS_ONCE_
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "cpu_attention.h"
#include "quant_layout.h"
#endif

HWY_BEFORE_NAMESPACE();
namespace headwise::kernels::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// The Lanes(df) codes of channels c.. of a token whose kBits-bit codes are packed from `row`
// (little-endian within bytes, the lower channel in the lower bits), widened to f32.
template <int kBits, class DF>
HWY_INLINE hn::Vec<DF> LoadCodes(DF df, const uint8_t* HWY_RESTRICT row, int c) {
#if HWY_TARGET == HWY_SCALAR
  // One lane: no byte shuffles on this target; read the code directly.
  const int code = (row[c * kBits / 8] >> (c * kBits % 8)) & ((1 << kBits) - 1);
  return hn::Set(df, static_cast<float>(code));
#else
  const uint8_t* HWY_RESTRICT p = row + c * kBits / 8;
  const hn::Rebind<uint8_t, DF> d8;
  hn::Vec<decltype(d8)> codes;
  if constexpr (kBits == 8) {
    codes = hn::LoadU(d8, p);
  } else if constexpr (kBits == 4) {
    const hn::Half<decltype(d8)> dh;
    const auto bytes = hn::ZeroExtendVector(d8, hn::LoadU(dh, p));
    const auto lo = hn::And(bytes, hn::Set(d8, uint8_t{0x0F}));
    codes = hn::InterleaveLower(d8, lo, hn::ShiftRight<4>(bytes));
  } else {
    static_assert(kBits == 2, "8, 4 or 2 bits");
    const hn::Half<decltype(d8)> dh;
    const hn::Half<decltype(dh)> dq;
    const auto bytes = hn::ZeroExtendVector(d8, hn::ZeroExtendVector(dh, hn::LoadU(dq, p)));
    const auto mask = hn::Set(d8, uint8_t{3});
    const auto c0 = hn::And(bytes, mask);
    const auto c1 = hn::And(hn::ShiftRight<2>(bytes), mask);
    const auto c2 = hn::And(hn::ShiftRight<4>(bytes), mask);
    const auto c3 = hn::ShiftRight<6>(bytes);
    // c0 c1 pairs and c2 c3 pairs, then pairs of pairs: c0 c1 c2 c3 of byte 0, then byte 1...
    const hn::Repartition<uint16_t, decltype(d8)> d16;
    const auto pairs01 = hn::BitCast(d16, hn::InterleaveLower(d8, c0, c1));
    const auto pairs23 = hn::BitCast(d16, hn::InterleaveLower(d8, c2, c3));
    codes = hn::BitCast(d8, hn::InterleaveLower(d16, pairs01, pairs23));
  }
  const hn::RebindToSigned<DF> di;
  const hn::Rebind<uint32_t, DF> du;
  return hn::ConvertTo(df, hn::BitCast(di, hn::PromoteTo(du, codes)));
#endif
}

// The parts of one KIVI page.
struct QuantPage {
  const uint8_t* k_codes;
  const uint8_t* v_codes;
  const float* k_scale;  // [P / G][D]
  const float* k_min;
  const float* v_scale;  // [P][D / G]
  const float* v_min;
  int row_bytes;  // Code bytes per token: D * bits / 8.
};

QuantPage PageParts(const QuantTokenRows& tokens, int head_dim) {
  const QuantLayout layout =
      MakeQuantLayout(tokens.page_tokens, head_dim, tokens.bits, tokens.group_size);
  const uint8_t* base = reinterpret_cast<const uint8_t*>(tokens.page);
  return QuantPage{base + layout.k_codes,
                   base + layout.v_codes,
                   reinterpret_cast<const float*>(base + layout.k_scale),
                   reinterpret_cast<const float*>(base + layout.k_min),
                   reinterpret_cast<const float*>(base + layout.v_scale),
                   reinterpret_cast<const float*>(base + layout.v_min),
                   head_dim * tokens.bits / 8};
}

// qs[j] = q_j ⊙ scale and offset[j] = q_j . minimum for the B rows (one key group).
template <int B, class DF>
HWY_INLINE void ScaleQuery(DF df, int head_dim, const float* HWY_RESTRICT q,
                           const float* HWY_RESTRICT scale, const float* HWY_RESTRICT minimum,
                           float* HWY_RESTRICT qs, float* HWY_RESTRICT offset) {
  const int lanes = static_cast<int>(hn::Lanes(df));
  HEADWISE_UNROLL
  for (int j = 0; j < B; ++j) {
    auto dot = hn::Zero(df);
    for (int c = 0; c < head_dim; c += lanes) {
      const auto qv = hn::LoadU(df, q + j * head_dim + c);
      hn::StoreU(hn::Mul(qv, hn::LoadU(df, scale + c)), df, qs + j * head_dim + c);
      dot = hn::MulAdd(qv, hn::LoadU(df, minimum + c), dot);
    }
    offset[j] = hn::GetLane(hn::SumOfLanes(df, dot));
  }
}

// Per-thread buffers of the value pass: weights [D / G][B * n] and the transposed value
// parameters [D / G][n]. Grown on demand, never shrunk.
struct QuantScratch {
  std::vector<float> weights, scale_t, min_t, qs;
};
QuantScratch& ThreadScratch() {
  static thread_local QuantScratch scratch;
  return scratch;
}

// weights[g][j * n + t] = p[j * n + t] * s_tg; o_j[c] += sum_t p[j * n + t] * min_tg for c in
// value group g (the minimum term of sum_t p_t v̂_t).
template <int B, class DF>
HWY_INLINE void ValueWeights(DF df, int head_dim, int group, const QuantPage& page, int n,
                             const float* HWY_RESTRICT p, QuantScratch& scratch,
                             float* HWY_RESTRICT o) {
  const int groups = head_dim / group;
  scratch.scale_t.resize(static_cast<size_t>(groups) * n);
  scratch.min_t.resize(scratch.scale_t.size());
  for (int t = 0; t < n; ++t) {
    for (int g = 0; g < groups; ++g) {
      scratch.scale_t[g * n + t] = page.v_scale[t * groups + g];
      scratch.min_t[g * n + t] = page.v_min[t * groups + g];
    }
  }
  scratch.weights.resize(static_cast<size_t>(groups) * B * n);
  const int lanes = static_cast<int>(hn::Lanes(df));
  for (int g = 0; g < groups; ++g) {
    const float* scale = scratch.scale_t.data() + g * n;
    const float* minimum = scratch.min_t.data() + g * n;
    float* w = scratch.weights.data() + static_cast<size_t>(g) * B * n;
    HEADWISE_UNROLL
    for (int j = 0; j < B; ++j) {
      auto dot = hn::Zero(df);
      int t = 0;
      for (; t + lanes <= n; t += lanes) {
        const auto pv = hn::LoadU(df, p + j * n + t);
        hn::StoreU(hn::Mul(pv, hn::LoadU(df, scale + t)), df, w + j * n + t);
        dot = hn::MulAdd(pv, hn::LoadU(df, minimum + t), dot);
      }
      float constant = hn::GetLane(hn::SumOfLanes(df, dot));
      for (; t < n; ++t) {
        w[j * n + t] = p[j * n + t] * scale[t];
        constant += p[j * n + t] * minimum[t];
      }
      const auto vc = hn::Set(df, constant);
      float* oj = o + j * head_dim + g * group;
      for (int c = 0; c < group; c += lanes) {
        hn::StoreU(hn::Add(hn::LoadU(df, oj + c), vc), df, oj + c);
      }
    }
  }
}

template <int B, int kBits, class DF>
void AttendQuantBlock(DF df, int head_dim, const float* q, const int32_t* visible,
                      const QuantTokenRows& tokens, int row0, int rows, float* m, float* l,
                      float* o, float* logits, float* s) {
  const QuantPage page = PageParts(tokens, head_dim);
  const int n = tokens.num_tokens;
  const int group = tokens.group_size;
  QuantScratch& scratch = ThreadScratch();
  scratch.qs.resize(static_cast<size_t>(B) * head_dim);
  float* qs = scratch.qs.data();
  float offset[B];
  const auto load_k = [&](int t, int c) {
    return LoadCodes<kBits>(df, page.k_codes + t * page.row_bytes, c);
  };
  const auto load_v = [&](int t, int c) {
    return LoadCodes<kBits>(df, page.v_codes + t * page.row_bytes, c);
  };
  // Only the first row block prefetches the next page, a slice per key group.
  const std::byte* prefetch = row0 == 0 ? tokens.prefetch : nullptr;
  const int key_groups = (n + group - 1) / group;
  const int64_t slice = (tokens.prefetch_bytes + key_groups - 1) / key_groups;
  for (int g = 0; g < key_groups; ++g) {
    ScaleQuery<B>(df, head_dim, q, page.k_scale + g * head_dim, page.k_min + g * head_dim, qs,
                  offset);
    const int64_t done = std::min<int64_t>(int64_t{g} * slice, tokens.prefetch_bytes);
    ScoreTokens<B, std::clamp(kMaxAccumulators / B, 1, 8)>(
        df, head_dim, qs, load_k, g * group, std::min(n, (g + 1) * group), n, offset, tokens.bias,
        prefetch != nullptr ? prefetch + done : nullptr,
        std::min(slice, tokens.prefetch_bytes - done), s);
  }
  if (!SoftmaxBlock<B>(df, head_dim, s, n, visible, row0, rows, m, l, o, logits)) return;
  ValueWeights<B>(df, head_dim, group, page, n, s, scratch, o);
  const float* weights = scratch.weights.data();
  const auto weights_at = [&](int c) { return weights + static_cast<size_t>(c / group) * B * n; };
  // U channel vectors share one value group: U * Lanes divides G.
  constexpr int kMaxU = std::max(1, kMaxAccumulators / B);
  const int per_group = group / static_cast<int>(hn::Lanes(df));
  if (kMaxU >= 4 && per_group % 4 == 0) {
    AccumulateValues<B, std::min(kMaxU, 4)>(df, head_dim, weights_at, n, load_v, o);
  } else if (kMaxU >= 2 && per_group % 2 == 0) {
    AccumulateValues<B, std::min(kMaxU, 2)>(df, head_dim, weights_at, n, load_v, o);
  } else {
    AccumulateValues<B, 1>(df, head_dim, weights_at, n, load_v, o);
  }
}

template <int kBits, class DF>
void AttendQuantRowsBits(DF df, int head_dim, int rows, const float* q, const int32_t* visible,
                         const QuantTokenRows& tokens, RowState state, float* logits,
                         float* scratch) {
  ForEachRowBlock(rows, [&](auto block, int r) {
    constexpr int B = decltype(block)::value;
    AttendQuantBlock<B, kBits>(df, head_dim, q + int64_t{r} * head_dim, visible, tokens, r, rows,
                               state.m + r, state.l + r, state.o + int64_t{r} * head_dim, logits,
                               scratch);
  });
}

template <class DF>
void AttendQuantRowsForTag(DF df, int head_dim, int rows, const float* q, const int32_t* visible,
                           const QuantTokenRows& tokens, RowState state, float* logits,
                           float* scratch) {
  switch (tokens.bits) {
    case 8:
      return AttendQuantRowsBits<8>(df, head_dim, rows, q, visible, tokens, state, logits, scratch);
    case 4:
      return AttendQuantRowsBits<4>(df, head_dim, rows, q, visible, tokens, state, logits, scratch);
    default:
      return AttendQuantRowsBits<2>(df, head_dim, rows, q, visible, tokens, state, logits, scratch);
  }
}

void AttendQuantRowsImpl(int head_dim, int rows, const float* q, const int32_t* visible,
                         const QuantTokenRows& tokens, RowState state, float* logits,
                         float* scratch) {
  // Lanes divide both head_dim and the group (a multiple of 8), so no vector mixes value groups.
  if (head_dim % 16 == 0 && tokens.group_size % 16 == 0) {
    const hn::CappedTag<float, 16> df;
    AttendQuantRowsForTag(df, head_dim, rows, q, visible, tokens, state, logits, scratch);
  } else {
    const hn::CappedTag<float, 8> df;
    AttendQuantRowsForTag(df, head_dim, rows, q, visible, tokens, state, logits, scratch);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace headwise::kernels::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace headwise::kernels::cpu {

HWY_EXPORT(AttendQuantRowsImpl);

void AttendQuantRows(int head_dim, int rows, const float* q, const int32_t* visible,
                     const QuantTokenRows& tokens, RowState state, float* logits, float* scratch) {
  HWY_DYNAMIC_DISPATCH(AttendQuantRowsImpl)
  (head_dim, rows, q, visible, tokens, state, logits, scratch);
}

}  // namespace headwise::kernels::cpu
#endif  // HWY_ONCE
