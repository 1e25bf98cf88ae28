// A caching pool of device memory, the engine of the CUDA allocator (cuda/allocator.h), written without
// CUDA so that the CPU tests drive it with a fake device (tests/test_block_pool.cpp).
//
// Memory comes from the device in segments (cudaMalloc). A request is rounded up to a multiple of 512
// bytes and served by the smallest free block that fits (best fit), split when the rest is worth keeping;
// a freed block merges with its free neighbours of the same segment. So one segment serves tensors of
// many sizes over a step, and a tensor costs its own size, not the next size class's (the first allocator
// rounded every block above 1 MiB up to 2 MiB and kept each size in its own list: 273 MiB of rounding
// alone at the peak of a 224x224 batch-32 training step, counted on the CPU).
//
//   requests up to 1 MiB ("small") come from 2 MiB segments, and are split off whenever 512 bytes remain;
//   larger requests come from 20 MiB segments below 10 MiB, otherwise from a segment of the request
//   rounded up to 2 MiB, and are split off when more than 1 MiB remains.
// Small and large blocks never share a segment, so long-lived small tensors do not pin large segments.
// These are the sizes of PyTorch's caching allocator, and bytes_in_use is its "allocated bytes": the
// blocks held, each its request rounded up to 512 bytes (plus a rest too small to split off). Segments
// stay reserved until release_cached() (or an allocation that the device cannot serve) gives back every
// segment with no block in use.
//
// Thread-safe. Blocks are reused without any synchronisation with the device: the caller's work runs on
// one stream, where a kernel queued after the free runs after every kernel that used the block before.
//
// Caching::Off is for memory checkers (compute-sanitizer memcheck): every request is a segment of exactly
// its size, given back when freed, so that an access past a tensor's end leaves the allocation it was
// made in, instead of landing in a neighbour's block of the same segment.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <set>
#include <unordered_map>

namespace mdff {

struct BlockPoolStats {
  int64_t segment_allocations = 0;  // segments obtained from the device (cudaMalloc calls)
  int64_t segment_frees = 0;        // segments given back (cudaFree calls)
  size_t bytes_in_use = 0;          // the blocks held (each request rounded up to 512 bytes, plus an unsplit rest)
  size_t peak_bytes_in_use = 0;     // the most bytes_in_use since the start or reset_peaks()
  size_t bytes_reserved = 0;        // every segment, in use or not
  size_t peak_bytes_reserved = 0;   // the most bytes_reserved since the start or reset_peaks()
  // Of the free memory: the largest block (the most one request gets without the device), and the whole
  // free segments (what a request the device cannot hold makes the pool give back; the rest of
  // bytes_cached() is gaps in segments that hold blocks in use).
  size_t largest_free_block = 0;
  size_t bytes_in_free_segments = 0;
  size_t bytes_cached() const { return bytes_reserved - bytes_in_use; }  // free, kept for reuse
};

class BlockPool {
 public:
  // allocate_segment(bytes) returns a new segment, or nullptr when the device has no room (it throws for
  // any other failure); free_segment(ptr) gives one back.
  using AllocateSegment = std::function<void*(size_t bytes)>;
  using FreeSegment = std::function<void(void* segment)>;
  enum class Caching { On, Off };
  BlockPool(AllocateSegment allocate_segment, FreeSegment free_segment, Caching caching = Caching::On);
  ~BlockPool();  // gives back every segment, blocks in use or not
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  // A block of at least `bytes`; nullptr for 0 bytes, and when the device cannot hold a new segment even
  // after every cached segment was given back (so for any absurd size). If the host runs out of memory
  // for the pool's own bookkeeping (std::bad_alloc), a block or segment may be lost to the pool, never
  // handed out twice.
  void* allocate(size_t bytes);
  // Returns a block from allocate(), with the same `bytes`; nullptr is ignored. A pointer that is not a
  // block in use, or a different size, is an mdff::Error.
  void deallocate(void* ptr, size_t bytes);
  // Gives back every segment with no block in use.
  void release_cached();
  BlockPoolStats stats() const;
  size_t bytes_in_use() const;  // stats().bytes_in_use without walking the free blocks
  // The size of the block in use that starts at ptr, or 0 when none does.
  size_t block_in_use_bytes(const void* ptr) const;
  // Starts new peaks from the bytes in use and reserved now.
  void reset_peaks();

  static size_t rounded_size(size_t bytes);  // a request's block size: a multiple of 512 (0 stays 0)

 private:
  struct Block;
  struct BySizeThenAddress {
    bool operator()(const Block* a, const Block* b) const;
  };
  using FreeBlocks = std::set<Block*, BySizeThenAddress>;

  FreeBlocks& free_blocks(bool small) { return small ? free_small_ : free_large_; }
  Block* take_best_fit(bool small, size_t size);
  Block* new_segment(bool small, size_t bytes);
  void split(Block* block, size_t size);
  void join(Block* first, Block* second);
  void give_back(Block* block);
  void release_cached_locked();

  AllocateSegment allocate_segment_;
  FreeSegment free_segment_;
  bool caching_;
  mutable std::mutex mutex_;
  FreeBlocks free_small_, free_large_;
  std::unordered_map<void*, Block*> in_use_;
  BlockPoolStats stats_;
};

}  // namespace mdff
