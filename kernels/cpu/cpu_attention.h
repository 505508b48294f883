// Internal: the CPU backend's entry points behind kernels/attention.h. Arguments arrive
// validated (kernels/attention.cc); nothing here re-checks them.
#ifndef HEADWISE_KERNELS_CPU_CPU_ATTENTION_H_
#define HEADWISE_KERNELS_CPU_CPU_ATTENTION_H_

#include <cstdint>

#include "cachesvc/base/dtype.h"
#include "kernels/attention.h"

namespace headwise::kernels::cpu {

// Running softmax state of `rows` query rows: row r has max m[r], denominator l[r] and the
// un-normalized output o[r * head_dim ...]. Start from m = -inf, l = 0, o = 0.
struct RowState {
  float* m = nullptr;
  float* l = nullptr;
  float* o = nullptr;
};

// Token rows of K and V in the storage dtype: row t of K is at k + t * row_stride elements.
struct TokenRows {
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t row_stride = 0;       // Elements between consecutive tokens.
  int num_tokens = 0;           // n
  const float* bias = nullptr;  // [n] logit bias, or null.
  // Optional: bytes that will be read next (the next page), prefetched while these tokens are
  // scored so that scattered pages do not stall on memory latency.
  const std::byte* prefetch = nullptr;
  int64_t prefetch_bytes = 0;
};

// Folds tokens into the running state of `rows` query rows q[rows][head_dim] (already
// multiplied by the logit scale). Row r sees tokens [0, min(n, visible[r])) when `visible`
// is not null (causal masking of a prefill chunk), all n otherwise.
// When `logits` is not null, logits[t * rows + r] receives the logit of row r for token t
// (rows that do not see token t get -inf).
// `scratch` holds at least kAttendScratchRows * n floats.
void AttendRows(DType dtype, int head_dim, int rows, const float* q, const int32_t* visible,
                const TokenRows& tokens, RowState state, float* logits, float* scratch);
inline constexpr int kAttendScratchRows = 8;

// One KIVI page (kernels/cpu/quant_layout.h gives its parts): its first num_tokens rows.
struct QuantTokenRows {
  const std::byte* page = nullptr;
  int bits = 4;                         // 8, 4 or 2.
  int group_size = 32;                  // A multiple of 8 dividing page_tokens and head_dim.
  int page_tokens = 0;                  // P: the page's row capacity (its layout depends on it).
  int num_tokens = 0;                   // n <= P valid rows.
  const float* bias = nullptr;          // [n] logit bias, or null.
  const std::byte* prefetch = nullptr;  // As in TokenRows.
  int64_t prefetch_bytes = 0;
};

// AttendRows over a KIVI page, dequantizing in registers: keys through the query scaled by
// each channel's step (q . k̂ = (q ⊙ s_g) . codes + q . min_g), values through probabilities
// scaled by each token group's step, f32 accumulation. Same contract as AttendRows.
void AttendQuantRows(int head_dim, int rows, const float* q, const int32_t* visible,
                     const QuantTokenRows& tokens, RowState state, float* logits, float* scratch);

// Folds the valid tokens of CSR page `j` of KV head `head` into the rows' state, whatever the
// page's format (AttendRows or AttendQuantRows), with its bias; prefetches CSR page
// `prefetch_page` (-1: none) while it runs. `q`, `visible`, `logits` and `scratch` as in
// AttendRows.
void AttendPage(const PagedKvView& kv, int head, int32_t j, int32_t prefetch_page, int rows,
                const float* q, const int32_t* visible, RowState state, float* logits,
                float* scratch);

// Backend halves of kernels/attention.h, called after validation.
void Decode(const PagedKvView& kv, const DecodeArgs& args);
// The blocked (flash-attention style) prefill that PrefillAttention runs (prefill_tiled.cc).
void Prefill(const PagedKvView& kv, const PrefillArgs& args);
// The previous prefill: AttendRows over every cached page and over the whole chunk with a
// causal limit per row (no tiling of the chunk). Same results up to f32 rounding; kept for
// tests and for the benchmark's comparison.
void PrefillRowwise(const PagedKvView& kv, const PrefillArgs& args);
void MergeStates(const float* const* o_parts, const float* const* lse_parts, int num_parts,
                 int rows, int head_dim, float* o_out, float* lse_out);

}  // namespace headwise::kernels::cpu

#endif  // HEADWISE_KERNELS_CPU_CPU_ATTENTION_H_
