// Split-KV (flash-decoding) paged decode attention. See attention_cuda.h for the contract.
//
// Pass 1, DecodeSplitKernel: block (kv head, split, query-head chunk) walks its share of the
//   head's CSR page list once and serves up to kMaxQueryChunk query heads of the GQA group
//   from each K/V row it loads. Each group of kTx lanes owns one token at a time (kVec
//   channels per lane, channel i * kTx + lane so loads coalesce) and keeps an online softmax
//   per query head in f32 registers; the groups are merged through shared memory at the end.
//   It writes o and lse directly when there is one split, otherwise a partial state per split.
// Pass 2, MergeSplitsKernel: merges the splits of each query head with the LSE rule.
// Pass 3 (only for token_probs/page_mass), TokenProbsKernel: recomputes the logits of each
//   token and turns them into probabilities with the merged lse, averaged over the group.
// Tokens per page follow PagedKvView: page_len[j] when given (any page may be partial), else
// full pages and last_page_len for each head's last; the loops only ever see a count.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "kernels/attention.h"
#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/check.h"

namespace headwise::kernels::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxQueryChunk = 8;  // Query heads served by one block of pass 1.

__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }

struct DecodeParams {
  const std::byte* pool;
  const int32_t* indptr;
  const int32_t* indices;
  const int32_t* last_page_len;  // Read only when page_len is null.
  const int32_t* page_len;       // Per CSR page position; null: the dense rule.
  const float* token_bias;       // May be null.
  const float* q;
  int page_tokens;
  int group_size;
  int num_splits;
  float scale;
  // Partial states [num_q_heads][num_splits][head_dim] and [num_q_heads][num_splits]; with one
  // split these are the caller's o and lse (lse may then be null).
  float* part_o;
  float* part_lse;
};

// The pages [*begin, *end) of `kv_head` that split `split` of `num_splits` covers. Splits past
// the head's page count get an empty range.
__device__ __forceinline__ void SplitPages(const int32_t* indptr, int kv_head, int split,
                                           int num_splits, int* begin, int* end) {
  const int first = indptr[kv_head];
  const int pages = indptr[kv_head + 1] - first;
  const int used = min(num_splits, pages);
  if (split >= used) {
    *begin = *end = first;
    return;
  }
  *begin = first + static_cast<int>(int64_t{pages} * split / used);
  *end = first + static_cast<int>(int64_t{pages} * (split + 1) / used);
}

// Valid tokens of CSR page position `page` (the last of its head is `last_page`): page_len when
// given, else full pages and last_page_len for the head's last (PagedKvView::PageTokens).
__device__ __forceinline__ int PageTokens(const int32_t* page_len, const int32_t* last_page_len,
                                          int kv_head, int page, int last_page, int page_tokens) {
  if (page_len != nullptr) return page_len[page];
  return page == last_page ? last_page_len[kv_head] : page_tokens;
}

template <typename T, int kTx, int kVec>
__global__ void __launch_bounds__(kThreads) DecodeSplitKernel(DecodeParams p) {
  constexpr int kHeadDim = kTx * kVec;
  constexpr int kGroupsPerWarp = 32 / kTx;
  constexpr int kGroups = kWarps * kGroupsPerWarp;
  __shared__ float s_m[kGroups][kMaxQueryChunk];
  __shared__ float s_l[kGroups][kMaxQueryChunk];
  __shared__ float s_acc[kGroups][kMaxQueryChunk][kHeadDim];

  const int kv_head = blockIdx.x;
  const int split = blockIdx.y;
  const int q_first = kv_head * p.group_size + blockIdx.z * kMaxQueryChunk;
  const int num_q =
      min(kMaxQueryChunk, p.group_size - static_cast<int>(blockIdx.z) * kMaxQueryChunk);
  const int lane = threadIdx.x % 32;
  const int tx = lane % kTx;
  const int group = threadIdx.x / kTx;
  // The lanes of this token group, for the shuffles of a partial warp.
  const unsigned mask = kTx == 32 ? 0xffffffffu : ((1u << (kTx % 32)) - 1u) << (lane / kTx * kTx);

  float q[kMaxQueryChunk][kVec];
#pragma unroll
  for (int j = 0; j < kMaxQueryChunk; ++j) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      q[j][i] = j < num_q ? p.q[int64_t{q_first + j} * kHeadDim + i * kTx + tx] : 0.0f;
    }
  }
  float m[kMaxQueryChunk];
  float l[kMaxQueryChunk];
  float acc[kMaxQueryChunk][kVec];
#pragma unroll
  for (int j = 0; j < kMaxQueryChunk; ++j) {
    m[j] = -INFINITY;
    l[j] = 0.0f;
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[j][i] = 0.0f;
  }

  int page_begin, page_end;
  SplitPages(p.indptr, kv_head, split, p.num_splits, &page_begin, &page_end);
  const int last_page = p.indptr[kv_head + 1] - 1;
  const int64_t page_elems = int64_t{2} * p.page_tokens * kHeadDim;
  for (int page = page_begin; page < page_end; ++page) {
    const int64_t slot = p.indices[page];
    const int tokens =
        PageTokens(p.page_len, p.last_page_len, kv_head, page, last_page, p.page_tokens);
    const T* k_block = reinterpret_cast<const T*>(p.pool) + slot * page_elems;
    const T* v_block = k_block + int64_t{p.page_tokens} * kHeadDim;
    const float* bias = p.token_bias == nullptr ? nullptr : p.token_bias + slot * p.page_tokens;
    for (int t = group; t < tokens; t += kGroups) {
      float k[kVec];
      float v[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        k[i] = ToFloat(k_block[int64_t{t} * kHeadDim + i * kTx + tx]);
        v[i] = ToFloat(v_block[int64_t{t} * kHeadDim + i * kTx + tx]);
      }
      const float b = bias == nullptr ? 0.0f : bias[t];
#pragma unroll
      for (int j = 0; j < kMaxQueryChunk; ++j) {
        if (j >= num_q) break;
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < kVec; ++i) dot = fmaf(q[j][i], k[i], dot);
#pragma unroll
        for (int offset = kTx / 2; offset > 0; offset /= 2) {
          dot += __shfl_xor_sync(mask, dot, offset);
        }
        const float logit = dot * p.scale + b;
        const float m_new = fmaxf(m[j], logit);
        if (m_new == -INFINITY) continue;  // Only -inf logits so far: nothing to add.
        const float correction = expf(m[j] - m_new);
        const float weight = expf(logit - m_new);
        l[j] = l[j] * correction + weight;
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[j][i] = fmaf(acc[j][i], correction, weight * v[i]);
        m[j] = m_new;
      }
    }
  }

#pragma unroll
  for (int j = 0; j < kMaxQueryChunk; ++j) {
    if (tx == 0) {
      s_m[group][j] = m[j];
      s_l[group][j] = l[j];
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) s_acc[group][j][i * kTx + tx] = acc[j][i];
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < num_q * kHeadDim; idx += kThreads) {
    const int j = idx / kHeadDim;
    const int d = idx % kHeadDim;
    float m_max = -INFINITY;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) m_max = fmaxf(m_max, s_m[g][j]);
    float out = 0.0f;
    float lse = -INFINITY;
    if (m_max != -INFINITY) {
      float sum = 0.0f;
      float weighted = 0.0f;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        if (s_m[g][j] == -INFINITY) continue;
        const float w = expf(s_m[g][j] - m_max);
        sum = fmaf(s_l[g][j], w, sum);
        weighted = fmaf(s_acc[g][j][d], w, weighted);
      }
      out = weighted / sum;
      lse = m_max + logf(sum);
    }
    const int64_t row = int64_t{q_first + j} * p.num_splits + split;
    p.part_o[row * kHeadDim + d] = out;
    if (d == 0 && p.part_lse != nullptr) p.part_lse[row] = lse;
  }
}

// One block per query head: o = sum_s e^{lse_s - lse} o_s over the head's splits.
__global__ void MergeSplitsKernel(const float* part_o, const float* part_lse, int num_splits,
                                  int head_dim, float* o, float* lse) {
  __shared__ float s_weight[kMaxDecodeSplits];
  __shared__ float s_lse;
  const int64_t head = blockIdx.x;
  const float* head_lse = part_lse + head * num_splits;
  if (threadIdx.x == 0) {
    float m_max = -INFINITY;
    for (int s = 0; s < num_splits; ++s) m_max = fmaxf(m_max, head_lse[s]);
    float sum = 0.0f;
    for (int s = 0; s < num_splits; ++s) {
      s_weight[s] = m_max == -INFINITY ? 0.0f : expf(head_lse[s] - m_max);
      sum += s_weight[s];
    }
    for (int s = 0; s < num_splits; ++s) s_weight[s] = sum > 0.0f ? s_weight[s] / sum : 0.0f;
    s_lse = sum > 0.0f ? m_max + logf(sum) : -INFINITY;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float out = 0.0f;
    for (int s = 0; s < num_splits; ++s) {
      if (s_weight[s] != 0.0f)
        out = fmaf(s_weight[s], part_o[(head * num_splits + s) * head_dim + d], out);
    }
    o[head * head_dim + d] = out;
  }
  if (threadIdx.x == 0 && lse != nullptr) lse[head] = s_lse;
}

struct TokenProbsParams {
  const std::byte* pool;
  const int32_t* indptr;
  const int32_t* indices;
  const int32_t* last_page_len;
  const int32_t* page_len;
  const float* token_bias;
  const float* q;
  const float* lse;  // Merged lse per query head.
  int page_tokens;
  int head_dim;
  int group_size;
  int num_splits;
  float scale;
  float* token_probs;  // May be null.
  float* page_mass;    // May be null.
};

// Block (kv head, split); each warp owns one token at a time and loops over the group's query
// heads. The block walks the split's pages together so it can sum each page's mass.
template <typename T>
__global__ void __launch_bounds__(kThreads) TokenProbsKernel(TokenProbsParams p) {
  __shared__ float s_mass[kWarps];
  const int kv_head = blockIdx.x;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int q_first = kv_head * p.group_size;
  const float inv_group = 1.0f / p.group_size;
  int page_begin, page_end;
  SplitPages(p.indptr, kv_head, blockIdx.y, p.num_splits, &page_begin, &page_end);
  const int last_page = p.indptr[kv_head + 1] - 1;
  const int64_t page_elems = int64_t{2} * p.page_tokens * p.head_dim;
  for (int page = page_begin; page < page_end; ++page) {
    const int64_t slot = p.indices[page];
    const int tokens =
        PageTokens(p.page_len, p.last_page_len, kv_head, page, last_page, p.page_tokens);
    const T* k_block = reinterpret_cast<const T*>(p.pool) + slot * page_elems;
    const float* bias = p.token_bias == nullptr ? nullptr : p.token_bias + slot * p.page_tokens;
    float mass = 0.0f;
    for (int t = warp; t < p.page_tokens; t += kWarps) {
      float prob = 0.0f;
      if (t < tokens) {
        const T* k = k_block + int64_t{t} * p.head_dim;
        const float b = bias == nullptr ? 0.0f : bias[t];
        for (int j = 0; j < p.group_size; ++j) {
          const float* qj = p.q + int64_t{q_first + j} * p.head_dim;
          float dot = 0.0f;
          for (int d = lane; d < p.head_dim; d += 32) dot = fmaf(qj[d], ToFloat(k[d]), dot);
#pragma unroll
          for (int offset = 16; offset > 0; offset /= 2) {
            dot += __shfl_xor_sync(0xffffffffu, dot, offset);
          }
          prob += expf(dot * p.scale + b - p.lse[q_first + j]);
        }
        prob *= inv_group;
      }
      if (lane == 0) {
        if (p.token_probs != nullptr) p.token_probs[int64_t{page} * p.page_tokens + t] = prob;
        mass += prob;
      }
    }
    if (p.page_mass != nullptr) {
      if (lane == 0) s_mass[warp] = mass;
      __syncthreads();
      if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int w = 0; w < kWarps; ++w) total += s_mass[w];
        p.page_mass[page] = total;
      }
      __syncthreads();  // s_mass is reused by the next page.
    }
  }
}

template <typename T, int kTx, int kVec>
void LaunchSplit(const DecodeParams& params, dim3 grid, cudaStream_t stream) {
  DecodeSplitKernel<T, kTx, kVec><<<grid, kThreads, 0, stream>>>(params);
}

// Runtime head_dim -> the one instantiation that serves it.
template <typename T>
absl::Status LaunchSplitForHeadDim(int head_dim, const DecodeParams& params, dim3 grid,
                                   cudaStream_t stream) {
  switch (head_dim) {
    case 8:
      LaunchSplit<T, 8, 1>(params, grid, stream);
      break;
    case 16:
      LaunchSplit<T, 16, 1>(params, grid, stream);
      break;
    case 32:
      LaunchSplit<T, 32, 1>(params, grid, stream);
      break;
    case 64:
      LaunchSplit<T, 32, 2>(params, grid, stream);
      break;
    case 96:
      LaunchSplit<T, 32, 3>(params, grid, stream);
      break;
    case 128:
      LaunchSplit<T, 32, 4>(params, grid, stream);
      break;
    case 256:
      LaunchSplit<T, 32, 8>(params, grid, stream);
      break;
    default:
      return absl::InvalidArgumentError("unsupported head_dim");
  }
  HEADWISE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status LaunchDecodeSplits(DType dtype, int head_dim, const DecodeParams& params, dim3 grid,
                                cudaStream_t stream) {
  switch (dtype) {
    case DType::kF32:
      return LaunchSplitForHeadDim<float>(head_dim, params, grid, stream);
    case DType::kF16:
      return LaunchSplitForHeadDim<__half>(head_dim, params, grid, stream);
    case DType::kBF16:
      return LaunchSplitForHeadDim<__nv_bfloat16>(head_dim, params, grid, stream);
  }
  return absl::InvalidArgumentError("unknown dtype");
}

absl::Status ValidateDecode(const PagedKvView& kv, const DecodeArgs& args) {
  if (kv.page_format != nullptr || kv.page_bias != nullptr) {
    return absl::UnimplementedError(
        "CUDA decode: mixed-precision views (page_format) and page_bias are CPU-only for now");
  }
  if (kv.pool == nullptr || kv.indptr == nullptr || kv.indices == nullptr) {
    return absl::InvalidArgumentError("PagedKvView: null pool, indptr or indices");
  }
  if (kv.last_page_len == nullptr && kv.page_len == nullptr) {
    return absl::InvalidArgumentError("PagedKvView: last_page_len is required without page_len");
  }
  if (kv.num_kv_heads <= 0 || kv.page_tokens <= 0) {
    return absl::InvalidArgumentError("PagedKvView: num_kv_heads and page_tokens must be > 0");
  }
  if (!IsSupportedHeadDim(kv.head_dim)) {
    return absl::InvalidArgumentError(absl::StrCat("CUDA decode: head_dim ", kv.head_dim,
                                                   " not in {8, 16, 32, 64, 96, 128, 256}"));
  }
  if (kv.dtype != DType::kF32 && kv.dtype != DType::kF16 && kv.dtype != DType::kBF16) {
    return absl::InvalidArgumentError("CUDA decode: unknown dtype");
  }
  if (args.q == nullptr || args.o == nullptr) {
    return absl::InvalidArgumentError("DecodeArgs: null q or o");
  }
  if (args.num_q_heads <= 0 || args.num_q_heads % kv.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("DecodeArgs: num_q_heads ", args.num_q_heads,
                                                   " is not a positive multiple of num_kv_heads ",
                                                   kv.num_kv_heads));
  }
  if (!std::isfinite(args.scale)) {
    return absl::InvalidArgumentError("DecodeArgs: scale must be finite");
  }
  return absl::OkStatus();
}

// Splits per KV head when the caller leaves it to us: about two blocks per SM in pass 1.
absl::StatusOr<int> AutoSplits(int blocks_per_split) {
  int device = 0;
  HEADWISE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  int sms = 0;
  HEADWISE_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return (2 * sms + blocks_per_split - 1) / blocks_per_split;
}

}  // namespace

absl::Status DecodeAttention(const PagedKvView& kv, const DecodeArgs& args, void* stream,
                             const DecodeOptions& options) {
  absl::Status valid = ValidateDecode(kv, args);
  if (!valid.ok()) return valid;
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  const int group_size = args.num_q_heads / kv.num_kv_heads;
  const int query_chunks = (group_size + kMaxQueryChunk - 1) / kMaxQueryChunk;

  int num_splits = options.num_splits;
  if (num_splits <= 0) {
    absl::StatusOr<int> splits = AutoSplits(kv.num_kv_heads * query_chunks);
    if (!splits.ok()) return splits.status();
    num_splits = *splits;
  }
  num_splits = std::clamp(num_splits, 1, kMaxDecodeSplits);
  const bool want_probs = args.token_probs != nullptr || args.page_mass != nullptr;

  // Workspace: the partial states when split, and a merged lse when probabilities need one
  // the caller did not ask for.
  const int64_t part_floats =
      num_splits > 1 ? int64_t{args.num_q_heads} * num_splits * (kv.head_dim + 1) : 0;
  const int64_t lse_floats = want_probs && args.lse == nullptr ? args.num_q_heads : 0;
  float* workspace = nullptr;
  if (part_floats + lse_floats > 0) {
    HEADWISE_CUDA_RETURN_IF_ERROR(cudaMallocAsync(reinterpret_cast<void**>(&workspace),
                                                  (part_floats + lse_floats) * sizeof(float),
                                                  cuda_stream));
  }
  float* merged_lse = lse_floats > 0 ? workspace + part_floats : args.lse;

  DecodeParams params;
  params.pool = kv.pool;
  params.indptr = kv.indptr;
  params.indices = kv.indices;
  params.last_page_len = kv.last_page_len;
  params.page_len = kv.page_len;
  params.token_bias = kv.token_bias;
  params.q = args.q;
  params.page_tokens = kv.page_tokens;
  params.group_size = group_size;
  params.num_splits = num_splits;
  params.scale =
      args.scale != 0.0f ? args.scale : 1.0f / std::sqrt(static_cast<float>(kv.head_dim));
  if (num_splits > 1) {
    params.part_o = workspace;
    params.part_lse = workspace + int64_t{args.num_q_heads} * num_splits * kv.head_dim;
  } else {
    params.part_o = args.o;
    params.part_lse = merged_lse;
  }

  const dim3 grid(kv.num_kv_heads, num_splits, query_chunks);
  absl::Status status = LaunchDecodeSplits(kv.dtype, kv.head_dim, params, grid, cuda_stream);
  if (status.ok() && num_splits > 1) {
    MergeSplitsKernel<<<args.num_q_heads, std::min(kv.head_dim, kThreads), 0, cuda_stream>>>(
        params.part_o, params.part_lse, num_splits, kv.head_dim, args.o, merged_lse);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) {
      status.Update(CudaErrorToStatus(error, "MergeSplitsKernel", __FILE__, __LINE__));
    }
  }
  if (status.ok() && want_probs) {
    TokenProbsParams probs;
    probs.pool = kv.pool;
    probs.indptr = kv.indptr;
    probs.indices = kv.indices;
    probs.last_page_len = kv.last_page_len;
    probs.page_len = kv.page_len;
    probs.token_bias = kv.token_bias;
    probs.q = args.q;
    probs.lse = merged_lse;
    probs.page_tokens = kv.page_tokens;
    probs.head_dim = kv.head_dim;
    probs.group_size = group_size;
    probs.num_splits = num_splits;
    probs.scale = params.scale;
    probs.token_probs = args.token_probs;
    probs.page_mass = args.page_mass;
    const dim3 probs_grid(kv.num_kv_heads, num_splits);
    switch (kv.dtype) {
      case DType::kF32:
        TokenProbsKernel<float><<<probs_grid, kThreads, 0, cuda_stream>>>(probs);
        break;
      case DType::kF16:
        TokenProbsKernel<__half><<<probs_grid, kThreads, 0, cuda_stream>>>(probs);
        break;
      case DType::kBF16:
        TokenProbsKernel<__nv_bfloat16><<<probs_grid, kThreads, 0, cuda_stream>>>(probs);
        break;
    }
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) {
      status.Update(CudaErrorToStatus(error, "TokenProbsKernel", __FILE__, __LINE__));
    }
  }
  if (workspace != nullptr) {
    // Stream-ordered: freed after the kernels above have run.
    const cudaError_t error = cudaFreeAsync(workspace, cuda_stream);
    if (error != cudaSuccess) {
      status.Update(CudaErrorToStatus(error, "cudaFreeAsync(workspace)", __FILE__, __LINE__));
    }
  }
  return status;
}

}  // namespace headwise::kernels::cuda
