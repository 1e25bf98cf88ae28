// Tests of BlockPool (core/block_pool.h), the CUDA allocator's engine, on a fake device: segments are
// address ranges handed out by a counter, never touched, so every rule is checked here without a GPU.
#include <doctest/doctest.h>
#include "tests/doctest_text.h"

#include <cmath>
#include <cstdint>
#include <iterator>
#include <limits>
#include <map>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "core/block_pool.h"
#include "core/error.h"
#include "core/rng.h"

using namespace mdff;

namespace {
constexpr size_t MiB = size_t(1) << 20;

// Hands out address ranges as segments (apart from each other), up to `capacity` bytes at once.
struct FakeDevice {
  size_t capacity = std::numeric_limits<size_t>::max();
  uintptr_t next = uintptr_t(1) << 32;
  std::map<uintptr_t, size_t> segments;  // start -> size
  size_t used = 0;
  int64_t allocations = 0;

  void* allocate(size_t bytes) {
    if (bytes > capacity - used) return nullptr;
    const uintptr_t start = next;
    next += bytes + 4 * MiB;
    segments[start] = bytes;
    used += bytes;
    ++allocations;
    return reinterpret_cast<void*>(start);
  }
  void free(void* ptr) {
    const auto it = segments.find(reinterpret_cast<uintptr_t>(ptr));
    REQUIRE(it != segments.end());  // only a segment this device gave, and only once
    used -= it->second;
    segments.erase(it);
  }
  // The segment that holds [ptr, ptr + bytes), or segments.end().
  std::map<uintptr_t, size_t>::const_iterator segment_of(const void* ptr, size_t bytes) const {
    const auto p = reinterpret_cast<uintptr_t>(ptr);
    auto it = segments.upper_bound(p);
    if (it == segments.begin()) return segments.end();
    --it;
    return p + bytes <= it->first + it->second ? it : segments.end();
  }
};

struct Rig {
  FakeDevice device;
  BlockPool pool{[this](size_t bytes) { return device.allocate(bytes); }, [this](void* p) { device.free(p); }};
};

char* at(void* p) { return static_cast<char*>(p); }
}  // namespace

TEST_CASE("block pool: requests round up to 512 bytes, and small ones share a 2 MiB segment") {
  CHECK(BlockPool::rounded_size(0) == 0);
  CHECK(BlockPool::rounded_size(1) == 512);
  CHECK(BlockPool::rounded_size(512) == 512);
  CHECK(BlockPool::rounded_size(513) == 1024);
  CHECK(BlockPool::rounded_size(MiB + 1) == MiB + 512);
  Rig rig;
  CHECK(rig.pool.allocate(0) == nullptr);
  void* a = rig.pool.allocate(1);
  void* b = rig.pool.allocate(513);
  void* c = rig.pool.allocate(MiB);  // the largest small request
  BlockPoolStats s = rig.pool.stats();
  CHECK(s.bytes_in_use == 512 + 1024 + MiB);
  CHECK(s.bytes_reserved == 2 * MiB);
  CHECK(s.segment_allocations == 1);
  CHECK(at(b) == at(a) + 512);  // carved one after the other from the same segment
  CHECK(at(c) == at(b) + 1024);
  rig.pool.deallocate(b, 513);
  CHECK(rig.pool.stats().bytes_in_use == 512 + MiB);
  CHECK(rig.pool.bytes_in_use() == 512 + MiB);
  CHECK(rig.pool.stats().bytes_cached() == 2 * MiB - 512 - MiB);
  // best fit: the 1024-byte hole left by b, not the segment's large rest
  void* d = rig.pool.allocate(1000);
  CHECK(d == b);
  for (auto [p, bytes] : {std::pair{a, size_t(1)}, {c, MiB}, {d, size_t(1000)}}) rig.pool.deallocate(p, bytes);
  CHECK(rig.pool.stats().bytes_in_use == 0);
  CHECK(rig.pool.stats().peak_bytes_in_use == 512 + 1024 + MiB);
}

TEST_CASE("block pool: freed neighbours merge back into the whole segment, which release_cached gives back") {
  Rig rig;
  std::vector<void*> blocks;
  for (int i = 0; i < 6; ++i) blocks.push_back(rig.pool.allocate(100000));
  CHECK(rig.pool.stats().segment_allocations == 1);
  for (int i : {1, 3, 5, 0, 4, 2}) rig.pool.deallocate(blocks[i], 100000);  // gaps first, then what joins them
  rig.pool.release_cached();
  const BlockPoolStats s = rig.pool.stats();
  CHECK(s.segment_frees == 1);  // one free block covered the segment again
  CHECK(s.bytes_reserved == 0);
  CHECK(rig.device.segments.empty());
  // A segment with a block in use stays.
  void* kept = rig.pool.allocate(100);
  rig.pool.deallocate(rig.pool.allocate(200), 200);
  rig.pool.release_cached();
  CHECK(rig.device.segments.size() == 1);
  rig.pool.deallocate(kept, 100);
}

TEST_CASE("block pool: large requests share 20 MiB segments below 10 MiB, and split only when over 1 MiB remains") {
  Rig rig;
  void* a = rig.pool.allocate(3 * MiB);
  void* b = rig.pool.allocate(3 * MiB);
  CHECK(rig.pool.stats().bytes_reserved == 20 * MiB);
  CHECK(at(b) == at(a) + 3 * MiB);
  // 14 MiB remain in the segment: a 13.5 MiB request takes all of it (0.5 MiB is not worth a block)
  void* c = rig.pool.allocate(13 * MiB + MiB / 2);
  CHECK(at(c) == at(b) + 3 * MiB);
  BlockPoolStats s = rig.pool.stats();
  CHECK(s.segment_allocations == 1);
  CHECK(s.bytes_in_use == 20 * MiB);
  rig.pool.deallocate(c, 13 * MiB + MiB / 2);
  // at or above 10 MiB: a segment of the request rounded up to 2 MiB
  void* big = rig.pool.allocate(15 * MiB);
  s = rig.pool.stats();
  CHECK(s.segment_allocations == 2);
  CHECK(s.bytes_reserved == 20 * MiB + 16 * MiB);
  CHECK(s.bytes_in_use == 6 * MiB + 16 * MiB);  // the 1 MiB rest is not split off
  // free blocks of 14 MiB (c's) and 16 MiB (big's): a 12 MiB request takes the smaller, split (2 MiB remain)
  rig.pool.deallocate(big, 15 * MiB);
  void* part = rig.pool.allocate(12 * MiB);
  CHECK(part == c);
  CHECK(rig.pool.stats().segment_allocations == 2);
  CHECK(rig.pool.stats().bytes_in_use == 6 * MiB + 12 * MiB);
  void* rest = rig.pool.allocate(2 * MiB);
  CHECK(at(rest) == at(c) + 12 * MiB);
  for (auto [p, bytes] : {std::pair{a, 3 * MiB}, {b, 3 * MiB}, {part, 12 * MiB}, {rest, 2 * MiB}})
    rig.pool.deallocate(p, bytes);
}

TEST_CASE("block pool: small and large requests never share a segment") {
  Rig rig;
  rig.pool.deallocate(rig.pool.allocate(3 * MiB), 3 * MiB);  // a cached 20 MiB segment
  void* small = rig.pool.allocate(MiB);
  CHECK(rig.pool.stats().segment_allocations == 2);
  CHECK(rig.device.segment_of(small, MiB)->second == 2 * MiB);
  rig.pool.deallocate(small, MiB);
  void* large = rig.pool.allocate(MiB + 1);  // large: the cached 20 MiB segment, not the free 2 MiB one
  CHECK(rig.pool.stats().segment_allocations == 2);
  CHECK(rig.device.segment_of(large, MiB + 1)->second == 20 * MiB);
  rig.pool.deallocate(large, MiB + 1);
}

TEST_CASE("block pool: a large block is split when more than 1 MiB would remain, not at exactly 1 MiB") {
  Rig rig;
  void* a = rig.pool.allocate(19 * MiB - 512);  // leaves 1 MiB + 512 bytes of the 20 MiB segment: split
  CHECK(rig.pool.stats().bytes_in_use == 19 * MiB - 512);
  void* b = rig.pool.allocate(1);  // small: a segment of its own
  rig.pool.deallocate(a, 19 * MiB - 512);
  void* c = rig.pool.allocate(19 * MiB);  // leaves exactly 1 MiB: not split, the block is all 20 MiB
  CHECK(c == a);
  CHECK(rig.pool.stats().bytes_in_use == 20 * MiB + 512);
  rig.pool.deallocate(c, 19 * MiB);
  rig.pool.deallocate(b, 1);
}

TEST_CASE("block pool: peaks, their reset, and what the free memory is made of") {
  Rig rig;
  void* a = rig.pool.allocate(12 * MiB);  // a 12 MiB segment
  void* b = rig.pool.allocate(3 * MiB);   // 3 MiB of a 20 MiB segment
  rig.pool.deallocate(a, 12 * MiB);
  BlockPoolStats s = rig.pool.stats();
  CHECK(s.peak_bytes_in_use == 15 * MiB);
  CHECK(s.peak_bytes_reserved == 32 * MiB);
  CHECK(s.largest_free_block == 17 * MiB);      // the rest of b's segment
  CHECK(s.bytes_in_free_segments == 12 * MiB);  // a's whole segment
  rig.pool.release_cached();
  rig.pool.reset_peaks();
  s = rig.pool.stats();
  CHECK(s.peak_bytes_in_use == 3 * MiB);
  CHECK(s.peak_bytes_reserved == 20 * MiB);
  CHECK(s.bytes_in_free_segments == 0);
  rig.pool.deallocate(b, 3 * MiB);
}

TEST_CASE("block pool: absurd sizes and a failing device leave the pool as it was") {
  Rig rig;
  void* kept = rig.pool.allocate(5000);
  const BlockPoolStats before = rig.pool.stats();
  CHECK(rig.pool.allocate(std::numeric_limits<size_t>::max()) == nullptr);  // would wrap when rounded up
  CHECK(rig.pool.allocate(std::numeric_limits<size_t>::max() / 2 + 1) == nullptr);
  void* next = rig.pool.allocate(100);  // a block of its own, not one shared with a wrapped request
  CHECK(next != kept);
  rig.pool.deallocate(next, 100);
  bool fail = true;
  BlockPool failing([&](size_t bytes) -> void* {
    if (fail) throw Error("the device failed");
    return rig.device.allocate(bytes);
  }, [&](void* p) { rig.device.free(p); });
  CHECK_THROWS_WITH_AS(failing.allocate(64), doctest::Contains("the device failed"), Error);
  CHECK(failing.stats().bytes_reserved == 0);
  CHECK(failing.stats().segment_allocations == 0);
  fail = false;
  failing.deallocate(failing.allocate(64), 64);
  CHECK(failing.stats().segment_allocations == 1);
  CHECK(rig.pool.stats().bytes_in_use == before.bytes_in_use);
  rig.pool.deallocate(kept, 5000);
}

TEST_CASE("block pool: without caching, each request is a segment of exactly its size, given back when freed") {
  FakeDevice device;
  BlockPool pool([&](size_t bytes) { return device.allocate(bytes); }, [&](void* p) { device.free(p); },
                 BlockPool::Caching::Off);
  void* a = pool.allocate(1000);
  void* b = pool.allocate(3 * MiB + 5);
  CHECK(device.segments.size() == 2);
  CHECK(device.segment_of(a, 1000)->second == 1000);  // not rounded: a byte past the end is outside it
  CHECK(device.segment_of(b, 3 * MiB + 5)->second == 3 * MiB + 5);
  CHECK(pool.stats().bytes_in_use == 1000 + 3 * MiB + 5);
  pool.deallocate(a, 1000);
  CHECK(device.segments.size() == 1);
  void* c = pool.allocate(1000);  // a new segment, not a cached one
  CHECK(pool.stats().segment_allocations == 3);
  pool.deallocate(b, 3 * MiB + 5);
  pool.deallocate(c, 1000);
  CHECK(device.segments.empty());
  const BlockPoolStats s = pool.stats();
  CHECK(s.bytes_reserved == 0);
  CHECK(s.segment_frees == 3);
}

TEST_CASE("block pool: threads allocating and freeing at once") {
  FakeDevice device;
  std::mutex device_mutex;  // the fake device is not thread-safe; cudaMalloc is
  BlockPool pool(
      [&](size_t bytes) {
        const std::lock_guard<std::mutex> lock(device_mutex);
        return device.allocate(bytes);
      },
      [&](void* p) {
        const std::lock_guard<std::mutex> lock(device_mutex);
        device.free(p);
      });
  std::vector<std::thread> threads;
  std::vector<std::vector<std::pair<uintptr_t, size_t>>> held(4);  // each thread's blocks at the end
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      Rng rng(100 + t);
      std::vector<std::pair<void*, size_t>> live;
      for (int i = 0; i < 3000; ++i) {
        if (live.empty() || rng.uniform() < 0.6) {
          const size_t bytes = static_cast<size_t>(rng.uniform() * 3 * MiB) + 1;
          live.emplace_back(pool.allocate(bytes), bytes);
        } else {
          const size_t k = rng.below(live.size());
          pool.deallocate(live[k].first, live[k].second);
          live.erase(live.begin() + static_cast<long>(k));
        }
      }
      for (const auto& [p, bytes] : live) held[t].emplace_back(reinterpret_cast<uintptr_t>(p), bytes);
    });
  }
  for (std::thread& thread : threads) thread.join();
  // the blocks held at the end by all the threads are disjoint, and counted
  std::map<uintptr_t, size_t> all;
  size_t total = 0;
  for (const auto& blocks : held) {
    for (const auto& [start, bytes] : blocks) {
      all[start] = BlockPool::rounded_size(bytes);
      total += BlockPool::rounded_size(bytes);
    }
  }
  uintptr_t end = 0;
  for (const auto& [start, size] : all) {
    CHECK(start >= end);
    end = start + size;
  }
  CHECK(pool.stats().bytes_in_use >= total);
  for (const auto& blocks : held)
    for (const auto& [start, bytes] : blocks) pool.deallocate(reinterpret_cast<void*>(start), bytes);
  CHECK(pool.stats().bytes_in_use == 0);
}

TEST_CASE("block pool: a full device gives back the cached segments and retries, then answers nullptr") {
  Rig rig;
  rig.device.capacity = 44 * MiB;
  void* a = rig.pool.allocate(20 * MiB);
  void* b = rig.pool.allocate(3 * MiB);
  rig.pool.deallocate(a, 20 * MiB);  // its segment is cached
  void* c = rig.pool.allocate(22 * MiB);  // 40 + 22 > 44: a's segment goes back, then 20 + 22 fits
  REQUIRE(c != nullptr);
  BlockPoolStats s = rig.pool.stats();
  CHECK(s.segment_frees == 1);
  CHECK(s.bytes_reserved == 42 * MiB);
  CHECK(rig.device.used == 42 * MiB);
  CHECK(rig.pool.allocate(30 * MiB) == nullptr);  // nothing cached is a whole segment: no room
  CHECK(rig.pool.stats().bytes_in_use == s.bytes_in_use);
  CHECK(rig.pool.stats().bytes_reserved == s.bytes_reserved);
  rig.pool.deallocate(b, 3 * MiB);
  rig.pool.deallocate(c, 22 * MiB);
}

TEST_CASE("block pool: freeing a pointer it did not give, twice, or with another size is an error") {
  Rig rig;
  void* p = rig.pool.allocate(4000);
  int on_stack = 0;
  CHECK_THROWS_WITH_AS(rig.pool.deallocate(&on_stack, 4), doctest::Contains("which is not a block in use"), Error);
  CHECK_THROWS_WITH_AS(rig.pool.deallocate(p, 5000), doctest::Contains("was allocated for 4096 bytes"), Error);
  CHECK(rig.pool.block_in_use_bytes(p) == 4096);
  CHECK(rig.pool.block_in_use_bytes(&on_stack) == 0);
  rig.pool.deallocate(p, 3900);  // the same rounded size is the same request
  CHECK(rig.pool.block_in_use_bytes(p) == 0);
  CHECK_THROWS_WITH_AS(rig.pool.deallocate(p, 4000), doctest::Contains("freed twice"), Error);
  rig.pool.deallocate(nullptr, 123);  // ignored
}

TEST_CASE("block pool: destroyed with blocks in use, it gives back every segment") {
  FakeDevice device;
  {
    BlockPool pool([&](size_t bytes) { return device.allocate(bytes); }, [&](void* p) { device.free(p); });
    pool.allocate(100);
    pool.allocate(5 * MiB);
    pool.deallocate(pool.allocate(40 * MiB), 40 * MiB);
    CHECK(device.segments.size() == 3);
  }
  CHECK(device.segments.empty());
}

TEST_CASE("block pool: random allocations and frees never overlap, stay in their segments, and add up") {
  Rig rig;
  Rng rng(7);
  std::map<uintptr_t, size_t> live;  // block start -> rounded request
  std::map<uintptr_t, size_t> requested;
  size_t rounded_total = 0, large_live = 0;
  const auto check_counts = [&] {
    const BlockPoolStats s = rig.pool.stats();
    // every block is its rounded request, plus at most a 1 MiB rest for a large one
    CHECK(s.bytes_in_use >= rounded_total);
    CHECK(s.bytes_in_use <= rounded_total + large_live * MiB);
    CHECK(s.bytes_reserved == rig.device.used);
    CHECK(s.peak_bytes_in_use >= s.bytes_in_use);
    CHECK(s.peak_bytes_reserved >= s.bytes_reserved);
  };
  for (int step = 0; step < 20000; ++step) {
    if (live.empty() || rng.uniform() < 0.55) {
      // sizes from a byte to 64 MiB, log-uniform: small, medium and large requests alike
      const size_t bytes = static_cast<size_t>(std::exp(rng.uniform() * std::log(64.0 * MiB))) + 1;
      void* p = rig.pool.allocate(bytes);
      REQUIRE(p != nullptr);
      const auto start = reinterpret_cast<uintptr_t>(p);
      const size_t size = BlockPool::rounded_size(bytes);
      REQUIRE(start % 512 == 0);
      REQUIRE(rig.device.segment_of(p, size) != rig.device.segments.end());
      const auto after = live.lower_bound(start);
      if (after != live.end()) REQUIRE(start + size <= after->first);
      if (after != live.begin()) REQUIRE(std::prev(after)->first + std::prev(after)->second <= start);
      live[start] = size;
      requested[start] = bytes;
      rounded_total += size;
      large_live += size > MiB;
    } else {
      auto it = live.begin();
      std::advance(it, static_cast<long>(rng.below(live.size())));
      rig.pool.deallocate(reinterpret_cast<void*>(it->first), requested[it->first]);
      rounded_total -= it->second;
      large_live -= it->second > MiB;
      requested.erase(it->first);
      live.erase(it);
    }
    if (step % 97 == 0) check_counts();
    if (step % 4999 == 0) rig.pool.release_cached();
  }
  check_counts();
  for (const auto& [start, bytes] : requested) rig.pool.deallocate(reinterpret_cast<void*>(start), bytes);
  CHECK(rig.pool.stats().bytes_in_use == 0);
  rig.pool.release_cached();  // every segment merged back whole
  CHECK(rig.pool.stats().bytes_reserved == 0);
  CHECK(rig.device.segments.empty());
}

TEST_CASE("block pool: the same allocations every step need no new segment after the first steps") {
  Rig rig;
  Rng rng(3);
  // a training step's shape: activations kept to the end of the step, temporaries freed at once
  std::vector<size_t> activations, temporaries;
  for (int i = 0; i < 150; ++i) {
    activations.push_back(static_cast<size_t>(rng.uniform() * 30 * MiB) + 1);
    temporaries.push_back(static_cast<size_t>(rng.uniform() * 8 * MiB) + 1);
  }
  const auto step = [&] {
    std::vector<void*> kept;
    for (size_t i = 0; i < activations.size(); ++i) {
      kept.push_back(rig.pool.allocate(activations[i]));
      rig.pool.deallocate(rig.pool.allocate(temporaries[i]), temporaries[i]);
    }
    for (size_t i = kept.size(); i-- > 0;) rig.pool.deallocate(kept[i], activations[i]);
  };
  step();
  step();
  const BlockPoolStats warm = rig.pool.stats();
  for (int i = 0; i < 10; ++i) step();
  CHECK(rig.pool.stats().segment_allocations == warm.segment_allocations);
  CHECK(rig.pool.stats().peak_bytes_reserved == warm.peak_bytes_reserved);
}
