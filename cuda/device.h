// The GPU this process runs on: detection (once, cached, never throwing), the stream all work is queued
// on, and the cuBLAS handle. Everything in cuda/ reaches the device through these functions, so that
// multiple streams or devices can come later without touching the kernels.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <string>

namespace mdff::cuda {

struct DeviceInfo {
  bool usable = false;
  std::string why_not;     // set when !usable: what detection saw, for the user
  int ordinal = 0;         // the device used (always 0 for now; CUDA_VISIBLE_DEVICES picks which)
  std::string name;        // e.g. "NVIDIA H200"
  int major = 0, minor = 0;  // compute capability
  int multiprocessors = 0;
  size_t total_memory = 0;   // bytes
};

// Detects the GPU on first call and caches the result. Any error from the CUDA runtime (no driver, no
// device, error 35 "driver version is insufficient", ...) means "no GPU", with the reason in why_not.
const DeviceInfo& device_info();

// The stream every kernel, copy and library call is queued on: the default stream for now. Work on one
// stream runs in order, which is what lets the allocator hand a freed block to the next tensor at once.
cudaStream_t stream();

// cuBLAS handle bound to stream(), created on first use (full FP32 math: no TF32 unless asked for). The
// workspace its calls use is a block of the caching allocator (cuda/allocator.h), as PyTorch's is: it
// counts in the memory in use and in the peaks a run reports, as it does in PyTorch's. (cuBLAS still
// makes its default pool at cublasCreate, outside every count, in PyTorch as here.)
cublasHandle_t cublas_handle();
// That workspace (creating the handle if needed), and its size: 32 MiB, NVIDIA's recommendation for
// Hopper (cublasSetWorkspace) and PyTorch's default there.
void* cublas_workspace();
size_t cublas_workspace_bytes();

}  // namespace mdff::cuda
