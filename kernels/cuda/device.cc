#include <cuda_runtime_api.h>

#include "kernels/cuda/attention_cuda.h"

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

bool IsSupportedHeadDim(int head_dim) {
  switch (head_dim) {
    case 8:
    case 16:
    case 32:
    case 64:
    case 96:
    case 128:
    case 256:
      return true;
    default:
      return false;
  }
}

}  // namespace headwise::kernels::cuda
