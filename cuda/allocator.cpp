// The size-bucketed caching allocator (see allocator.h).
#include "cuda/allocator.h"

#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "cuda/check.h"

namespace mdff::cuda {

namespace {
constexpr size_t kSmallGranularity = 512;
constexpr size_t kSmallLimit = size_t(1) << 20;       // 1 MiB
constexpr size_t kLargeGranularity = size_t(2) << 20;  // 2 MiB

size_t round_up(size_t bytes, size_t granularity) { return (bytes + granularity - 1) / granularity * granularity; }

class CachingAllocator {
 public:
  void* allocate(size_t bytes) {
    if (bytes == 0) return nullptr;
    const size_t size = round_allocation_size(bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    void* ptr = take_cached(size);
    if (!ptr) ptr = malloc_with_retry(bytes, size);
    live_[ptr] = size;
    stats_.bytes_in_use += size;
    if (stats_.bytes_in_use > stats_.peak_bytes_in_use) stats_.peak_bytes_in_use = stats_.bytes_in_use;
    return ptr;
  }

  void deallocate(void* ptr, size_t bytes) {
    if (!ptr) return;
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = live_.find(ptr);
    MDFF_CHECK(it != live_.end(), "cuda allocator: freeing ", ptr, ", which it did not allocate (or freed twice)");
    const size_t size = it->second;
    MDFF_CHECK(size == round_allocation_size(bytes), "cuda allocator: block ", ptr, " of ", size,
               " bytes freed with a size of ", bytes, " bytes");
    live_.erase(it);
    stats_.bytes_in_use -= size;
    free_[size].push_back(ptr);
    stats_.bytes_cached += size;
  }

  void empty_cache() {
    std::lock_guard<std::mutex> lock(mutex_);
    release_cache();
  }

  void reset_peak() {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.peak_bytes_in_use = stats_.bytes_in_use;
  }

  AllocatorStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }

 private:
  // A cached block of exactly `size` bytes, or nullptr. Caller holds the mutex.
  void* take_cached(size_t size) {
    auto it = free_.find(size);
    if (it == free_.end() || it->second.empty()) return nullptr;
    void* ptr = it->second.back();
    it->second.pop_back();
    stats_.bytes_cached -= size;
    return ptr;
  }

  // cudaMalloc, or nullptr when the device is out of memory; any other failure throws.
  static void* try_malloc(size_t size) {
    void* ptr = nullptr;
    const cudaError_t status = cudaMalloc(&ptr, size);
    if (status == cudaErrorMemoryAllocation) {
      cudaGetLastError();  // clear the error so that later launch checks do not report it
      return nullptr;
    }
    if (status != cudaSuccess)
      detail::throw_library_error("CUDA", "cudaMalloc(&ptr, size)", __FILE__, __LINE__, int(status),
                                  cudaGetErrorName(status), cudaGetErrorString(status));
    return ptr;
  }

  // A new block from the driver; when it is full, the cache is released and the request retried once.
  void* malloc_with_retry(size_t requested, size_t size) {
    void* ptr = try_malloc(size);
    if (!ptr) {
      const size_t cached = stats_.bytes_cached;
      release_cache();
      ptr = try_malloc(size);
      if (!ptr)
        throw OutOfMemory(mdff::detail::concat("out of GPU memory: requested ", requested, " bytes (a block of ", size,
                                         "), with ", stats_.bytes_in_use, " bytes in use by tensors and ", cached,
                                         " bytes cached (released, then retried)"));
    }
    ++stats_.cuda_malloc_calls;
    return ptr;
  }

  // cudaFree every cached block. Caller holds the mutex. The lists are emptied first, so that a failing
  // cudaFree can at worst leak the remaining blocks, never free one twice.
  void release_cache() {
    std::map<size_t, std::vector<void*>> blocks;
    blocks.swap(free_);
    stats_.bytes_cached = 0;
    for (auto& bucket : blocks) {
      for (void* ptr : bucket.second) {
        MDFF_CUDA_CHECK(cudaFree(ptr));
        ++stats_.cuda_free_calls;
      }
    }
  }

  std::mutex mutex_;
  std::map<size_t, std::vector<void*>> free_;  // rounded size -> free blocks of exactly that size
  std::unordered_map<void*, size_t> live_;     // blocks held by tensors -> rounded size
  AllocatorStats stats_;
};

CachingAllocator& instance() {
  // Never destroyed: tensors held in static objects may be freed after main returns.
  static CachingAllocator* allocator = new CachingAllocator();
  return *allocator;
}
}  // namespace

size_t round_allocation_size(size_t bytes) {
  if (bytes <= kSmallLimit) return round_up(bytes, kSmallGranularity);
  return round_up(bytes, kLargeGranularity);
}

void* allocate(size_t bytes) { return instance().allocate(bytes); }
void deallocate(void* ptr, size_t bytes) { instance().deallocate(ptr, bytes); }
void empty_cache() { instance().empty_cache(); }
AllocatorStats allocator_stats() { return instance().stats(); }
void reset_peak_bytes() { instance().reset_peak(); }

}  // namespace mdff::cuda
