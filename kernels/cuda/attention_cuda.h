// CUDA backend of the attention kernels in kernels/attention.h.
//
// The contract (page layout, CSR page table, GQA mapping, f32 accumulation, merge rule) is the
// one in kernels/attention.h; this header states only what differs on the GPU.
//
// Memory: every pointer handed to these functions (the pool, the CSR arrays, token_bias, q, o,
// lse, token_probs, page_mass, and the arrays the merge parts point to) must address DEVICE
// memory (cudaMalloc, cudaMallocAsync or managed memory) of the current device. Host-side
// pointers are not detected: the kernels fault on them.
//
// Validation: only what can be checked on the host without copying device memory is checked,
// and returns INVALID_ARGUMENT: null required pointers, positive counts, num_q_heads a multiple
// of num_kv_heads, head_dim in the supported set, a known dtype. The CSR arrays live on the
// device and are NOT validated (monotone indptr, last_page_len or page_len in 1..page_tokens,
// slots in range); a malformed table is undefined behaviour. Either last_page_len or page_len
// must be non-null (INVALID_ARGUMENT otherwise); with page_len, last_page_len may be null. Validate
// it on the host, before upload, with kernels::ValidatePagedKvView.
//
// Mixed-precision views (PagedKvView::page_format, KIVI pages) and page_bias are not supported
// on the GPU yet: DecodeAttention returns UNIMPLEMENTED for them; the CPU backend reads them.
//
// Streams: `stream` is a cudaStream_t passed as void* so this header stays includable from
// plain C++ without the CUDA headers; nullptr is the legacy default stream. Work is enqueued
// asynchronously: on return the results are not ready; synchronize the stream before reading
// them. Errors reported by the CUDA runtime at enqueue time come back as a non-OK status
// (INTERNAL, RESOURCE_EXHAUSTED for allocation failures, FAILED_PRECONDITION when no usable
// device/driver); faults during execution surface at the next synchronizing call.
//
// Thread safety: reentrant. Concurrent calls on different streams are independent; calls on
// one stream run in enqueue order.
#ifndef HEADWISE_KERNELS_CUDA_ATTENTION_CUDA_H_
#define HEADWISE_KERNELS_CUDA_ATTENTION_CUDA_H_

#include "absl/status/status.h"
#include "kernels/attention.h"

namespace headwise::kernels::cuda {

// True when the CUDA runtime reports at least one device. "No device" (and no driver) is a
// normal answer, false, not an error: callers fall back to the CPU backend.
bool DeviceAvailable();

// head_dim values the CUDA kernels are compiled for: 8, 16, 32, 64, 96, 128, 256.
bool IsSupportedHeadDim(int head_dim);

// Tuning knobs of DecodeAttention. The results do not depend on them beyond f32 rounding.
struct DecodeOptions {
  // Number of splits of each KV head's page list (flash-decoding). Each split is reduced by
  // its own thread block into a partial (o, lse), and a second kernel merges the splits.
  // 0 picks enough splits to give every SM about two blocks; values are clamped to
  // [1, kMaxDecodeSplits]. A split never gets fewer than one page: heads with fewer pages than
  // splits use fewer splits. Default: 0.
  int num_splits = 0;
};
inline constexpr int kMaxDecodeSplits = 64;

// Decode attention on the GPU: the same result as kernels::DecodeAttention (o, optional lse,
// optional token_probs and page_mass, token_bias applied as an additive logit bias) for the
// same view and arguments, with every pointer in `kv` and `args` in device memory.
// args.num_threads is ignored. When num_splits > 1, or when token_probs/page_mass are asked
// for without lse, a workspace of about num_q_heads * num_splits * (head_dim + 1) floats is
// taken from the device's default memory pool (cudaMallocAsync) and released on `stream`.
// page_mass and token_probs are computed by a second pass over the keys, after the merge.
absl::Status DecodeAttention(const PagedKvView& kv, const DecodeArgs& args, void* stream,
                             const DecodeOptions& options = {});

// Device version of kernels::MergeAttentionStates. `o_parts` and `lse_parts` are HOST arrays of
// `num_parts` DEVICE pointers; `o_out` and `lse_out` are device pointers. lse_out may be null
// (the merged lse is then not written). o_out may alias o_parts[0] and lse_out may alias
// lse_parts[0]; other overlaps are undefined. num_parts >= 1, rows >= 1, head_dim >= 1.
absl::Status MergeAttentionStates(const float* const* o_parts, const float* const* lse_parts,
                                  int num_parts, int rows, int head_dim, float* o_out,
                                  float* lse_out, void* stream);

}  // namespace headwise::kernels::cuda

#endif  // HEADWISE_KERNELS_CUDA_ATTENTION_CUDA_H_
