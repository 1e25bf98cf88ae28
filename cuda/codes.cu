// CUDA kernels for binary codes and health checks: count_non_finite (the training loop's NaN watch,
// which adds to a device counter so that no step waits for the GPU), pack_signs (real-valued codes to
// sign bits) and hamming_distances (popcount of XOR over packed words). Twins of the CPU kernels in
// core/cpu_backend.cpp; contracts in core/backend.h. ops (core/ops.cpp) has checked shapes and dtypes.
#include <algorithm>
#include <cstdint>

#include "cuda/check.h"
#include "cuda/device.h"
#include "cuda/kernels.h"

namespace mdff::cuda {

namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n, int64_t waves = 8) {
  const int64_t cap = std::max(1, device_info().multiprocessors) * waves;
  return static_cast<int>(std::max<int64_t>(1, std::min((n + kThreads - 1) / kThreads, cap)));
}

// ---------------------------------------------------------------------------------------------------
// count_non_finite: each block counts its share, one atomicAdd per block.

template <class T>
__global__ void count_non_finite_kernel(const T* x, int64_t n, int32_t* count) {
  int found = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    found += !isfinite(x[i]);
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
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
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
// hamming_distances: a 2-D grid over (query, database row); the query's words are read by every
// thread of a block from cache, the database row by one thread. Codes are short (W <= 4 for 128 bits),
// so the kernel is bound by writing the (Q,N) distances.

__global__ void hamming_kernel(const uint32_t* queries, const uint32_t* database, int64_t q_rows, int64_t db_rows,
                               int64_t words, int32_t* distances) {
  const int64_t q = blockIdx.y;
  const uint32_t* query = queries + q * words;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < db_rows; j += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t* row = database + j * words;
    int d = 0;
    for (int64_t w = 0; w < words; ++w) d += __popc(query[w] ^ row[w]);
    distances[q * db_rows + j] = d;
  }
}

}  // namespace

void count_non_finite(const Tensor& x, const Tensor& count) {
  const int64_t n = x.numel();
  if (n == 0) return;
  int32_t* counter = count.data<int32_t>();
  if (x.dtype() == DType::F32)
    count_non_finite_kernel<float><<<blocks_for(n), kThreads, 0, stream()>>>(x.data<float>(), n, counter);
  else
    count_non_finite_kernel<double><<<blocks_for(n), kThreads, 0, stream()>>>(x.data<double>(), n, counter);
  MDFF_CUDA_CHECK_LAUNCH();
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

}  // namespace mdff::cuda
