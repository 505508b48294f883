#include "kernels/cuda/attention_cuda.h"

#include <cuda_runtime_api.h>

#include "cachesvc/base/layout.h"

namespace headwise::kernels::cuda {

bool DeviceAvailable() {
  int count = 0;
  // cudaErrorNoDevice / cudaErrorInsufficientDriver are the expected answers on a machine
  // without a GPU; any error means "not available" here.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // Reset the (non-sticky) error so later launch checks start clean.
    return false;
  }
  return count > 0;
}

// decode.cu instantiates its kernels for exactly the head dims the layout accepts.
bool IsSupportedHeadDim(int head_dim) { return headwise::IsSupportedHeadDim(head_dim); }

}  // namespace headwise::kernels::cuda
