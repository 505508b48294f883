// Blocked (flash-attention style) chunked causal prefill on the CPU, compiled once per SIMD
// target by Highway (the best one is chosen at run time).
//
// One work item is (KV head h, query tile): the tile's Bq chunk tokens times the g query heads
// of h's GQA group, R = Bq * g query rows (about 128). It walks key tiles of up to 64 tokens —
// first the cached pages (packed across pages, honouring page_len and token_bias), then the
// chunk's own tokens up to the tile's last position (later tiles are skipped, not masked) —
// and keeps an online softmax per row. Each key tile is converted to f32 once and serves all
// R rows.
//
// Layout: queries and scores are kept TRANSPOSED, rows along the vector lanes: Q^T [d][R],
// scores/probabilities S^T [64][R], m, l [R]. So QK (S^T[t] += K[t][c] * Q^T[c], K broadcast),
// the running max and the exponentials are vertical vector operations: no horizontal
// reductions and no transposition of K. PV keeps O row-major [R][d] (O[r] += P^T[t][r] * V[t],
// P broadcast), so V is not transposed either and the output needs no transposition. Both
// products are register-blocked (6 tokens or rows x up to 4 vectors of accumulators) so that
// they run at the multiply-add rate.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "prefill_tiled.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// Must come after foreach_target.h.
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

#ifndef HEADWISE_KERNELS_CPU_PREFILL_TILED_ONCE_
#define HEADWISE_KERNELS_CPU_PREFILL_TILED_ONCE_
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_attention.h"

namespace headwise::kernels::cpu::tiled {

constexpr int kKeyTile = 64;      // Key tokens per tile.
constexpr int kTargetRows = 128;  // Query rows per work item (tokens x group).

// One work item: query tokens [q0, q0 + q_tokens) of KV head `head`.
struct WorkItem {
  int head = 0;
  int q0 = 0;
  int q_tokens = 0;
  int64_t cost = 0;  // Key tokens seen x rows, for ordering.
};

// The (transposed) per-work-item state and one key tile, reused across work items of a thread.
struct Scratch {
  std::vector<float> qt, st, o, m, l, alpha, vis, k, v, bias;
};

}  // namespace headwise::kernels::cpu::tiled
#endif  // HEADWISE_KERNELS_CPU_PREFILL_TILED_ONCE_

HWY_BEFORE_NAMESPACE();
namespace headwise::kernels::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using tiled::kKeyTile;

// Row vectors per register block: 6 x 4 accumulators of 32 registers (AVX-512), 6 x 2 of 16.
#if HWY_TARGET <= HWY_AVX3
constexpr int kVecs = 4;
#else
constexpr int kVecs = 2;
#endif
constexpr int kBlock = 6;  // Tokens (QK) or channels (PV) per register block.
#define HEADWISE_UNROLL _Pragma("GCC unroll 16")
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <class DF, typename T>
HWY_INLINE void RowToF32(DF df, const T* HWY_RESTRICT src, int d, float* HWY_RESTRICT dst) {
  const int n = static_cast<int>(hn::Lanes(df));
  for (int c = 0; c < d; c += n) {
    if constexpr (std::is_same_v<T, float>) {
      hn::StoreU(hn::LoadU(df, src + c), df, dst + c);
    } else {
      const hn::Rebind<T, DF> dt;
      hn::StoreU(hn::PromoteTo(df, hn::LoadU(dt, src + c)), df, dst + c);
    }
  }
}

// S^T[t0 + i][r0 ..] = sum_c K[t0 + i][c] * Q^T[c][r0 ..] + bias[t0 + i] for B tokens and
// kVecs row vectors; with `masked`, -inf where t0 + i >= vis[row]. Folds the scores into the
// running per-row maxima vmax.
template <int B, class DF>
HWY_INLINE void ScoreBlock(DF df, int d, int ldr, const float* HWY_RESTRICT qt,
                           const float* HWY_RESTRICT k, const float* bias, bool masked,
                           const float* vis, int t0, int r0, float* HWY_RESTRICT st,
                           hn::Vec<DF> (&vmax)[kVecs]) {
  const int n = static_cast<int>(hn::Lanes(df));
  hn::Vec<DF> acc[B][kVecs];
  HEADWISE_UNROLL
  for (int i = 0; i < B; ++i) {
    HEADWISE_UNROLL
    for (int u = 0; u < kVecs; ++u) acc[i][u] = hn::Zero(df);
  }
  for (int c = 0; c < d; ++c) {
    hn::Vec<DF> q[kVecs];
    HEADWISE_UNROLL
    for (int u = 0; u < kVecs; ++u) q[u] = hn::LoadU(df, qt + int64_t{c} * ldr + r0 + u * n);
    HEADWISE_UNROLL
    for (int i = 0; i < B; ++i) {
      const auto kv = hn::Set(df, k[int64_t{t0 + i} * d + c]);
      HEADWISE_UNROLL
      for (int u = 0; u < kVecs; ++u) acc[i][u] = hn::MulAdd(kv, q[u], acc[i][u]);
    }
  }
  const auto neg_inf = hn::Set(df, kNegInf);
  HEADWISE_UNROLL
  for (int i = 0; i < B; ++i) {
    const auto b = hn::Set(df, bias[t0 + i]);
    const auto t = hn::Set(df, static_cast<float>(t0 + i));
    HEADWISE_UNROLL
    for (int u = 0; u < kVecs; ++u) {
      auto x = hn::Add(acc[i][u], b);
      if (masked) x = hn::IfThenElse(hn::Lt(t, hn::LoadU(df, vis + r0 + u * n)), x, neg_inf);
      hn::StoreU(x, df, st + int64_t{t0 + i} * ldr + r0 + u * n);
      vmax[u] = hn::Max(vmax[u], x);
    }
  }
}

// o[r0 + i][c0 ..] += sum_t P^T[t][r0 + i] * V[t][c0 ..] for B rows and U channel vectors,
// tokens [0, nt); o is row-major [rows][d].
template <int B, int U, class DF>
HWY_INLINE void AccumulateBlock(DF df, int d, int ldr, const float* HWY_RESTRICT pt,
                                const float* HWY_RESTRICT v, int nt, int r0, int c0,
                                float* HWY_RESTRICT o) {
  const int n = static_cast<int>(hn::Lanes(df));
  hn::Vec<DF> acc[B][U];
  HEADWISE_UNROLL
  for (int i = 0; i < B; ++i) {
    HEADWISE_UNROLL
    for (int u = 0; u < U; ++u) acc[i][u] = hn::LoadU(df, o + int64_t{r0 + i} * d + c0 + u * n);
  }
  for (int t = 0; t < nt; ++t) {
    hn::Vec<DF> vv[U];
    HEADWISE_UNROLL
    for (int u = 0; u < U; ++u) vv[u] = hn::LoadU(df, v + int64_t{t} * d + c0 + u * n);
    HEADWISE_UNROLL
    for (int i = 0; i < B; ++i) {
      const auto p = hn::Set(df, pt[int64_t{t} * ldr + r0 + i]);
      HEADWISE_UNROLL
      for (int u = 0; u < U; ++u) acc[i][u] = hn::MulAdd(p, vv[u], acc[i][u]);
    }
  }
  HEADWISE_UNROLL
  for (int i = 0; i < B; ++i) {
    HEADWISE_UNROLL
    for (int u = 0; u < U; ++u) hn::StoreU(acc[i][u], df, o + int64_t{r0 + i} * d + c0 + u * n);
  }
}

// Runs fn(integral_constant<B>, start) over [0, count) in blocks of kBlock, then the remainder.
template <typename Fn>
HWY_INLINE void ForBlocks(int count, Fn fn) {
  int i = 0;
  for (; i + kBlock <= count; i += kBlock) fn(std::integral_constant<int, kBlock>(), i);
  switch (count - i) {
    case 5:
      return fn(std::integral_constant<int, 5>(), i);
    case 4:
      return fn(std::integral_constant<int, 4>(), i);
    case 3:
      return fn(std::integral_constant<int, 3>(), i);
    case 2:
      return fn(std::integral_constant<int, 2>(), i);
    case 1:
      return fn(std::integral_constant<int, 1>(), i);
    default:
      return;
  }
}

// Online-softmax update of one row chunk (kVecs vectors of rows at r0) whose scores S^T[0, nt)
// are biased and masked already and whose tile maxima are vmax: turns the scores into
// probabilities against the new running max and stores each row's rescale factor in alpha.
template <class DF>
HWY_INLINE void SoftmaxChunk(DF df, int ldr, int nt, const hn::Vec<DF> (&vmax)[kVecs], int r0,
                             float* HWY_RESTRICT st, float* m, float* l, float* alpha) {
  const int n = static_cast<int>(hn::Lanes(df));
  const auto neg_inf = hn::Set(df, kNegInf);
  HEADWISE_UNROLL
  for (int u = 0; u < kVecs; ++u) {
    const int r = r0 + u * n;
    const auto m_old = hn::LoadU(df, m + r);
    const auto m_new = hn::Max(m_old, vmax[u]);
    // Rows that have seen no finite logit yet keep m = -inf and get zero probabilities.
    const auto m_safe = hn::IfThenElseZero(hn::Ne(m_new, neg_inf), m_new);
    const auto a = hn::IfThenElseZero(hn::Ne(m_old, neg_inf), hn::Exp(df, hn::Sub(m_old, m_safe)));
    auto sum = hn::Zero(df);
    for (int t = 0; t < nt; ++t) {
      float* s = st + int64_t{t} * ldr + r;
      const auto x = hn::LoadU(df, s);
      const auto p = hn::IfThenElseZero(hn::Ne(x, neg_inf), hn::Exp(df, hn::Sub(x, m_safe)));
      hn::StoreU(p, df, s);
      sum = hn::Add(sum, p);
    }
    hn::StoreU(hn::MulAdd(hn::LoadU(df, l + r), a, sum), df, l + r);
    hn::StoreU(m_new, df, m + r);
    hn::StoreU(a, df, alpha + r);
  }
}

// PV for rows [r0, r0 + nr) over tokens [0, nt), U channel vectors at a time.
template <int U, class DF>
void AccumulateRows(DF df, int d, int ldr, int nt, int r0, int nr, tiled::Scratch& s) {
  const int step = U * static_cast<int>(hn::Lanes(df));
  ForBlocks(nr, [&](auto block, int i0) {
    for (int c0 = 0; c0 < d; c0 += step) {
      AccumulateBlock<decltype(block)::value, U>(df, d, ldr, s.st.data(), s.v.data(), nt, r0 + i0,
                                                 c0, s.o.data());
    }
  });
}

// Folds one key tile (nt tokens: f32 K and V rows [nt][d], bias [nt]) into the state of the
// rows. With `masked`, row r sees tile tokens [0, vis[r]); max_vis[c] bounds the row chunk c.
template <class DF>
void FoldTile(DF df, int d, int rows, int ldr, int nt, bool masked, const int* max_vis,
              tiled::Scratch& s) {
  const int n = static_cast<int>(hn::Lanes(df));
  const int chunk = kVecs * n;
  const int vecs_per_row = d / n;
  for (int r0 = 0, ci = 0; r0 < rows; r0 += chunk, ++ci) {
    // In a diagonal tile the early rows see only a prefix of the tile, or none of it.
    const int n_eff = masked ? std::clamp(max_vis[ci], 0, nt) : nt;
    if (n_eff == 0) continue;
    hn::Vec<DF> vmax[kVecs];
    for (auto& x : vmax) x = hn::Set(df, kNegInf);
    ForBlocks(n_eff, [&](auto block, int t0) {
      ScoreBlock<decltype(block)::value>(df, d, ldr, s.qt.data(), s.k.data(), s.bias.data(), masked,
                                         s.vis.data(), t0, r0, s.st.data(), vmax);
    });
    SoftmaxChunk(df, ldr, n_eff, vmax, r0, s.st.data(), s.m.data(), s.l.data(), s.alpha.data());
    const int nr = std::min(chunk, rows - r0);  // Padding rows need no output.
    for (int r = r0; r < r0 + nr; ++r) {
      const float a = s.alpha[r];
      if (a == 1.0f) continue;
      float* o = s.o.data() + int64_t{r} * d;
      for (int c = 0; c < d; c += n)
        hn::StoreU(hn::Mul(hn::LoadU(df, o + c), hn::Set(df, a)), df, o + c);
    }
    if (vecs_per_row % kVecs == 0) {
      AccumulateRows<kVecs>(df, d, ldr, n_eff, r0, nr, s);
    } else if (vecs_per_row % 2 == 0) {
      AccumulateRows<2>(df, d, ldr, n_eff, r0, nr, s);
    } else {
      AccumulateRows<1>(df, d, ldr, n_eff, r0, nr, s);
    }
  }
}

// Asks for the cache lines of one K or V row of `d` elements, to L2.
template <typename T>
HWY_INLINE void PrefetchRow(const T* row, int d) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < int64_t{d} * static_cast<int64_t>(sizeof(T)); b += 64) {
    __builtin_prefetch(p + b, 0, 2);
  }
}

// Gathers the next up-to-64 cached tokens of `head` from page position *j, row *t onwards.
template <class DF, typename T>
int GatherCached(DF df, const PagedKvView& kv, int head, int32_t* j, int* t, tiled::Scratch& s) {
  const int d = kv.head_dim;
  const int64_t page_elems = int64_t{kv.page_tokens} * d;
  int nt = 0;
  while (nt < kKeyTile && *j < kv.indptr[head + 1]) {
    const int valid = kv.PageTokens(head, *j);
    const int64_t slot = kv.indices[*j];
    const T* k = reinterpret_cast<const T*>(kv.pool) + slot * 2 * page_elems;
    const T* v = k + page_elems;
    const int take = std::min(valid - *t, kKeyTile - nt);
    for (int i = 0; i < take; ++i, ++nt) {
      const int row = *t + i;
      RowToF32(df, k + int64_t{row} * d, d, s.k.data() + int64_t{nt} * d);
      RowToF32(df, v + int64_t{row} * d, d, s.v.data() + int64_t{nt} * d);
      s.bias[nt] = kv.token_bias != nullptr ? kv.token_bias[slot * kv.page_tokens + row] : 0.0f;
    }
    *t += take;
    if (*t == valid) {
      ++*j;
      *t = 0;
    }
  }
  return nt;
}

// The rows of one work item: row r is token q0 + r / g of the chunk, query head
// head * g + r % g. `padded` rounds the rows up to whole row chunks (kVecs vectors); `ldr`,
// the stride of the transposed arrays, adds one vector so that it is not a multiple of 512
// bytes: Q^T's rows would otherwise fall into a few L1 sets and evict each other.
struct Rows {
  int d, g, rows, chunk, padded, ldr;
  int64_t OutRow(const PrefillArgs& args, const tiled::WorkItem& item, int r) const {
    return int64_t{item.q0 + r / g} * args.num_q_heads + item.head * g + r % g;
  }
};

// Sizes the scratch, resets the softmax state and writes the scaled, transposed queries.
template <class DF>
Rows StartWorkItem(DF df, const PagedKvView& kv, const PrefillArgs& args, float scale,
                   const tiled::WorkItem& item, tiled::Scratch& s) {
  Rows lay;
  lay.d = kv.head_dim;
  lay.g = args.num_q_heads / kv.num_kv_heads;
  lay.rows = item.q_tokens * lay.g;
  lay.chunk = kVecs * static_cast<int>(hn::Lanes(df));
  lay.padded = (lay.rows + lay.chunk - 1) / lay.chunk * lay.chunk;
  lay.ldr = lay.padded + static_cast<int>(hn::Lanes(df));
  const int d = lay.d, ldr = lay.ldr;
  s.qt.assign(int64_t{d} * ldr, 0.0f);
  s.o.assign(int64_t{ldr} * d, 0.0f);
  s.st.resize(int64_t{kKeyTile} * ldr);
  s.m.assign(ldr, kNegInf);
  s.l.assign(ldr, 0.0f);
  s.alpha.resize(ldr);
  s.vis.resize(ldr);
  s.k.resize(int64_t{kKeyTile} * d);
  s.v.resize(int64_t{kKeyTile} * d);
  s.bias.resize(kKeyTile);
  // Transposed in blocks of kTransposeRows rows so that both sides stay in a few cache lines.
  constexpr int kTransposeRows = 16;
  const float* q_rows[kTransposeRows];
  for (int r0 = 0; r0 < lay.rows; r0 += kTransposeRows) {
    const int nr = std::min(kTransposeRows, lay.rows - r0);
    for (int i = 0; i < nr; ++i) q_rows[i] = args.q + lay.OutRow(args, item, r0 + i) * d;
    for (int c = 0; c < d; ++c) {
      float* dst = s.qt.data() + int64_t{c} * ldr + r0;
      for (int i = 0; i < nr; ++i) dst[i] = q_rows[i][c] * scale;
    }
  }
  return lay;
}

// The chunk's own tokens: key tiles up to the work item's last token (later ones are skipped);
// a tile reaching past a row's own position is masked for that row.
template <class DF, typename T>
void FoldChunk(DF df, const PagedKvView& kv, const PrefillArgs& args, const tiled::WorkItem& item,
               const Rows& lay, tiled::Scratch& s) {
  const int d = lay.d;
  const T* k_new = static_cast<const T*>(args.k_new);
  const T* v_new = static_cast<const T*>(args.v_new);
  const int64_t stride = int64_t{kv.num_kv_heads} * d;
  const int q_last = item.q0 + item.q_tokens - 1;
  std::vector<int> max_vis(lay.padded / lay.chunk);
  for (int kt0 = 0; kt0 <= q_last; kt0 += kKeyTile) {
    const int nt = std::min(kKeyTile, args.num_tokens - kt0);
    for (int i = 0; i < nt; ++i) {
      const int64_t at = int64_t{kt0 + i} * stride + int64_t{item.head} * d;
      RowToF32(df, k_new + at, d, s.k.data() + int64_t{i} * d);
      RowToF32(df, v_new + at, d, s.v.data() + int64_t{i} * d);
      s.bias[i] = 0.0f;
    }
    // The next tile's rows are scattered (one row per token, all heads interleaved): start
    // fetching them while this tile is computed.
    for (int i = kt0 + kKeyTile; i < std::min(kt0 + 2 * kKeyTile, q_last + 1); ++i) {
      const int64_t at = int64_t{i} * stride + int64_t{item.head} * d;
      PrefetchRow(k_new + at, d);
      PrefetchRow(v_new + at, d);
    }
    const bool masked = kt0 + nt - 1 > item.q0;
    if (masked) {
      std::fill(max_vis.begin(), max_vis.end(), 0);
      for (int r = 0; r < lay.padded; ++r) {
        // Padding rows (r >= rows) see the whole tile: harmless, they are never written out.
        const int vis = r < lay.rows ? item.q0 + r / lay.g - kt0 + 1 : nt;
        s.vis[r] = static_cast<float>(vis);
        max_vis[r / lay.chunk] = std::max(max_vis[r / lay.chunk], vis);
      }
    }
    FoldTile(df, d, lay.rows, lay.ldr, nt, masked, max_vis.data(), s);
  }
}

template <class DF, typename T>
void WorkItemTyped(DF df, const PagedKvView& kv, const PrefillArgs& args, float scale,
                   const tiled::WorkItem& item, tiled::Scratch& s) {
  const Rows lay = StartWorkItem(df, kv, args, scale, item, s);
  const int d = lay.d;
  // Cached pages: every row sees every token.
  int32_t page = kv.indptr[item.head];
  int row_in_page = 0;
  while (true) {
    const int nt = GatherCached<DF, T>(df, kv, item.head, &page, &row_in_page, s);
    if (nt == 0) break;
    FoldTile(df, d, lay.rows, lay.ldr, nt, /*masked=*/false, nullptr, s);
  }
  FoldChunk<DF, T>(df, kv, args, item, lay, s);

  const int n = static_cast<int>(hn::Lanes(df));
  for (int r = 0; r < lay.rows; ++r) {
    const float l = s.l[r];
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    const float* src = s.o.data() + int64_t{r} * d;
    const int64_t out_row = lay.OutRow(args, item, r);
    float* dst = args.o + out_row * d;
    for (int c = 0; c < d; c += n) {
      hn::StoreU(hn::Mul(hn::LoadU(df, src + c), hn::Set(df, inv)), df, dst + c);
    }
    if (args.lse != nullptr) args.lse[out_row] = l > 0.0f ? s.m[r] + std::log(l) : kNegInf;
  }
}

template <class DF>
void WorkItemForTag(DF df, const PagedKvView& kv, const PrefillArgs& args, float scale,
                    const tiled::WorkItem& item, tiled::Scratch& s) {
  switch (kv.dtype) {
    case DType::kF32:
      return WorkItemTyped<DF, float>(df, kv, args, scale, item, s);
    case DType::kF16:
      return WorkItemTyped<DF, hwy::float16_t>(df, kv, args, scale, item, s);
    case DType::kBF16:
      return WorkItemTyped<DF, hwy::bfloat16_t>(df, kv, args, scale, item, s);
  }
}

void PrefillWorkItemImpl(const PagedKvView& kv, const PrefillArgs& args, float scale,
                         const tiled::WorkItem& item, tiled::Scratch& s) {
  // Rows run along the lanes, so any width works; K/V rows are converted in vectors, which
  // head_dim 8 caps at 8 lanes.
  if (kv.head_dim % 16 == 0) {
    WorkItemForTag(hn::CappedTag<float, 16>(), kv, args, scale, item, s);
  } else {
    WorkItemForTag(hn::CappedTag<float, 8>(), kv, args, scale, item, s);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace headwise::kernels::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace headwise::kernels::cpu {

HWY_EXPORT(PrefillWorkItemImpl);

void Prefill(const PagedKvView& kv, const PrefillArgs& args) {
  const int threads = args.num_threads > 0 ? args.num_threads : omp_get_max_threads();
  const int group = args.num_q_heads / kv.num_kv_heads;
  const int q_tile = std::max(1, tiled::kTargetRows / group);
  const float scale =
      args.scale != 0.0f ? args.scale : 1.0f / std::sqrt(static_cast<float>(kv.head_dim));
  std::vector<tiled::WorkItem> items;
  for (int h = 0; h < kv.num_kv_heads; ++h) {
    const int64_t cached = kv.HeadTokens(h);
    for (int q0 = 0; q0 < args.num_tokens; q0 += q_tile) {
      const int n = std::min(q_tile, args.num_tokens - q0);
      items.push_back({h, q0, n, (cached + q0 + n) * n});
    }
  }
  // Longest first (the causal triangle's late tiles), handed out dynamically: balanced.
  std::stable_sort(items.begin(), items.end(),
                   [](const auto& a, const auto& b) { return a.cost > b.cost; });
#pragma omp parallel num_threads(threads)
  {
    tiled::Scratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < items.size(); ++i) {
      if (args.cancel != nullptr && args.cancel->load(std::memory_order_relaxed)) continue;
      HWY_DYNAMIC_DISPATCH(PrefillWorkItemImpl)(kv, args, scale, items[i], scratch);
    }
  }
}

}  // namespace headwise::kernels::cpu
#endif  // HWY_ONCE
