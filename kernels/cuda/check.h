// The one place a cudaError_t becomes an absl::Status (FlashInfer's FLASHINFER_CUDA_CALL, but
// returning Status). Every CUDA runtime call of the backend goes through
// HEADWISE_CUDA_RETURN_IF_ERROR; kernel launches are checked with cudaGetLastError().
#ifndef HEADWISE_KERNELS_CUDA_CHECK_H_
#define HEADWISE_KERNELS_CUDA_CHECK_H_

#include <cuda_runtime_api.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace headwise::kernels::cuda {

// Maps a CUDA runtime error to a Status whose message names the failing call and its place.
// Allocation failures are RESOURCE_EXHAUSTED; a missing device or driver is
// FAILED_PRECONDITION; anything else is INTERNAL (arguments are validated before any call).
inline absl::Status CudaErrorToStatus(cudaError_t error, const char* call, const char* file,
                                      int line) {
  const std::string message =
      absl::StrCat(call, " failed at ", file, ":", line, ": ", cudaGetErrorName(error), " (",
                   cudaGetErrorString(error), ")");
  switch (error) {
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(message);
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInvalidDevice:
      return absl::FailedPreconditionError(message);
    default:
      return absl::InternalError(message);
  }
}

}  // namespace headwise::kernels::cuda

// Evaluates `expr` (a cudaError_t) and returns the matching absl::Status from the enclosing
// function when it is not cudaSuccess.
#define HEADWISE_CUDA_RETURN_IF_ERROR(expr)                                                      \
  do {                                                                                           \
    const cudaError_t headwise_cuda_error_ = (expr);                                             \
    if (headwise_cuda_error_ != cudaSuccess) {                                                   \
      return ::headwise::kernels::cuda::CudaErrorToStatus(headwise_cuda_error_, #expr, __FILE__, \
                                                          __LINE__);                             \
    }                                                                                            \
  } while (false)

#endif  // HEADWISE_KERNELS_CUDA_CHECK_H_
