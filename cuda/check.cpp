// Out-of-line part of check.h: formatting the error, the MDFF_CUDA_SYNC debug switch, env_equals.
#include "cuda/check.h"

#include <cstdlib>
#include <cstring>
#include <string>

namespace mdff::cuda::detail {

void throw_library_error(const char* library, const char* call, const char* file, int line, int code,
                         const char* code_name, const char* message) {
  std::string text = ::mdff::detail::concat(library, " error ");
  if (code_name) text += ::mdff::detail::concat(code_name, " ");
  text += ::mdff::detail::concat("(", code, "): ", message ? message : "unknown error", " in `", call, "` [at ", file, ":", line, "]");
  throw Error(text);
}

namespace {
// Read once: MDFF_CUDA_SYNC=1 makes every launch check wait for the kernel.
bool sync_after_each_kernel() {
  static const bool enabled = env_equals("MDFF_CUDA_SYNC", "1");
  return enabled;
}
}  // namespace

void check_launch(const char* file, int line) {
  // A bad launch configuration is reported at once; a fault inside the kernel only after it has run.
  const cudaError_t launch = cudaGetLastError();
  if (launch != cudaSuccess)
    throw_library_error("CUDA", "kernel launch", file, line, int(launch), cudaGetErrorName(launch),
                        cudaGetErrorString(launch));
  if (sync_after_each_kernel()) {
    const cudaError_t run = cudaDeviceSynchronize();
    if (run != cudaSuccess)
      throw_library_error("CUDA", "kernel execution (MDFF_CUDA_SYNC=1)", file, line, int(run),
                          cudaGetErrorName(run), cudaGetErrorString(run));
  }
}

}  // namespace mdff::cuda::detail

namespace mdff::cuda {
bool env_equals(const char* name, const char* value) {
  const char* set = std::getenv(name);
  return set != nullptr && std::strcmp(set, value) == 0;
}
}  // namespace mdff::cuda
