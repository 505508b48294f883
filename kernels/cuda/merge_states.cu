// Device MergeAttentionStates. See attention_cuda.h for the contract.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/check.h"

namespace headwise::kernels::cuda {
namespace {

constexpr int kThreads = 128;
// Parts merged by one launch; their pointers travel by value in the kernel parameters, so no
// host-to-device copy is needed. More parts are folded in by further launches.
constexpr int kMaxPartsPerLaunch = 16;

struct MergeParts {
  const float* o[kMaxPartsPerLaunch];
  const float* lse[kMaxPartsPerLaunch];
  int count;
};

// One block per row. Thread 0 reads every part's lse before the barrier and writes the merged
// lse after it, and each thread reads o[row][d] of every part before writing o_out[row][d], so
// o_out and lse_out may alias part 0.
__global__ void __launch_bounds__(kThreads)
    MergeStatesKernel(MergeParts parts, int head_dim, float* o_out, float* lse_out) {
  __shared__ float s_weight[kMaxPartsPerLaunch];
  __shared__ float s_lse;
  const int64_t row = blockIdx.x;
  if (threadIdx.x == 0) {
    float m_max = -INFINITY;
    for (int i = 0; i < parts.count; ++i) m_max = fmaxf(m_max, parts.lse[i][row]);
    float sum = 0.0f;
    for (int i = 0; i < parts.count; ++i) {
      s_weight[i] = m_max == -INFINITY ? 0.0f : expf(parts.lse[i][row] - m_max);
      sum += s_weight[i];
    }
    for (int i = 0; i < parts.count; ++i) s_weight[i] = sum > 0.0f ? s_weight[i] / sum : 0.0f;
    s_lse = sum > 0.0f ? m_max + logf(sum) : -INFINITY;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float out = 0.0f;
    for (int i = 0; i < parts.count; ++i) {
      // A part without tokens contributes nothing, whatever its o holds.
      if (s_weight[i] != 0.0f) out = fmaf(s_weight[i], parts.o[i][row * head_dim + d], out);
    }
    o_out[row * head_dim + d] = out;
  }
  if (threadIdx.x == 0 && lse_out != nullptr) lse_out[row] = s_lse;
}

}  // namespace

absl::Status MergeAttentionStates(const float* const* o_parts, const float* const* lse_parts,
                                  int num_parts, int rows, int head_dim, float* o_out,
                                  float* lse_out, void* stream) {
  if (o_parts == nullptr || lse_parts == nullptr || o_out == nullptr) {
    return absl::InvalidArgumentError("MergeAttentionStates: null o_parts, lse_parts or o_out");
  }
  if (num_parts < 1 || rows < 1 || head_dim < 1) {
    return absl::InvalidArgumentError(
        "MergeAttentionStates: num_parts, rows and head_dim must be >= 1");
  }
  for (int i = 0; i < num_parts; ++i) {
    if (o_parts[i] == nullptr || lse_parts[i] == nullptr) {
      return absl::InvalidArgumentError("MergeAttentionStates: null part pointer");
    }
  }
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  // With more parts than one launch takes, the running result is part 0 of the next launch,
  // so it needs an lse even when the caller did not ask for one.
  float* lse_acc = lse_out;
  if (lse_acc == nullptr && num_parts > kMaxPartsPerLaunch) {
    HEADWISE_CUDA_RETURN_IF_ERROR(cudaMallocAsync(reinterpret_cast<void**>(&lse_acc),
                                                  int64_t{rows} * sizeof(float), cuda_stream));
  }
  absl::Status status;
  int next = 0;
  while (status.ok() && next < num_parts) {
    MergeParts parts;
    parts.count = 0;
    if (next > 0) {
      parts.o[0] = o_out;
      parts.lse[0] = lse_acc;
      parts.count = 1;
    }
    while (parts.count < kMaxPartsPerLaunch && next < num_parts) {
      parts.o[parts.count] = o_parts[next];
      parts.lse[parts.count] = lse_parts[next];
      ++parts.count;
      ++next;
    }
    MergeStatesKernel<<<rows, std::min(head_dim, kThreads), 0, cuda_stream>>>(
        parts, head_dim, o_out, next < num_parts ? lse_acc : lse_out);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) {
      status.Update(CudaErrorToStatus(error, "MergeStatesKernel", __FILE__, __LINE__));
    }
  }
  if (lse_acc != lse_out) {
    const cudaError_t error = cudaFreeAsync(lse_acc, cuda_stream);
    if (error != cudaSuccess) {
      status.Update(CudaErrorToStatus(error, "cudaFreeAsync(lse)", __FILE__, __LINE__));
    }
  }
  return status;
}

}  // namespace headwise::kernels::cuda
