// The CUDA caching allocator (see allocator.h): a BlockPool whose segments are cudaMalloc'd.
#include "cuda/allocator.h"

#include "core/error.h"
#include "cuda/check.h"

namespace mdff::cuda {

namespace {
// cudaMalloc, or nullptr when the device is out of memory; any other failure throws.
void* malloc_segment(size_t bytes) {
  void* ptr = nullptr;
  const cudaError_t status = cudaMalloc(&ptr, bytes);
  if (status == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // clear the error so that later launch checks do not report it
    return nullptr;
  }
  if (status != cudaSuccess)
    detail::throw_library_error("CUDA", "cudaMalloc(&ptr, bytes)", __FILE__, __LINE__, int(status),
                                cudaGetErrorName(status), cudaGetErrorString(status));
  return ptr;
}

BlockPool& pool() {
  // Never destroyed: tensors held in static objects may be freed after main returns.
  static BlockPool* instance = new BlockPool(
      malloc_segment, [](void* segment) { MDFF_CUDA_CHECK(cudaFree(segment)); },
      caching_enabled() ? BlockPool::Caching::On : BlockPool::Caching::Off);
  return *instance;
}
}  // namespace

bool caching_enabled() {
  static const bool enabled = !env_equals("MDFF_CUDA_NO_CACHING", "1");
  return enabled;
}

void* allocate(size_t bytes) {
  void* ptr = pool().allocate(bytes);
  if (!ptr && bytes > 0) {
    const AllocatorStats s = pool().stats();
    throw OutOfMemory(mdff::detail::concat("out of GPU memory: requested ", bytes, " bytes, with ", s.bytes_in_use,
                                           " bytes in use by tensors and ", s.bytes_cached(),
                                           " more reserved (the cached segments were given back, then the request "
                                           "retried)"));
  }
  return ptr;
}
void deallocate(void* ptr, size_t bytes) { pool().deallocate(ptr, bytes); }
void empty_cache() { pool().release_cached(); }
AllocatorStats allocator_stats() { return pool().stats(); }
size_t bytes_in_use() { return pool().bytes_in_use(); }
size_t block_in_use_bytes(const void* ptr) { return pool().block_in_use_bytes(ptr); }
void reset_peak_bytes() { pool().reset_peaks(); }

}  // namespace mdff::cuda
