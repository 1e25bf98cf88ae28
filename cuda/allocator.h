// The caching allocator behind every CUDA tensor. cudaMalloc and cudaFree are slow and cudaFree
// synchronises the whole device, so freed blocks are kept and handed to later requests: in the steady
// state of training (the same shapes every step) no cudaMalloc happens at all. The blocks are carved
// from cudaMalloc'd segments by a BlockPool (core/block_pool.h: best fit, split and merged, each request
// rounded up to 512 bytes), which says how sizes are rounded and what the counts mean.
// Thread-safe. Blocks are reused without synchronising because all work runs on one stream (device.h):
// a kernel queued after the free runs after every kernel that used the block before.
// MDFF_CUDA_NO_CACHING=1 in the environment turns the cache off, for compute-sanitizer memcheck: each
// request is then a cudaMalloc of exactly its size and each free a cudaFree (slow: cudaFree waits for the
// device), so that an access past a tensor's end is outside any allocation, as memcheck can see.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/block_pool.h"

namespace mdff::cuda {

// segment_allocations are cudaMalloc calls (cache misses), segment_frees cudaFree calls (empty_cache, or
// a request the device could not hold until the cached segments went back).
using AllocatorStats = BlockPoolStats;

// A device block of at least `bytes`; nullptr for 0 bytes. When cudaMalloc finds no room, the cached
// segments are given back and the call retried once; then an mdff::OutOfMemory "out of GPU memory ..."
// is thrown.
void* allocate(size_t bytes);
// Returns a block from allocate() (with the same `bytes`) to the cache. nullptr is ignored.
void deallocate(void* ptr, size_t bytes);
// Gives every cached segment with no block in use back to the driver with cudaFree.
void empty_cache();

AllocatorStats allocator_stats();
size_t bytes_in_use();  // allocator_stats().bytes_in_use, cheaply (each convolution asks)
size_t block_in_use_bytes(const void* ptr);  // the size of the block in use at ptr, or 0 (BlockPool's)
// False when MDFF_CUDA_NO_CACHING=1 (read once).
bool caching_enabled();

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
// Starts new peaks: peak_bytes_in_use and peak_bytes_reserved become the current values.
void reset_peak_bytes();

}  // namespace mdff::cuda
