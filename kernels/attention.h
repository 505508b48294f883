// Backend-neutral attention kernels over head-wise paged KV.
//
// Every operation here validates its arguments and returns INVALID_ARGUMENT for mismatched or
// unsupported shapes and null required pointers; none crashes on bad arguments. Scores and
// outputs are accumulated in f32 whatever the storage dtype.
//
// Memory layout (see docs/kernels.md):
//   * A page holds `page_tokens` consecutive tokens of ONE (layer, kv head): the K block
//     [page_tokens][head_dim], then the V block [page_tokens][head_dim], in the storage dtype.
//     Page slot `s` starts at `pool + s * PageBytes(...)`.
//   * The page table of one sequence and one layer is in CSR form over KV heads (FlashInfer's
//     paged_kv_t): the pages of KV head `h` are CSR page positions j in [indptr[h], indptr[h+1])
//     in token order, page j living in slot indices[j]. A head with no pages has no tokens.
//   * Tokens per page, one of two modes:
//       - page_len == nullptr (dense heads): every page is full (P tokens) except each head's
//         last, which holds last_page_len[h] tokens (1..P);
//       - page_len != nullptr (sparse heads, after token-level eviction or compaction, or a
//         page selector's subset): page j holds its first page_len[j] rows (1..P), any page may
//         be partial, and last_page_len is ignored (it may be null).
//     In both modes the valid tokens of a page are its rows 0..n-1; rows n..P-1 are never read.
//     Attention depends only on the set of valid tokens (up to f32 rounding), not on which
//     page holds them.
//   * Query head `qh` is served by KV head `qh / group_size` (GQA).
//
// Thread safety: all functions are reentrant; they read their inputs and write only their
// outputs. `num_threads` > 1 runs an OpenMP team inside the call.
#ifndef HEADWISE_KERNELS_ATTENTION_H_
#define HEADWISE_KERNELS_ATTENTION_H_

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "cachesvc/base/dtype.h"

namespace headwise::kernels {

// Bytes of one page slot: K and V blocks of `page_tokens` x `head_dim` in `dtype`.
constexpr int64_t PageBytes(int page_tokens, int head_dim, DType dtype) {
  return 2 * int64_t{page_tokens} * head_dim * static_cast<int64_t>(DTypeSize(dtype));
}

// A page's own storage precision (mixed-precision heads, policies.md §8.3): K and V in a float
// dtype (PageBytes), or KIVI codes with per-group scales and minimums (QuantizedPageBytes, the
// layout in docs/kernels.md). The values are stable: they travel in page tables.
enum class PageFormat : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2, kInt8 = 3, kInt4 = 4, kInt2 = 5 };
inline constexpr int kNumPageFormats = 6;

// The float format of `dtype`.
constexpr PageFormat FloatPageFormat(DType dtype) {
  return dtype == DType::kF32 ? PageFormat::kF32
                              : (dtype == DType::kBF16 ? PageFormat::kBF16 : PageFormat::kF16);
}
// Bits per code of a KIVI format (8, 4, 2); 0 for the float formats.
constexpr int PageFormatBits(PageFormat f) {
  return f == PageFormat::kInt8 ? 8 : f == PageFormat::kInt4 ? 4 : f == PageFormat::kInt2 ? 2 : 0;
}
// The dtype of a float format; for a KIVI format, kF32 (what its codes decode to).
constexpr DType PageFormatDType(PageFormat f) {
  return f == PageFormat::kF16 ? DType::kF16 : f == PageFormat::kBF16 ? DType::kBF16 : DType::kF32;
}
// "f32", "f16", "bf16", "int8", "int4", "int2".
const char* PageFormatName(PageFormat f);

// Bytes of one page slot of format `f`; KIVI formats use `group_size` (QuantParams). 0 for an
// unsupported shape.
int64_t FormatPageBytes(PageFormat f, int page_tokens, int head_dim, int group_size);

// A read-only view of one sequence's paged KV for one layer. Plain pointers and counts: the
// same struct describes host and device memory.
struct PagedKvView {
  const std::byte* pool = nullptr;         // Base of the page slots.
  const int32_t* indptr = nullptr;         // [num_kv_heads + 1], non-decreasing, indptr[0] = 0.
  const int32_t* indices = nullptr;        // [indptr[num_kv_heads]] page slots.
  const int32_t* last_page_len = nullptr;  // [num_kv_heads], 1..page_tokens where pages exist.
                                           // Required unless page_len is set; then ignored.
  // Optional per-page token counts, indexed by CSR page position j: [indptr[num_kv_heads]],
  // each 1..page_tokens. Null: the dense rule (full pages, last_page_len for each last page).
  const int32_t* page_len = nullptr;
  // Optional per-token logit bias, indexed like the pool: bias[slot * page_tokens + t].
  // A token that stands for n merged tokens carries ln(n). Null: no bias.
  const float* token_bias = nullptr;
  // Optional per-token logit bias indexed by CSR page position instead: page_bias[j *
  // page_tokens + t] for token t of page j (the bias belongs to the page, whatever pool holds
  // it). At most one of token_bias and page_bias; required instead of token_bias for a bias on
  // a mixed-precision view (page_format set), whose slot numbers are per pool.
  const float* page_bias = nullptr;
  // Optional mixed precision: page j is stored in format page_format[j] (a PageFormat value),
  // in slot indices[j] of format_pool[page_format[j]], a pool of format_slots[...] slots of
  // FormatPageBytes(format, page_tokens, head_dim, quant_group_size) bytes each. `pool` and
  // `num_slots` are then not used; `dtype` is still the dtype of a prefill chunk's k_new/v_new.
  // KIVI pages (int8/int4/int2) are attended directly, dequantized in registers, and must be
  // quantized from full pages (QuantizePage; rows past the page's valid count are not read).
  // Null: every page is in `dtype` in `pool` (the single-precision view).
  const uint8_t* page_format = nullptr;  // [indptr[num_kv_heads]]
  const std::byte* format_pool[kNumPageFormats] = {};
  int64_t format_slots[kNumPageFormats] = {};  // 0 for a format no page uses.
  // QuantParams::group_size of every KIVI page of the view: a multiple of 8 that divides
  // page_tokens and head_dim. Read only when some page is KIVI.
  int quant_group_size = 32;
  int64_t num_slots = 0;  // Slots in the pool; every index must be below it.
  int num_kv_heads = 0;
  int page_tokens = 0;
  int head_dim = 0;
  DType dtype = DType::kF16;

  // Valid tokens of CSR page position `j`, a page of KV head `h` (requires a validated view).
  int PageTokens(int h, int32_t j) const {
    if (page_len != nullptr) return page_len[j];
    return j + 1 == indptr[h + 1] ? last_page_len[h] : page_tokens;
  }
  // Tokens held by KV head `h` (requires a validated view). O(1) for dense heads, O(pages of
  // the head) with page_len.
  int64_t HeadTokens(int h) const {
    const int32_t pages = indptr[h + 1] - indptr[h];
    if (pages == 0) return 0;
    if (page_len == nullptr) return int64_t{pages - 1} * page_tokens + last_page_len[h];
    int64_t n = 0;
    for (int32_t j = indptr[h]; j < indptr[h + 1]; ++j) n += page_len[j];
    return n;
  }
};

// OK when the view is well formed: positive sizes, supported head_dim and dtype, non-null
// arrays (last_page_len only when page_len is null), indptr non-decreasing from 0, token
// counts in 1..page_tokens (page_len for every page when set, otherwise last_page_len for
// heads with pages), every index in [0, num_slots). Mixed views also need a known format for
// every page, a non-null pool with the slot inside format_slots for every format in use, no
// token_bias, and a valid quant_group_size when a KIVI page is present. Reads the CSR arrays
// (and page_format), so they must be host memory.
absl::Status ValidatePagedKvView(const PagedKvView& kv);

// Decode attention: one query token per query head over all cached tokens of one layer.
struct DecodeArgs {
  const float* q = nullptr;  // [num_q_heads][head_dim], required.
  int num_q_heads = 0;       // A positive multiple of kv.num_kv_heads.
  float scale = 0.0f;        // Logit scale; 0 means 1/sqrt(head_dim).
  float* o = nullptr;        // [num_q_heads][head_dim], required. Zeros for a head with no tokens.
  float* lse = nullptr;      // [num_q_heads] natural-log sum of exp(logits); -inf if no tokens.
                             // Optional.
  // Optional policy statistics, for every page of the view. Both are indexed by CSR page
  // position j (0..indptr[H]); page j belongs to KV head h, whose GQA group is the g =
  // num_q_heads / num_kv_heads query heads h*g .. h*g+g-1. With p_r(i) the softmax probability
  // query head r gives token i over all tokens of its KV head in this view (token_bias
  // included, so a merged token's probability is that of the n tokens it stands for):
  //   token_probs[j * page_tokens + t] = (1/g) * sum over r of p_r(token t of page j), the MEAN
  //     over the group (not the sum), for the page's valid rows t; rows past the page's valid
  //     count (page_len[j], or last_page_len on a dense head's last page) are set to 0;
  //   page_mass[j] = the sum of token_probs over the page's valid rows.
  // So the token_probs of one KV head sum to 1 (and so do its page_mass), whatever g is.
  float* token_probs = nullptr;  // [indptr[H] * page_tokens], optional.
  float* page_mass = nullptr;    // [indptr[H]], optional.
  int num_threads = 1;           // OpenMP threads for this call; <= 0 means omp_get_max_threads().
};
absl::Status DecodeAttention(const PagedKvView& kv, const DecodeArgs& args);

// Chunked causal prefill: T new tokens whose K/V are given densely attend to every cached
// token of `kv` (either token-count mode) plus the chunk's tokens up to and including their
// own position. The result equals T decode steps in which the chunk's tokens were appended one
// at a time.
struct PrefillArgs {
  int num_tokens = 0;           // T >= 1.
  const float* q = nullptr;     // [T][num_q_heads][head_dim], required.
  const void* k_new = nullptr;  // [T][num_kv_heads][head_dim] in kv.dtype, required.
  const void* v_new = nullptr;  // [T][num_kv_heads][head_dim] in kv.dtype, required.
  int num_q_heads = 0;
  float scale = 0.0f;    // 0 means 1/sqrt(head_dim).
  float* o = nullptr;    // [T][num_q_heads][head_dim], required.
  float* lse = nullptr;  // [T][num_q_heads], optional.
  int num_threads = 1;
  // Optional. When it reads true the kernel starts no further tile and PrefillAttention returns
  // CANCELLED (outputs then undefined); checked between tiles, so a cancel takes effect within
  // one tile's work.
  const std::atomic<bool>* cancel = nullptr;
};
absl::Status PrefillAttention(const PagedKvView& kv, const PrefillArgs& args);

// SnapKV's observation-window vote (policies.md §5.5) for a prefill chunk, computed as the
// prefill attends: window row t (one of the chunk's last min(window, T) tokens) sees every
// cached token of its kv head in `kv` and the chunk's tokens 0..t. With p_{r,t}(j) the softmax
// probability query head r of row t gives token j (token_bias included), each token's vote is
//   vote(j) = Σ_{t in window} (1/g) Σ_{r in the group} p_{r,t}(j)
// (the group mean, §0.3, summed over the window). Rows past a cached page's valid count are 0.
struct WindowVoteArgs {
  int num_tokens = 0;             // T >= 1, the chunk.
  int window = 0;                 // w >= 1.
  const float* q = nullptr;       // [T][num_q_heads][head_dim], required.
  const void* k_new = nullptr;    // [T][num_kv_heads][head_dim] in kv.dtype, required.
  int num_q_heads = 0;            // A positive multiple of kv.num_kv_heads.
  float scale = 0.0f;             // 0 means 1/sqrt(head_dim).
  float* cached_votes = nullptr;  // [indptr[H] * page_tokens], by CSR page j and row; required.
  float* chunk_votes = nullptr;   // [num_kv_heads][T]; required.
  int num_threads = 1;            // OpenMP threads over kv heads.
};
absl::Status PrefillWindowVotes(const PagedKvView& kv, const WindowVoteArgs& args);

// Merges partial attention states computed over disjoint token sets (FlashAttention's
// merge_state, policies.md §0.2): lse = ln(sum_i e^{lse_i}), o = sum_i e^{lse_i - lse} o_i.
// A part with lse = -inf (no tokens) contributes nothing; if all are -inf, o = 0, lse = -inf.
// Each part holds `rows` states of `head_dim` floats. `o_out` may alias o_parts[0].
absl::Status MergeAttentionStates(const float* const* o_parts, const float* const* lse_parts,
                                  int num_parts, int rows, int head_dim, float* o_out,
                                  float* lse_out);

// Per-channel min and max of the keys of one page (Quest bounds): the first `tokens` rows of
// the K block. kmin and kmax hold head_dim floats each.
absl::Status ComputeKeyBounds(const std::byte* page, DType dtype, int page_tokens, int tokens,
                              int head_dim, float* kmin, float* kmax);

// KIVI-style asymmetric quantization of one page (policies.md §8.1). Keys are quantized per
// channel with groups of `group_size` consecutive tokens; values per token with groups of
// `group_size` consecutive channels. Each group stores a float scale and minimum;
// x̂ = code * scale + min with code = clamp(round((x - min) / scale), 0, 2^bits - 1).
struct QuantParams {
  int bits = 4;         // 2, 4 or 8.
  int group_size = 32;  // Divides page_tokens (keys) and head_dim (values); <= both.
};

// Bytes of a quantized page for the given shape: packed codes of K and V, then per-group
// scales and minimums as f32. The exact layout is in docs/kernels.md.
int64_t QuantizedPageBytes(int page_tokens, int head_dim, const QuantParams& params);

// Quantizes the full page (all page_tokens rows) at `page` into `out` (QuantizedPageBytes).
absl::Status QuantizePage(const std::byte* page, DType dtype, int page_tokens, int head_dim,
                          const QuantParams& params, std::byte* out);
// Inverse: writes a page in `dtype` (PageBytes) at `page`.
absl::Status DequantizePage(const std::byte* quantized, int page_tokens, int head_dim,
                            const QuantParams& params, DType dtype, std::byte* page);

// Merges n tokens into one representative: count-weighted means
//   k̄ = Σ c_i k_i / Σ c_i,  v̄ = Σ c_i v_i / Σ c_i,  bias = ln Σ c_i,
// where c_i is counts[i] (tokens already standing for several merged tokens) or 1 when
// counts is null. k and v are [n][head_dim] in `dtype`; k_out, v_out are written in `dtype`;
// the attention kernels apply `bias` through PagedKvView::token_bias.
absl::Status MergeTokens(const std::byte* k, const std::byte* v, const float* counts, int n,
                         int head_dim, DType dtype, std::byte* k_out, std::byte* v_out,
                         float* bias_out);

}  // namespace headwise::kernels

#endif  // HEADWISE_KERNELS_ATTENTION_H_
