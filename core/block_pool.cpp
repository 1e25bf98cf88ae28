// The best-fit, splitting, merging pool of device memory (see block_pool.h).
#include "core/block_pool.h"

#include <algorithm>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "core/error.h"

namespace mdff {

namespace {
constexpr size_t kMiB = size_t(1) << 20;
constexpr size_t kAlignment = 512;              // every block's size and offset is a multiple of this
constexpr size_t kSmallRequest = kMiB;          // requests up to this are small
constexpr size_t kSmallSegment = 2 * kMiB;      // the segment of small blocks
constexpr size_t kMediumRequest = 10 * kMiB;    // large requests below this share 20 MiB segments
constexpr size_t kMediumSegment = 20 * kMiB;
constexpr size_t kSegmentGranularity = 2 * kMiB;  // larger requests get their size rounded up to this
constexpr size_t kMaxRequest = std::numeric_limits<size_t>::max() / 2;  // far above any device's memory

size_t round_up(size_t bytes, size_t granularity) { return (bytes + granularity - 1) / granularity * granularity; }

size_t segment_size(bool small, size_t size) {
  if (small) return kSmallSegment;
  return size < kMediumRequest ? kMediumSegment : round_up(size, kSegmentGranularity);
}
}  // namespace

// A piece of a segment: the segment's blocks, in address order, are a doubly linked list that covers it.
struct BlockPool::Block {
  char* ptr = nullptr;
  size_t size = 0;
  bool small = false;
  bool in_use = false;
  size_t requested = 0;  // while in use: the request rounded up (deallocate's size must round to it)
  Block* prev = nullptr;  // the neighbours in the segment; none at its ends
  Block* next = nullptr;
};

bool BlockPool::BySizeThenAddress::operator()(const Block* a, const Block* b) const {
  return a->size != b->size ? a->size < b->size : std::less<const char*>()(a->ptr, b->ptr);  // any two segments
}

BlockPool::BlockPool(AllocateSegment allocate_segment, FreeSegment free_segment, Caching caching)
    : allocate_segment_(std::move(allocate_segment)),
      free_segment_(std::move(free_segment)),
      caching_(caching == Caching::On) {}

BlockPool::~BlockPool() {
  std::vector<Block*> heads;  // the first block of each segment
  for (const FreeBlocks* blocks : {&free_small_, &free_large_}) {
    for (Block* block : *blocks)
      if (!block->prev) heads.push_back(block);
  }
  for (const auto& [ptr, block] : in_use_)
    if (!block->prev) heads.push_back(block);
  for (Block* head : heads) {
    try {
      free_segment_(head->ptr);
    } catch (...) {  // a destructor must not throw: the segment is lost, as at the process's end
    }
    for (Block* block = head; block;) delete std::exchange(block, block->next);
  }
}

size_t BlockPool::rounded_size(size_t bytes) { return round_up(bytes, kAlignment); }

void* BlockPool::allocate(size_t bytes) {
  // 0 bytes, or more than any device holds (and than rounding up could represent)
  if (bytes == 0 || bytes > kMaxRequest) return nullptr;
  const size_t size = rounded_size(bytes);
  const bool small = size <= kSmallRequest;
  const std::lock_guard<std::mutex> lock(mutex_);
  Block* block = caching_ ? take_best_fit(small, size) : nullptr;
  if (!block) block = new_segment(small, caching_ ? segment_size(small, size) : bytes);
  if (!block) return nullptr;
  if (caching_) split(block, size);
  block->in_use = true;
  block->requested = size;
  in_use_.emplace(block->ptr, block);
  stats_.bytes_in_use += block->size;
  stats_.peak_bytes_in_use = std::max(stats_.peak_bytes_in_use, stats_.bytes_in_use);
  return block->ptr;
}

void BlockPool::deallocate(void* ptr, size_t bytes) {
  if (!ptr) return;
  const std::lock_guard<std::mutex> lock(mutex_);
  const auto it = in_use_.find(ptr);
  MDFF_CHECK(it != in_use_.end(), "device memory pool: freeing ", ptr, ", which is not a block in use (freed twice, "
             "or never allocated here)");
  Block* block = it->second;
  MDFF_CHECK(rounded_size(bytes) == block->requested, "device memory pool: the block at ", ptr, " was allocated for ",
             block->requested, " bytes (rounded) and freed with a size of ", bytes);
  in_use_.erase(it);
  stats_.bytes_in_use -= block->size;
  block->in_use = false;
  block->requested = 0;
  if (!caching_) {  // the block is a whole segment of its own
    give_back(block);
    return;
  }
  FreeBlocks& blocks = free_blocks(block->small);
  if (Block* next = block->next; next && !next->in_use) {  // absorb the free block after
    blocks.erase(next);
    join(block, next);
  }
  if (Block* prev = block->prev; prev && !prev->in_use) {  // be absorbed by the free block before
    blocks.erase(prev);
    join(prev, block);
    block = prev;
  }
  blocks.insert(block);
}

void BlockPool::release_cached() {
  const std::lock_guard<std::mutex> lock(mutex_);
  release_cached_locked();
}

BlockPoolStats BlockPool::stats() const {
  const std::lock_guard<std::mutex> lock(mutex_);
  BlockPoolStats s = stats_;
  for (const FreeBlocks* blocks : {&free_small_, &free_large_}) {
    if (!blocks->empty()) s.largest_free_block = std::max(s.largest_free_block, (*blocks->rbegin())->size);
    for (const Block* block : *blocks)
      if (!block->prev && !block->next) s.bytes_in_free_segments += block->size;
  }
  return s;
}

size_t BlockPool::bytes_in_use() const {
  const std::lock_guard<std::mutex> lock(mutex_);
  return stats_.bytes_in_use;
}

size_t BlockPool::block_in_use_bytes(const void* ptr) const {
  const std::lock_guard<std::mutex> lock(mutex_);
  const auto it = in_use_.find(const_cast<void*>(ptr));
  return it == in_use_.end() ? 0 : it->second->size;
}

void BlockPool::reset_peaks() {
  const std::lock_guard<std::mutex> lock(mutex_);
  stats_.peak_bytes_in_use = stats_.bytes_in_use;
  stats_.peak_bytes_reserved = stats_.bytes_reserved;
}

// The smallest free block of the pool that holds `size`, out of the free set; nullptr when none does.
// Caller holds the mutex.
BlockPool::Block* BlockPool::take_best_fit(bool small, size_t size) {
  FreeBlocks& blocks = free_blocks(small);
  Block key;
  key.size = size;  // with a null address: before every block of this size
  const auto it = blocks.lower_bound(&key);
  if (it == blocks.end()) return nullptr;
  Block* block = *it;
  blocks.erase(it);
  return block;
}

// A new segment of `bytes`, as one free block (not in the free set); when the device has no room, every
// cached segment is given back and the request tried once more. nullptr when that fails too. Caller holds
// the mutex.
BlockPool::Block* BlockPool::new_segment(bool small, size_t bytes) {
  void* ptr = allocate_segment_(bytes);
  if (!ptr) {
    release_cached_locked();
    ptr = allocate_segment_(bytes);
    if (!ptr) return nullptr;
  }
  ++stats_.segment_allocations;
  stats_.bytes_reserved += bytes;
  stats_.peak_bytes_reserved = std::max(stats_.peak_bytes_reserved, stats_.bytes_reserved);
  Block* block = new Block;
  block->ptr = static_cast<char*>(ptr);
  block->size = bytes;
  block->small = small;
  return block;
}

// Cuts `block` (free, out of the free set) down to `size` when the rest is worth a block of its own: at
// least 512 bytes among small blocks, more than 1 MiB among large ones. The rest goes to the free set.
void BlockPool::split(Block* block, size_t size) {
  const size_t rest = block->size - size;
  if (block->small ? rest < kAlignment : rest <= kSmallRequest) return;
  Block* tail = new Block;
  tail->ptr = block->ptr + size;
  tail->size = rest;
  tail->small = block->small;
  tail->prev = block;
  tail->next = block->next;
  if (tail->next) tail->next->prev = tail;
  block->next = tail;
  block->size = size;
  free_blocks(block->small).insert(tail);
}

// Joins `second`, the block right after `first` in their segment, into `first`; neither is in a free set.
void BlockPool::join(Block* first, Block* second) {
  first->size += second->size;
  first->next = second->next;
  if (first->next) first->next->prev = first;
  delete second;
}

// Gives a whole segment's one block (in no free set) back to the device. Out of the pool first: a failing
// free (it throws) leaks the segment, never frees it twice. Caller holds the mutex.
void BlockPool::give_back(Block* block) {
  stats_.bytes_reserved -= block->size;
  ++stats_.segment_frees;
  void* segment = block->ptr;
  delete block;
  free_segment_(segment);
}

// Caller holds the mutex.
void BlockPool::release_cached_locked() {
  for (FreeBlocks* blocks : {&free_small_, &free_large_}) {
    for (auto it = blocks->begin(); it != blocks->end();) {
      Block* block = *it;
      if (block->prev || block->next) {  // part of a segment that has a block in use
        ++it;
        continue;
      }
      it = blocks->erase(it);
      give_back(block);
    }
  }
}

}  // namespace mdff
