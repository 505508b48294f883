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
// Codes are unpacked without shuffles: the L bytes of a block widen to L u32 lanes, and the k =
// 8 / bits codes of each byte come out by shift and mask as k vectors, vector v holding
// channels c0 + k i + v. The query is permuted into the same order per block (a dot product does
// not care), and the value accumulators stay permuted until the page is done; the lanes L are
// chosen so that a block (L k channels) divides G and never spans two value groups.

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

// The L k codes of channels [c, c + L k) of a token whose kBits-bit codes are packed from `row`
// (L = Lanes(df), k = 8 / kBits codes per byte), widened to f32 as k vectors: lane i of vector v
// is channel c + k i + v.
template <int kBits, class DF>
HWY_INLINE void LoadCodeBlock(DF df, const uint8_t* HWY_RESTRICT row, int c,
                              hn::Vec<DF>* HWY_RESTRICT out) {
  const hn::Rebind<uint8_t, DF> d8;
  const hn::RebindToUnsigned<DF> du;
  const hn::RebindToSigned<DF> di;
  const auto x = hn::PromoteTo(du, hn::LoadU(d8, row + c * kBits / 8));
  const auto f32 = [&](auto codes) { return hn::ConvertTo(df, hn::BitCast(di, codes)); };
  if constexpr (kBits == 8) {
    out[0] = f32(x);
  } else if constexpr (kBits == 4) {
    out[0] = f32(hn::And(x, hn::Set(du, 15u)));
    out[1] = f32(hn::ShiftRight<4>(x));
  } else {
    static_assert(kBits == 2, "8, 4 or 2 bits");
    const auto mask = hn::Set(du, 3u);
    out[0] = f32(hn::And(x, mask));
    out[1] = f32(hn::And(hn::ShiftRight<2>(x), mask));
    out[2] = f32(hn::And(hn::ShiftRight<4>(x), mask));
    out[3] = f32(hn::ShiftRight<6>(x));
  }
}

// Channel order for value codes where it is cheap: int8 needs no reordering, int4 blocks of 16
// bytes are split into nibbles and interleaved back by two byte shuffles (full 128-bit u8
// vectors, 16 f32 lanes), int2 blocks of 8 bytes by two rounds of shuffles (8 f32 lanes). Vector v
// then holds channels c + v L .. c + v L + L - 1.
template <int kBits, class DF>
constexpr bool kNaturalValues = kBits == 8 || (kBits == 4 && hn::MaxLanes(DF()) == 16) ||
                                (kBits == 2 && hn::MaxLanes(DF()) == 8 && HWY_TARGET <= HWY_AVX2);

template <int kBits, class DF>
HWY_INLINE void LoadCodeBlockNatural(DF df, const uint8_t* HWY_RESTRICT row, int c,
                                     hn::Vec<DF>* HWY_RESTRICT out) {
  if constexpr (kBits == 8) {
    LoadCodeBlock<8>(df, row, c, out);
  } else if constexpr (kBits == 2) {
    static_assert(hn::MaxLanes(DF()) == 8, "int2 with 8 lanes");
#if HWY_TARGET <= HWY_AVX2
    const hn::Full128<uint8_t> d8;
    const hn::Full128<uint16_t> d16;
    const hn::Rebind<uint32_t, DF> du;
    const hn::RebindToSigned<DF> di;
    const auto bytes = hn::LoadU(d8, row + c / 4);  // 8 bytes used: 32 channels.
    const auto mask = hn::Set(d8, uint8_t{3});
    const auto c0 = hn::And(bytes, mask);
    const auto c1 = hn::And(hn::ShiftRight<2>(bytes), mask);
    const auto c2 = hn::And(hn::ShiftRight<4>(bytes), mask);
    const auto c3 = hn::ShiftRight<6>(bytes);
    const auto pairs01 = hn::BitCast(d16, hn::InterleaveLower(d8, c0, c1));
    const auto pairs23 = hn::BitCast(d16, hn::InterleaveLower(d8, c2, c3));
    const auto first = hn::BitCast(d8, hn::InterleaveLower(d16, pairs01, pairs23));
    const auto second = hn::BitCast(d8, hn::InterleaveUpper(d16, pairs01, pairs23));
    const auto f32 = [&](auto half) {
      return hn::ConvertTo(df, hn::BitCast(di, hn::PromoteTo(du, half)));
    };
    out[0] = f32(hn::LowerHalf(first));
    out[1] = f32(hn::UpperHalf(hn::Half<decltype(d8)>(), first));
    out[2] = f32(hn::LowerHalf(second));
    out[3] = f32(hn::UpperHalf(hn::Half<decltype(d8)>(), second));
#endif
  } else {
    static_assert(kBits == 4 && hn::MaxLanes(DF()) == 16, "int4 with 16 lanes");
#if HWY_TARGET != HWY_SCALAR  // (16 lanes never occur there.)
    const hn::Full128<uint8_t> d8;
    const hn::RebindToUnsigned<DF> du;
    const hn::RebindToSigned<DF> di;
    const auto bytes = hn::LoadU(d8, row + c / 2);
    const auto lo = hn::And(bytes, hn::Set(d8, uint8_t{15}));
    const auto hi = hn::ShiftRight<4>(bytes);
    out[0] = hn::ConvertTo(df, hn::BitCast(di, hn::PromoteTo(du, hn::InterleaveLower(d8, lo, hi))));
    out[1] = hn::ConvertTo(df, hn::BitCast(di, hn::PromoteTo(du, hn::InterleaveUpper(d8, lo, hi))));
#endif
  }
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

// The vector form of ScaleQuery's permutation: deinterleaving by ConcatEven / ConcatOdd (one
// level for 2 codes per byte, two for 4). False where those are not available for DF (partial
// or scalar vectors): the caller then permutes element by element.
template <int kBits, class DF>
HWY_INLINE bool PermuteScaled(DF df, int head_dim, const float* HWY_RESTRICT q,
                              const float* HWY_RESTRICT scale, float* HWY_RESTRICT out) {
  const int lanes = static_cast<int>(hn::Lanes(df));
  const auto at = [&](int c) { return hn::Mul(hn::LoadU(df, q + c), hn::LoadU(df, scale + c)); };
  if constexpr (kBits == 8) {
    for (int c = 0; c < head_dim; c += lanes) hn::StoreU(at(c), df, out + c);
    return true;
  }
#if HWY_TARGET <= HWY_AVX2
  if constexpr (hn::MaxLanes(DF()) >= 8 && kBits == 4) {
    for (int c0 = 0; c0 < head_dim; c0 += 2 * lanes) {
      const auto lo = at(c0), hi = at(c0 + lanes);
      hn::StoreU(hn::ConcatEven(df, hi, lo), df, out + c0);
      hn::StoreU(hn::ConcatOdd(df, hi, lo), df, out + c0 + lanes);
    }
    return true;
  } else if constexpr (hn::MaxLanes(DF()) >= 8 && kBits == 2) {
    for (int c0 = 0; c0 < head_dim; c0 += 4 * lanes) {
      const auto x0 = at(c0), x1 = at(c0 + lanes), x2 = at(c0 + 2 * lanes);
      const auto x3 = at(c0 + 3 * lanes);
      const auto even01 = hn::ConcatEven(df, x1, x0), even23 = hn::ConcatEven(df, x3, x2);
      const auto odd01 = hn::ConcatOdd(df, x1, x0), odd23 = hn::ConcatOdd(df, x3, x2);
      hn::StoreU(hn::ConcatEven(df, even23, even01), df, out + c0);
      hn::StoreU(hn::ConcatEven(df, odd23, odd01), df, out + c0 + lanes);
      hn::StoreU(hn::ConcatOdd(df, even23, even01), df, out + c0 + 2 * lanes);
      hn::StoreU(hn::ConcatOdd(df, odd23, odd01), df, out + c0 + 3 * lanes);
    }
    return true;
  }
#endif
  (void)lanes;
  (void)at;
  return false;
}

// qs[j] = q_j ⊙ scale in block order (channel c0 + k i + v at c0 + v L + i for blocks of L k
// channels, k = 8 / kBits) and offset[j] = q_j . minimum, for the B rows (one key group).
template <int B, int kBits, class DF>
HWY_INLINE void ScaleQuery(DF df, int head_dim, const float* HWY_RESTRICT q,
                           const float* HWY_RESTRICT scale, const float* HWY_RESTRICT minimum,
                           float* HWY_RESTRICT qs, float* HWY_RESTRICT offset) {
  constexpr int k = 8 / kBits;
  const int lanes = static_cast<int>(hn::Lanes(df));
  HEADWISE_UNROLL
  for (int j = 0; j < B; ++j) {
    const float* qj = q + j * head_dim;
    auto dot = hn::Zero(df);
    for (int c = 0; c < head_dim; c += lanes) {
      dot = hn::MulAdd(hn::LoadU(df, qj + c), hn::LoadU(df, minimum + c), dot);
    }
    offset[j] = hn::GetLane(hn::SumOfLanes(df, dot));
    float* out = qs + j * head_dim;
    if (PermuteScaled<kBits>(df, head_dim, qj, scale, out)) continue;
    for (int c0 = 0; c0 < head_dim; c0 += lanes * k) {
      for (int v = 0; v < k; ++v) {
        for (int i = 0; i < lanes; ++i) {
          const int c = c0 + k * i + v;
          out[c0 + v * lanes + i] = qj[c] * scale[c];
        }
      }
    }
  }
}

// Scores U tokens from t0 for the B rows over the block-ordered scaled query qs: s[j * n + t] =
// qs_j . codes_t + offset[j] + bias[t].
template <int B, int U, int kBits, class DF>
HWY_INLINE void ScoreQuantGroup(DF df, int head_dim, const float* HWY_RESTRICT qs,
                                const uint8_t* codes, int row_bytes, int t0, int n,
                                const float* offset, const float* bias, float* HWY_RESTRICT s) {
  constexpr int k = 8 / kBits;
  const int lanes = static_cast<int>(hn::Lanes(df));
  hn::Vec<DF> acc[B][U];
  HEADWISE_UNROLL
  for (int j = 0; j < B; ++j) {
    HEADWISE_UNROLL
    for (int u = 0; u < U; ++u) acc[j][u] = hn::Zero(df);
  }
  for (int c = 0; c < head_dim; c += lanes * k) {
    hn::Vec<DF> kv[U][k];
    HEADWISE_UNROLL
    for (int u = 0; u < U; ++u) LoadCodeBlock<kBits>(df, codes + (t0 + u) * row_bytes, c, kv[u]);
    HEADWISE_UNROLL
    for (int v = 0; v < k; ++v) {
      HEADWISE_UNROLL
      for (int j = 0; j < B; ++j) {
        const auto qv = hn::LoadU(df, qs + j * head_dim + c + v * lanes);
        HEADWISE_UNROLL
        for (int u = 0; u < U; ++u) acc[j][u] = hn::MulAdd(qv, kv[u][v], acc[j][u]);
      }
    }
  }
  ReduceScores<B, U>(df, acc, t0, n, offset, bias, s);
}

// ScoreQuantGroup over tokens [t_begin, t_end), U at a time, prefetching `prefetch_bytes` at
// `prefetch` spread over the steps.
template <int B, int U, int kBits, class DF>
HWY_INLINE void ScoreQuantTokens(DF df, int head_dim, const float* HWY_RESTRICT qs,
                                 const uint8_t* codes, int row_bytes, int t_begin, int t_end, int n,
                                 const float* offset, const float* bias, const std::byte* prefetch,
                                 int64_t prefetch_bytes, float* HWY_RESTRICT s) {
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
    ScoreQuantGroup<B, U, kBits>(df, head_dim, qs, codes, row_bytes, t, n, offset, bias, s);
  }
  for (; t < t_end; ++t) {
    ScoreQuantGroup<B, 1, kBits>(df, head_dim, qs, codes, row_bytes, t, n, offset, bias, s);
  }
}

// tile_j += sum_t w[j * n + t] * codes_t for the B rows, U blocks (U k vectors) at a time;
// weights(c) gives the w of the value group holding channels [c, c + U L k). With
// kNaturalValues the tile is o itself, in channel order (accumulated onto); otherwise a scratch
// tile in block order (overwritten), added to o by AddTileInChannelOrder.
template <int B, int U, int kBits, class DF, class Weights>
HWY_INLINE void AccumulateQuantValues(DF df, int head_dim, Weights weights, int n,
                                      const uint8_t* codes, int row_bytes,
                                      float* HWY_RESTRICT tile) {
  constexpr int k = 8 / kBits;
  constexpr bool kNatural = kNaturalValues<kBits, DF>;
  const int lanes = static_cast<int>(hn::Lanes(df));
  for (int c = 0; c < head_dim; c += U * lanes * k) {
    const float* HWY_RESTRICT p = weights(c);
    hn::Vec<DF> acc[B][U * k];
    HEADWISE_UNROLL
    for (int j = 0; j < B; ++j) {
      HEADWISE_UNROLL
      for (int u = 0; u < U * k; ++u) {
        acc[j][u] = kNatural ? hn::LoadU(df, tile + j * head_dim + c + u * lanes) : hn::Zero(df);
      }
    }
    for (int t = 0; t < n; ++t) {
      hn::Vec<DF> vv[U * k];
      HEADWISE_UNROLL
      for (int u = 0; u < U; ++u) {
        if constexpr (kNatural) {
          LoadCodeBlockNatural<kBits>(df, codes + t * row_bytes, c + u * lanes * k, vv + u * k);
        } else {
          LoadCodeBlock<kBits>(df, codes + t * row_bytes, c + u * lanes * k, vv + u * k);
        }
      }
      HEADWISE_UNROLL
      for (int j = 0; j < B; ++j) {
        const auto pj = hn::Set(df, p[j * n + t]);
        HEADWISE_UNROLL
        for (int u = 0; u < U * k; ++u) acc[j][u] = hn::MulAdd(pj, vv[u], acc[j][u]);
      }
    }
    HEADWISE_UNROLL
    for (int j = 0; j < B; ++j) {
      HEADWISE_UNROLL
      for (int u = 0; u < U * k; ++u)
        hn::StoreU(acc[j][u], df, tile + j * head_dim + c + u * lanes);
    }
  }
}

// o_j[c0 + k i + v] += tile_j[c0 + v L + i]: the value accumulators back in channel order.
template <int B, int kBits>
HWY_INLINE void AddTileInChannelOrder(int lanes, int head_dim, const float* HWY_RESTRICT tile,
                                      float* HWY_RESTRICT o) {
  constexpr int k = 8 / kBits;
  for (int j = 0; j < B; ++j) {
    for (int c0 = 0; c0 < head_dim; c0 += lanes * k) {
      for (int v = 0; v < k; ++v) {
        for (int i = 0; i < lanes; ++i) {
          o[j * head_dim + c0 + k * i + v] += tile[j * head_dim + c0 + v * lanes + i];
        }
      }
    }
  }
}

// Per-thread buffers of the value pass: weights [D / G][B * n] and the transposed value
// parameters [D / G][n]. Grown on demand, never shrunk.
struct QuantScratch {
  std::vector<float> weights, scale_t, min_t, qs, tile;
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
  constexpr int k = 8 / kBits;
  const int lanes = static_cast<int>(hn::Lanes(df));
  const QuantPage page = PageParts(tokens, head_dim);
  const int n = tokens.num_tokens;
  const int group = tokens.group_size;
  QuantScratch& scratch = ThreadScratch();
  scratch.qs.resize(static_cast<size_t>(B) * head_dim);
  float* qs = scratch.qs.data();
  float offset[B];
  // Only the first row block prefetches the next page, a slice per key group.
  const std::byte* prefetch = row0 == 0 ? tokens.prefetch : nullptr;
  const int key_groups = (n + group - 1) / group;
  const int64_t slice = (tokens.prefetch_bytes + key_groups - 1) / key_groups;
  // Tokens per scoring step: U k code vectors and B U accumulators must fit the registers.
  constexpr int kU = std::clamp(std::min(kMaxAccumulators / B, 8 / k), 1, 8);
  for (int g = 0; g < key_groups; ++g) {
    ScaleQuery<B, kBits>(df, head_dim, q, page.k_scale + g * head_dim, page.k_min + g * head_dim,
                         qs, offset);
    const int64_t done = std::min<int64_t>(int64_t{g} * slice, tokens.prefetch_bytes);
    ScoreQuantTokens<B, kU, kBits>(df, head_dim, qs, page.k_codes, page.row_bytes, g * group,
                                   std::min(n, (g + 1) * group), n, offset, tokens.bias,
                                   prefetch != nullptr ? prefetch + done : nullptr,
                                   std::min(slice, tokens.prefetch_bytes - done), s);
  }
  if (!SoftmaxBlock<B>(df, head_dim, s, n, visible, row0, rows, m, l, o, logits)) return;
  ValueWeights<B>(df, head_dim, group, page, n, s, scratch, o);
  const float* weights = scratch.weights.data();
  const auto weights_at = [&](int c) { return weights + static_cast<size_t>(c / group) * B * n; };
  constexpr bool kNatural = kNaturalValues<kBits, DF>;
  scratch.tile.resize(static_cast<size_t>(B) * head_dim);
  float* tile = kNatural ? o : scratch.tile.data();
  // U blocks per step share one value group (U L k divides G) and fit the registers.
  constexpr int kMaxU = std::max(1, std::min(kMaxAccumulators / (B * k), 8 / k));
  const int blocks_per_group = group / (lanes * k);
  if (kMaxU >= 2 && blocks_per_group % 2 == 0) {
    AccumulateQuantValues<B, 2, kBits>(df, head_dim, weights_at, n, page.v_codes, page.row_bytes,
                                       tile);
  } else {
    AccumulateQuantValues<B, 1, kBits>(df, head_dim, weights_at, n, page.v_codes, page.row_bytes,
                                       tile);
  }
  if constexpr (!kNatural) AddTileInChannelOrder<B, kBits>(lanes, head_dim, tile, o);
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

template <int kLanes>
void AttendQuantRowsLanes(int head_dim, int rows, const float* q, const int32_t* visible,
                          const QuantTokenRows& tokens, RowState state, float* logits,
                          float* scratch) {
  const hn::CappedTag<float, kLanes> df;
  AttendQuantRowsForTag(df, head_dim, rows, q, visible, tokens, state, logits, scratch);
}

void AttendQuantRowsImpl(int head_dim, int rows, const float* q, const int32_t* visible,
                         const QuantTokenRows& tokens, RowState state, float* logits,
                         float* scratch) {
  // The widest block (lanes x codes per byte) that divides the group, which divides head_dim:
  // a block then never spans two value groups.
  const int per_byte = 8 / tokens.bits;
  int lanes = 16;
  while (lanes > 1 && tokens.group_size % (lanes * per_byte) != 0) lanes /= 2;
  switch (lanes) {
    case 16:
      return AttendQuantRowsLanes<16>(head_dim, rows, q, visible, tokens, state, logits, scratch);
    case 8:
      return AttendQuantRowsLanes<8>(head_dim, rows, q, visible, tokens, state, logits, scratch);
    case 4:
      return AttendQuantRowsLanes<4>(head_dim, rows, q, visible, tokens, state, logits, scratch);
    case 2:
      return AttendQuantRowsLanes<2>(head_dim, rows, q, visible, tokens, state, logits, scratch);
    default:
      return AttendQuantRowsLanes<1>(head_dim, rows, q, visible, tokens, state, logits, scratch);
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
