// Error checks for every call into CUDA, cuBLAS and cuDNN. Each macro evaluates the call once and, on
// failure, throws mdff::Error naming the call, the library's own error string and file:line, e.g.
//   CUDA error cudaErrorInvalidDevice (101): invalid device ordinal in `cudaSetDevice(7)` [at .../cuda/device.cpp:40]
// MDFF_CUDA_CHECK_LAUNCH() follows every kernel launch. With the environment variable MDFF_CUDA_SYNC=1 it
// also waits for the kernel to finish, so that an error inside a kernel is reported at its own launch
// rather than at some later, unrelated call (slow; for debugging).
//
// The cuBLAS and cuDNN macros name types from cublas_v2.h / cudnn.h: include those where you use them.
#pragma once
#include <cuda_runtime.h>

#include "core/error.h"

namespace mdff::cuda::detail {
// Throws the mdff::Error described above. `code_name` may be null when the library has no name table.
[[noreturn]] void throw_library_error(const char* library, const char* call, const char* file, int line,
                                      int code, const char* code_name, const char* message);
// cudaGetLastError after a launch, plus a synchronisation when MDFF_CUDA_SYNC=1.
void check_launch(const char* file, int line);
}  // namespace mdff::cuda::detail

namespace mdff::cuda {
// Whether the environment variable `name` is set to exactly `value`: the CUDA backend's switches
// (MDFF_CUDA_SYNC=1, MDFF_CUDA_NO_CACHING=1, MDFF_CONV_LEAN=0), each read once by its user.
bool env_equals(const char* name, const char* value);
}  // namespace mdff::cuda

// A failed runtime call also leaves its error as CUDA's "last error", which the next launch check would
// report against an unrelated kernel: it is cleared (cudaGetLastError) before the throw. A sticky error (a
// fault inside a kernel) cannot be cleared, and keeps being reported, as it must.
#define MDFF_CUDA_CHECK(call)                                                                            \
  do {                                                                                                   \
    const cudaError_t mdff_status_ = (call);                                                             \
    if (mdff_status_ != cudaSuccess) {                                                                   \
      (void)cudaGetLastError();                                                                          \
      ::mdff::cuda::detail::throw_library_error("CUDA", #call, __FILE__, __LINE__, int(mdff_status_),    \
                                                cudaGetErrorName(mdff_status_),                          \
                                                cudaGetErrorString(mdff_status_));                       \
    }                                                                                                    \
  } while (0)

#define MDFF_CUBLAS_CHECK(call)                                                                          \
  do {                                                                                                   \
    const cublasStatus_t mdff_status_ = (call);                                                          \
    if (mdff_status_ != CUBLAS_STATUS_SUCCESS)                                                           \
      ::mdff::cuda::detail::throw_library_error("cuBLAS", #call, __FILE__, __LINE__, int(mdff_status_),  \
                                                cublasGetStatusName(mdff_status_),                       \
                                                cublasGetStatusString(mdff_status_));                    \
  } while (0)

#define MDFF_CUDNN_CHECK(call)                                                                           \
  do {                                                                                                   \
    const cudnnStatus_t mdff_status_ = (call);                                                           \
    if (mdff_status_ != CUDNN_STATUS_SUCCESS)                                                            \
      ::mdff::cuda::detail::throw_library_error("cuDNN", #call, __FILE__, __LINE__, int(mdff_status_),   \
                                                nullptr, cudnnGetErrorString(mdff_status_));             \
  } while (0)

#define MDFF_CUDA_CHECK_LAUNCH() ::mdff::cuda::detail::check_launch(__FILE__, __LINE__)
