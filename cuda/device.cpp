// Device detection, the stream and the cuBLAS handle (see device.h).
#include "cuda/device.h"

#include "cuda/allocator.h"
#include "cuda/check.h"

namespace mdff::cuda {

namespace {
// The kernels are built for sm_90 plus compute_90 PTX (CMAKE_CUDA_ARCHITECTURES), which older GPUs
// cannot run.
constexpr int kMinMajor = 9;

std::string runtime_failure(const char* call, cudaError_t status) {
  std::string text = std::string("no CUDA device: ") + call + " failed with error " + std::to_string(int(status)) +
                     " (" + cudaGetErrorString(status) + ")";
  cudaGetLastError();  // clear it, so that later launch checks do not report this one
  return text;
}

DeviceInfo detect() {
  DeviceInfo info;
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    info.why_not = runtime_failure("cudaGetDeviceCount", status);
    return info;
  }
  if (count == 0) {
    info.why_not = "no CUDA device: cudaGetDeviceCount found 0 devices";
    return info;
  }
  cudaDeviceProp prop{};
  status = cudaGetDeviceProperties(&prop, info.ordinal);
  if (status != cudaSuccess) {
    info.why_not = runtime_failure("cudaGetDeviceProperties", status);
    return info;
  }
  info.name = prop.name;
  info.major = prop.major;
  info.minor = prop.minor;
  info.multiprocessors = prop.multiProcessorCount;
  info.total_memory = prop.totalGlobalMem;
  if (prop.major < kMinMajor) {
    info.why_not = "CUDA device " + info.name + " has compute capability " + std::to_string(prop.major) + "." +
                   std::to_string(prop.minor) + "; mdff's kernels are built for 9.0 (sm_90) and newer";
    return info;
  }
  // Creating the context can still fail (device busy in exclusive mode, out of memory, ...).
  status = cudaSetDevice(info.ordinal);
  if (status == cudaSuccess) status = cudaFree(nullptr);
  if (status != cudaSuccess) {
    info.why_not = runtime_failure("creating the CUDA context", status);
    return info;
  }
  info.usable = true;
  return info;
}
}  // namespace

const DeviceInfo& device_info() {
  // Thread-safe one-time initialisation. Never destroyed: CUDA tensors held in static objects are
  // freed during exit and still ask for the backend.
  static const DeviceInfo* info = new DeviceInfo(detect());
  return *info;
}

cudaStream_t stream() { return nullptr; }  // the default stream

size_t cublas_workspace_bytes() { return size_t(32) << 20; }

namespace {
struct Cublas {
  void* workspace;
  cublasHandle_t handle;
};

const Cublas& cublas() {
  // Never destroyed: the driver reclaims them at exit, and cublasDestroy during static destruction can
  // run after the CUDA runtime has already shut down.
  static const Cublas created = [] {
    // The workspace first: when the device is full, that is the call that fails (an OutOfMemory), before
    // a handle exists to leak.
    Cublas c{allocate(cublas_workspace_bytes()), nullptr};
    MDFF_CUBLAS_CHECK(cublasCreate(&c.handle));
    MDFF_CUBLAS_CHECK(cublasSetStream(c.handle, stream()));  // before the workspace: setting the stream resets it
    MDFF_CUBLAS_CHECK(cublasSetMathMode(c.handle, CUBLAS_DEFAULT_MATH));
    MDFF_CUBLAS_CHECK(cublasSetWorkspace(c.handle, c.workspace, cublas_workspace_bytes()));
    return c;
  }();
  return created;
}
}  // namespace

cublasHandle_t cublas_handle() { return cublas().handle; }
void* cublas_workspace() { return cublas().workspace; }

}  // namespace mdff::cuda
