// CUDA kernels for binary codes and health checks: count_non_finite (the training loop's NaN watch,
// which adds to a device counter so that no step waits for the GPU), pack_signs (real-valued codes to
// sign bits) and hamming_distances (popcount of XOR over packed words). Twins of the CPU kernels in
// core/cpu_backend.cpp; contracts in core/backend.h. ops (core/ops.cpp) has checked shapes and dtypes.
#include <algorithm>
#include <cstdint>

#include "cuda/check.h"
#include "cuda/device.h"
#include "cuda/kernel_helpers.cuh"
#include "cuda/kernels.h"

namespace mdff::cuda {

namespace {

// ---------------------------------------------------------------------------------------------------
// count_non_finite: one block per chunk of the tensors (kernel_helpers.cuh), one atomicAdd per block that
// finds any.

template <class T>
__global__ void count_non_finite_kernel(const __grid_constant__ ChunkTable<T> table, int32_t* count) {
  const typename ChunkTable<T>::Chunk& chunk = table.chunks[blockIdx.x];
  int found = 0;
  for (int64_t i = threadIdx.x; i < chunk.count; i += blockDim.x) found += !isfinite(chunk.data[i]);
  if (__syncthreads_or(found) == 0) return;  // the usual case: nothing to add (uniform across the block)
  __shared__ int block_total;
  if (threadIdx.x == 0) block_total = 0;
  __syncthreads();
  if (found) atomicAdd(&block_total, found);
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(count, block_total);
}

// ---------------------------------------------------------------------------------------------------
// pack_signs: one thread per output word (N,W); bit b of word w is x[n, 32w + b] >= 0.

template <class T>
__global__ void pack_signs_kernel(const T* x, int64_t rows, int64_t bits, int64_t words, uint32_t* codes) {
  const int64_t total = rows * words;
  for (int64_t i = grid_start(); i < total; i += grid_step()) {
    const int64_t row = i / words, word = i % words;
    const int64_t first = word * 32, last = min(bits, first + 32);
    const T* values = x + row * bits;
    uint32_t packed = 0;
    for (int64_t b = first; b < last; ++b)
      if (values[b] >= T(0)) packed |= 1u << (b - first);
    codes[i] = packed;
  }
}

// ---------------------------------------------------------------------------------------------------
// The Hamming distance of two codes of `words` 32-bit words.
__device__ inline int hamming_distance(const uint32_t* a, const uint32_t* b, int64_t words) {
  int d = 0;
  for (int64_t w = 0; w < words; ++w) d += __popc(a[w] ^ b[w]);
  return d;
}

// hamming_distances: a 2-D grid over (query, database row); the query's words are read by every
// thread of a block from cache, the database row by one thread. Codes are short (W <= 4 for 128 bits),
// so the kernel is bound by writing the (Q,N) distances.

__global__ void hamming_kernel(const uint32_t* queries, const uint32_t* database, int64_t q_rows, int64_t db_rows,
                               int64_t words, int32_t* distances) {
  const int64_t q = blockIdx.y;
  const uint32_t* query = queries + q * words;
  for (int64_t j = grid_start(); j < db_rows; j += grid_step())
    distances[q * db_rows + j] = hamming_distance(query, database + j * words, words);
}

// ---------------------------------------------------------------------------------------------------
// hamming_top_k: the first k of each query's ranking by (distance, database index), one warp per query.
// Pass 1 counts the distances (a histogram over 0..bits in shared memory) and finds the cut-off distance D:
// every item nearer than D is in the top k, and of the items at exactly D the first (by index) fill it.
// Pass 2 walks the database in index order, 32 items at a time, and places each kept item at
//   start[d] + (items at distance d before this chunk) + (lanes below it in this chunk at distance d),
// the in-chunk part from __match_any_sync: a stable counting sort, so ties keep the database order exactly
// as on the CPU. The database's words are read twice per query: for 1M 64-bit codes, 8 MB that the 50 MB
// L2 cache keeps for the next queries. With few queries most SMs idle (one warp each); the ranking pays
// for many queries at once.

__global__ void hamming_top_k_kernel(const uint32_t* queries, const uint32_t* database, int64_t db_rows, int64_t words,
                                     int bins, int64_t k, int32_t* out_index, int32_t* out_distance) {
  extern __shared__ int shared[];
  int* count = shared;            // [bins]: items at each distance (pass 1), then placed so far (pass 2)
  int* start = shared + bins;     // [bins]: the first output position of each distance d < D, and of D
  const int lane = threadIdx.x;   // blockDim.x == 32: one warp
  const int64_t q = blockIdx.x;
  const uint32_t* query = queries + q * words;
  for (int b = lane; b < bins; b += 32) count[b] = 0;
  __syncwarp();
  for (int64_t j = lane; j < db_rows; j += 32) atomicAdd(&count[hamming_distance(query, database + j * words, words)], 1);
  __syncwarp();
  // The cut-off: D is the first distance where the running total reaches k (k <= db_rows, so it exists).
  __shared__ int cut;
  if (lane == 0) {
    int64_t total = 0;
    int d = 0;
    for (; d < bins; ++d) {
      start[d] = static_cast<int>(total);
      total += count[d];
      if (total >= k) break;
    }
    cut = d;
  }
  __syncwarp();
  const int D = cut;
  for (int b = lane; b < bins; b += 32) count[b] = 0;
  __syncwarp();
  int32_t* index_row = out_index + q * k;
  int32_t* distance_row = out_distance + q * k;
  const unsigned below = (1u << lane) - 1;  // lanes before this one
  for (int64_t base = 0; base < db_rows; base += 32) {
    const int64_t j = base + lane;
    const bool valid = j < db_rows;
    const int d = valid ? hamming_distance(query, database + j * words, words) : -1;
    const bool kept_bin = valid && d <= D;
    // Lanes with the same distance, and this lane's place among them.
    const unsigned same = __match_any_sync(0xffffffffu, kept_bin ? d : -1);
    const int before_in_chunk = __popc(same & below);
    const int position = kept_bin ? start[d] + count[d] + before_in_chunk : 0;
    // Every item nearer than D lands below start[D] < k; of those at D, the first k - start[D] by index.
    if (kept_bin && position < k) {
      index_row[position] = static_cast<int32_t>(j);
      distance_row[position] = d;
    }
    __syncwarp();
    // The lowest lane of each distance group advances its counter by the group's size.
    if (kept_bin && before_in_chunk == 0) count[d] += __popc(same);
    __syncwarp();
  }
}

}  // namespace

void count_non_finite(const std::vector<Tensor>& tensors, const Tensor& count) {
  if (tensors.empty()) return;
  int32_t* counter = count.data<int32_t>();
  auto count_all = [&](auto zero) {
    using T = decltype(zero);
    std::vector<typename ChunkTable<T>::Chunk> pieces;
    for (const Tensor& x : tensors) pieces.push_back({x.data<T>(), 0, x.numel()});  // one dtype (ops checks)
    launch_chunked<T>(pieces, [&](const ChunkTable<T>& table) {
      count_non_finite_kernel<T><<<table.size, kThreads, 0, stream()>>>(table, counter);
      MDFF_CUDA_CHECK_LAUNCH();
    });
  };
  if (tensors.front().dtype() == DType::F32) count_all(float{});
  else count_all(double{});
}

void pack_signs(const Tensor& x, const Tensor& codes) {
  const int64_t rows = x.size(0), bits = x.size(1), words = codes.size(1);
  auto* out = reinterpret_cast<uint32_t*>(codes.data<int32_t>());
  const int blocks = blocks_for(rows * words);
  if (x.dtype() == DType::F32)
    pack_signs_kernel<float><<<blocks, kThreads, 0, stream()>>>(x.data<float>(), rows, bits, words, out);
  else
    pack_signs_kernel<double><<<blocks, kThreads, 0, stream()>>>(x.data<double>(), rows, bits, words, out);
  MDFF_CUDA_CHECK_LAUNCH();
}

void hamming_distances(const Tensor& queries, const Tensor& database, const Tensor& distances) {
  const int64_t q_rows = queries.size(0), db_rows = database.size(0), words = queries.size(1);
  if (q_rows == 0 || db_rows == 0) return;  // a grid dimension of 0 is an invalid launch
  MDFF_CHECK(q_rows <= 65535, "cuda hamming_distances: at most 65,535 queries per call (grid y), got ", q_rows,
             "; split the queries");
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((db_rows + kThreads - 1) / kThreads, 64)),
                  static_cast<unsigned>(q_rows));
  hamming_kernel<<<grid, kThreads, 0, stream()>>>(reinterpret_cast<const uint32_t*>(queries.data<int32_t>()),
                                                  reinterpret_cast<const uint32_t*>(database.data<int32_t>()), q_rows,
                                                  db_rows, words, distances.data<int32_t>());
  MDFF_CUDA_CHECK_LAUNCH();
}

void hamming_top_k(const Tensor& queries, const Tensor& database, int64_t k, const Tensor& indices,
                   const Tensor& distances) {
  const int64_t q_rows = queries.size(0), db_rows = database.size(0), words = queries.size(1);
  if (q_rows == 0 || k == 0) return;
  const int bins = static_cast<int>(32 * words + 1);  // distances 0..32 W
  const size_t shared_bytes = 2 * static_cast<size_t>(bins) * sizeof(int);
  MDFF_CHECK(shared_bytes <= 48 * 1024, "cuda hamming_top_k: codes of ", 32 * words, " bits need ", shared_bytes,
             " bytes of shared memory per query, more than 48 KiB; rank codes of up to 6,000 bits");
  MDFF_CHECK(q_rows <= INT32_MAX && db_rows <= INT32_MAX, "cuda hamming_top_k: ", q_rows, " queries x ", db_rows,
             " codes exceed 32-bit indices");
  hamming_top_k_kernel<<<static_cast<unsigned>(q_rows), 32, shared_bytes, stream()>>>(
      reinterpret_cast<const uint32_t*>(queries.data<int32_t>()), reinterpret_cast<const uint32_t*>(database.data<int32_t>()),
      db_rows, words, bins, k, indices.data<int32_t>(), distances.data<int32_t>());
  MDFF_CUDA_CHECK_LAUNCH();
}

}  // namespace mdff::cuda
