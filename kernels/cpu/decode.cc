// Decode attention on the CPU: splits the work over KV heads and runs of pages
// (flash-decoding), runs AttendRows on each piece with OpenMP, and merges the partial states
// with the LSE rule. Also the previous, row-blocked prefill (PrefillRowwise), kept as a second
// implementation for tests and the benchmark; the prefill in use is prefill_tiled.cc.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_attention.h"

namespace headwise::kernels::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Work below this many pages per piece is not worth a separate partial state.
constexpr int kMinPagesPerPiece = 4;
// How many pages ahead of the one being computed the kernel prefetches.
constexpr int kPrefetchPages = 2;
// Pieces per thread, so that heads of unequal length still balance.
constexpr int kPiecesPerThread = 8;

int ResolveThreads(int requested) { return requested > 0 ? requested : omp_get_max_threads(); }

// A run of pages [page_begin, page_end) of one KV head, in CSR page positions.
struct Piece {
  int head = 0;
  int page_begin = 0;
  int page_end = 0;
};

// Splits every head's pages into pieces so that `threads` threads have enough to balance.
std::vector<Piece> SplitPages(const PagedKvView& kv, int threads) {
  const int64_t total_pages = kv.indptr[kv.num_kv_heads];
  int64_t pages_per_piece = std::numeric_limits<int32_t>::max();
  if (threads > 1) {
    pages_per_piece =
        std::max<int64_t>(kMinPagesPerPiece, (total_pages + threads * kPiecesPerThread - 1) /
                                                 (int64_t{threads} * kPiecesPerThread));
  }
  std::vector<Piece> pieces;
  for (int h = 0; h < kv.num_kv_heads; ++h) {
    for (int64_t p = kv.indptr[h]; p < kv.indptr[h + 1]; p += pages_per_piece) {
      pieces.push_back(
          Piece{h, static_cast<int>(p),
                static_cast<int>(std::min<int64_t>(p + pages_per_piece, kv.indptr[h + 1]))});
    }
  }
  return pieces;
}

// Partial softmax states of `rows` query rows: after Finish(), o is normalized and lse holds
// m + ln l (or -inf when no token was seen).
struct PartialStates {
  PartialStates(int rows, int head_dim)
      : m(rows, kNegInf), l(rows, 0.0f), o(int64_t{rows} * head_dim, 0.0f), lse(rows) {}
  RowState state() { return RowState{m.data(), l.data(), o.data()}; }
  void Finish(int head_dim) {
    for (size_t r = 0; r < m.size(); ++r) {
      if (l[r] > 0.0f) {
        const float inv = 1.0f / l[r];
        for (int c = 0; c < head_dim; ++c) o[r * head_dim + c] *= inv;
        lse[r] = m[r] + std::log(l[r]);
      } else {
        std::fill(o.begin() + r * head_dim, o.begin() + (r + 1) * head_dim, 0.0f);
        lse[r] = kNegInf;
      }
    }
  }
  std::vector<float> m, l, o, lse;
};

// Merges the partial states of the pieces of each head, in order, into (o, lse) rows laid out
// by `row_of(head, i)` for the i-th of the head's `rows_per_head` rows.
template <typename RowOf>
void MergePieces(const std::vector<Piece>& pieces, std::vector<PartialStates>& partials,
                 int num_heads, int rows_per_head, int head_dim, RowOf row_of, float* o, float* lse,
                 int threads) {
  // Pieces of a head are consecutive in `pieces`; find each head's range.
  std::vector<int> first(num_heads + 1, static_cast<int>(pieces.size()));
  for (int i = static_cast<int>(pieces.size()) - 1; i >= 0; --i) first[pieces[i].head] = i;
  for (int h = num_heads - 1; h >= 0; --h) first[h] = std::min(first[h], first[h + 1]);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int h = 0; h < num_heads; ++h) {
    const int begin = first[h];
    int end = begin;
    while (end < static_cast<int>(pieces.size()) && pieces[end].head == h) ++end;
    std::vector<const float*> o_parts, lse_parts;
    std::vector<float> merged_o(int64_t{rows_per_head} * head_dim), merged_lse(rows_per_head);
    for (int i = begin; i < end; ++i) {
      o_parts.push_back(partials[i].o.data());
      lse_parts.push_back(partials[i].lse.data());
    }
    MergeStates(o_parts.data(), lse_parts.data(), end - begin, rows_per_head, head_dim,
                merged_o.data(), merged_lse.data());
    for (int r = 0; r < rows_per_head; ++r) {
      const int64_t out_row = row_of(h, r);
      std::copy_n(merged_o.data() + int64_t{r} * head_dim, head_dim, o + out_row * head_dim);
      if (lse != nullptr) lse[out_row] = merged_lse[r];
    }
  }
}

// Where CSR page `j` lives, its format and its slot size.
struct PageAddress {
  const std::byte* page;
  PageFormat format;
  int64_t bytes;
};

PageAddress AddressOf(const PagedKvView& kv, int32_t j) {
  const int64_t slot = kv.indices[j];
  if (kv.page_format == nullptr) {
    const int64_t bytes = PageBytes(kv.page_tokens, kv.head_dim, kv.dtype);
    return PageAddress{kv.pool + slot * bytes, FloatPageFormat(kv.dtype), bytes};
  }
  const PageFormat format = static_cast<PageFormat>(kv.page_format[j]);
  const int64_t bytes = FormatPageBytes(format, kv.page_tokens, kv.head_dim, kv.quant_group_size);
  return PageAddress{kv.format_pool[kv.page_format[j]] + slot * bytes, format, bytes};
}

}  // namespace

void AttendPage(const PagedKvView& kv, int head, int32_t j, int32_t prefetch_page, int rows,
                const float* q, const int32_t* visible, RowState state, float* logits,
                float* scratch) {
  const PageAddress at = AddressOf(kv, j);
  const float* bias = nullptr;
  if (kv.page_bias != nullptr) bias = kv.page_bias + int64_t{j} * kv.page_tokens;
  if (kv.token_bias != nullptr) bias = kv.token_bias + int64_t{kv.indices[j]} * kv.page_tokens;
  const PageAddress next = prefetch_page >= 0 ? AddressOf(kv, prefetch_page) : PageAddress{};
  const int bits = PageFormatBits(at.format);
  if (bits > 0) {
    QuantTokenRows tokens;
    tokens.page = at.page;
    tokens.bits = bits;
    tokens.group_size = kv.quant_group_size;
    tokens.page_tokens = kv.page_tokens;
    tokens.num_tokens = kv.PageTokens(head, j);
    tokens.bias = bias;
    tokens.prefetch = next.page;
    tokens.prefetch_bytes = next.bytes;
    AttendQuantRows(kv.head_dim, rows, q, visible, tokens, state, logits, scratch);
    return;
  }
  const DType dtype = PageFormatDType(at.format);
  TokenRows tokens;
  tokens.k = at.page;
  tokens.v = at.page + int64_t{kv.page_tokens} * kv.head_dim * DTypeSize(dtype);
  tokens.row_stride = kv.head_dim;
  tokens.num_tokens = kv.PageTokens(head, j);
  tokens.bias = bias;
  tokens.prefetch = next.page;
  tokens.prefetch_bytes = next.bytes;
  AttendRows(dtype, kv.head_dim, rows, q, visible, tokens, state, logits, scratch);
}

void Decode(const PagedKvView& kv, const DecodeArgs& args) {
  const int threads = ResolveThreads(args.num_threads);
  const int group = args.num_q_heads / kv.num_kv_heads;
  const int d = kv.head_dim;
  const float scale = args.scale != 0.0f ? args.scale : 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<float> q_scaled(int64_t{args.num_q_heads} * d);
  for (size_t i = 0; i < q_scaled.size(); ++i) q_scaled[i] = args.q[i] * scale;

  const bool want_stats = args.token_probs != nullptr || args.page_mass != nullptr;
  const int64_t total_pages = kv.indptr[kv.num_kv_heads];
  // Logits of every token for every query row of its group: [page][token][row].
  std::vector<float> logits(want_stats ? total_pages * kv.page_tokens * group : 0);

  const std::vector<Piece> pieces = SplitPages(kv, threads);
  std::vector<PartialStates> partials(pieces.size(), PartialStates(group, d));
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scratch(int64_t{kAttendScratchRows} * kv.page_tokens);
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < pieces.size(); ++i) {
      const Piece& piece = pieces[i];
      const float* q = q_scaled.data() + int64_t{piece.head} * group * d;
      for (int j = piece.page_begin; j < piece.page_end; ++j) {
        float* page_logits =
            want_stats ? logits.data() + int64_t{j} * kv.page_tokens * group : nullptr;
        // Prefetch kPrefetchPages ahead: pages of a head are scattered, so the hardware
        // prefetcher loses the stream at every page boundary.
        const int prefetch = j + kPrefetchPages < piece.page_end ? j + kPrefetchPages : -1;
        AttendPage(kv, piece.head, j, prefetch, group, q, nullptr, partials[i].state(), page_logits,
                   scratch.data());
      }
      partials[i].Finish(d);
    }
  }

  // Heads without pages have no pieces: zeros and -inf.
  for (int h = 0; h < kv.num_kv_heads; ++h) {
    if (kv.indptr[h + 1] > kv.indptr[h]) continue;
    std::fill_n(args.o + int64_t{h} * group * d, int64_t{group} * d, 0.0f);
    if (args.lse != nullptr) std::fill_n(args.lse + int64_t{h} * group, group, kNegInf);
  }
  std::vector<float> lse_storage;
  float* lse = args.lse;
  if (lse == nullptr && want_stats) {
    lse_storage.resize(args.num_q_heads);
    lse = lse_storage.data();
  }
  MergePieces(
      pieces, partials, kv.num_kv_heads, group, d,
      [group](int h, int r) { return int64_t{h} * group + r; }, args.o, lse, threads);
  if (!want_stats) return;

    // Probabilities need the final LSE of each query row, so they are computed after the merge.
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = 0; j < total_pages; ++j) {
    const int h = static_cast<int>(std::upper_bound(kv.indptr, kv.indptr + kv.num_kv_heads + 1,
                                                    static_cast<int32_t>(j)) -
                                   kv.indptr) -
                  1;
    const int valid = kv.PageTokens(h, static_cast<int32_t>(j));
    const float* page_lse = lse + int64_t{h} * group;
    double mass = 0.0;
    for (int t = 0; t < kv.page_tokens; ++t) {
      float prob = 0.0f;
      if (t < valid) {
        const float* row_logits = logits.data() + (j * kv.page_tokens + t) * group;
        for (int r = 0; r < group; ++r) prob += std::exp(row_logits[r] - page_lse[r]);
        prob /= static_cast<float>(group);
      }
      if (args.token_probs != nullptr) args.token_probs[j * kv.page_tokens + t] = prob;
      mass += prob;
    }
    if (args.page_mass != nullptr) args.page_mass[j] = static_cast<float>(mass);
  }
}

void PrefillRowwise(const PagedKvView& kv, const PrefillArgs& args) {
  const int threads = ResolveThreads(args.num_threads);
  const int group = args.num_q_heads / kv.num_kv_heads;
  const int d = kv.head_dim;
  const int t_new = args.num_tokens;
  const int rows = t_new * group;  // Query rows of one KV head: token-major, then group member.
  const float scale = args.scale != 0.0f ? args.scale : 1.0f / std::sqrt(static_cast<float>(d));

  // Per KV head, its query rows gathered contiguously and pre-scaled.
  std::vector<float> q_rows(int64_t{kv.num_kv_heads} * rows * d);
  for (int h = 0; h < kv.num_kv_heads; ++h) {
    for (int t = 0; t < t_new; ++t) {
      for (int j = 0; j < group; ++j) {
        const float* src = args.q + (int64_t{t} * args.num_q_heads + h * group + j) * d;
        float* dst = q_rows.data() + ((int64_t{h} * rows) + t * group + j) * d;
        for (int c = 0; c < d; ++c) dst[c] = src[c] * scale;
      }
    }
  }
  // Row r = t * group + j sees chunk tokens [0, t].
  std::vector<int32_t> visible(rows);
  for (int r = 0; r < rows; ++r) visible[r] = r / group + 1;

  // Pieces: runs of cached pages, then one piece per head for the chunk itself (page_begin ==
  // page_end == -1 marks it). Each head's pieces stay consecutive for MergePieces.
  std::vector<Piece> cached = SplitPages(kv, threads);
  std::vector<Piece> pieces;
  for (int h = 0, i = 0; h < kv.num_kv_heads; ++h) {
    while (i < static_cast<int>(cached.size()) && cached[i].head == h)
      pieces.push_back(cached[i++]);
    pieces.push_back(Piece{h, -1, -1});
  }
  std::vector<PartialStates> partials(pieces.size(), PartialStates(rows, d));
  const int64_t chunk_row_stride = int64_t{kv.num_kv_heads} * d;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scratch(int64_t{kAttendScratchRows} * std::max(kv.page_tokens, t_new));
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < pieces.size(); ++i) {
      const Piece& piece = pieces[i];
      const float* q = q_rows.data() + int64_t{piece.head} * rows * d;
      if (piece.page_begin < 0) {
        TokenRows chunk;
        const int64_t offset = int64_t{piece.head} * d * DTypeSize(kv.dtype);
        chunk.k = static_cast<const std::byte*>(args.k_new) + offset;
        chunk.v = static_cast<const std::byte*>(args.v_new) + offset;
        chunk.row_stride = chunk_row_stride;
        chunk.num_tokens = t_new;
        AttendRows(kv.dtype, d, rows, q, visible.data(), chunk, partials[i].state(), nullptr,
                   scratch.data());
      } else {
        for (int j = piece.page_begin; j < piece.page_end; ++j) {
          AttendPage(kv, piece.head, j, -1, rows, q, nullptr, partials[i].state(), nullptr,
                     scratch.data());
        }
      }
      partials[i].Finish(d);
    }
  }
  const int num_q_heads = args.num_q_heads;
  MergePieces(
      pieces, partials, kv.num_kv_heads, rows, d,
      [group, num_q_heads](int h, int r) {
        return int64_t{r / group} * num_q_heads + h * group + r % group;
      },
      args.o, args.lse, threads);
}

}  // namespace headwise::kernels::cpu
