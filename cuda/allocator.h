// The caching allocator behind every CUDA tensor. cudaMalloc and cudaFree are slow and cudaFree
// synchronises the whole device, so freed blocks are kept in per-size free lists and handed to the next
// request of the same rounded size: in the steady state of training (the same shapes every step) no
// cudaMalloc happens at all. Sizes are rounded up so that nearby requests share a bucket:
//   up to 1 MiB   -> a multiple of 512 bytes
//   above 1 MiB   -> a multiple of 2 MiB
// Thread-safe. Blocks are reused without synchronising because all work runs on one stream (device.h):
// a kernel queued after the free runs after every kernel that used the block before.
#pragma once
#include <cstddef>
#include <cstdint>

namespace mdff::cuda {

struct AllocatorStats {
  int64_t cuda_malloc_calls = 0;  // blocks obtained from cudaMalloc (cache misses)
  int64_t cuda_free_calls = 0;    // blocks given back with cudaFree (empty_cache, out-of-memory retry)
  size_t bytes_in_use = 0;        // rounded size of the blocks held by live tensors
  size_t peak_bytes_in_use = 0;   // the most bytes_in_use ever reached
  size_t bytes_cached = 0;        // rounded size of the free blocks waiting for reuse
};

// The rounded block size that a request of `bytes` gets (0 stays 0).
size_t round_allocation_size(size_t bytes);

// A device block of at least `bytes`; nullptr for 0 bytes. On cudaMalloc failure the cache is released
// and the call retried once; then an mdff::Error "out of GPU memory ..." is thrown.
void* allocate(size_t bytes);
// Returns a block from allocate() (with the same `bytes`) to the cache. nullptr is ignored.
void deallocate(void* ptr, size_t bytes);
// Gives every cached free block back to the driver with cudaFree.
void empty_cache();

AllocatorStats allocator_stats();

// A device block for one call's scratch (partial sums, an algorithm search's workspace), given back to the
// cache when it goes out of scope. Safe without waiting for the device: the kernels that use it are queued
// on the one stream before any later user of the block.
class ScratchBuffer {
 public:
  explicit ScratchBuffer(size_t bytes) : bytes_(bytes), data_(allocate(bytes)) {}
  ~ScratchBuffer() { deallocate(data_, bytes_); }
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  size_t bytes_;
  void* data_;
};
// Starts a new peak: peak_bytes_in_use becomes the current bytes_in_use.
void reset_peak_bytes();

}  // namespace mdff::cuda
