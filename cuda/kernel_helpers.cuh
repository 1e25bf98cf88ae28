// Device-side helpers shared by the hand-written kernels (elementwise.cu, layers.cu, losses.cu, codes.cu):
// the launch and indices of a grid-stride loop, the chunk tables of multi-tensor kernels, the math library
// in both precisions, ReLU, sign, the stable softplus and sigmoid (the CPU's formulas,
// core/cpu_backend.cpp), deterministic warp and block sums, and a row's log-sum-exp.
#pragma once
#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "cuda/device.h"

namespace mdff::cuda {

constexpr int kThreads = 256;  // threads per block of the grid-stride kernels
constexpr int kWarp = 32;

// Blocks for a grid-stride loop over n items: one per kThreads items, capped at a few waves of the GPU
// (each thread then handles several items).
inline int blocks_for(int64_t n) {
  const int64_t cap = std::max(1, device_info().multiprocessors) * int64_t(16);
  return static_cast<int>(std::min((n + kThreads - 1) / kThreads, cap));
}

// Index of this thread in a grid-stride loop, and the step between its items.
__device__ inline int64_t grid_start() { return blockIdx.x * int64_t(blockDim.x) + threadIdx.x; }
__device__ inline int64_t grid_step() { return int64_t(gridDim.x) * blockDim.x; }

// ---- multi-tensor kernels (the optimizers over a model's gradients, the NaN watch) ----
// Pieces of several tensors for one launch: block b works on chunks[b]. The table is the kernel's
// parameter, read in place (__grid_constant__; since CUDA 12.1 a kernel may take 32,764 bytes of
// parameters on Volta and newer, and a table is 24,008), so a launch copies nothing to the device first:
// ResNet50-MDFF-SH's gradients (28.5 million elements in 181 tensors) make 566 chunks, one launch.
template <class T>
struct ChunkTable {
  static constexpr int kCapacity = 1000;
  static constexpr int64_t kChunkElements = int64_t(1) << 16;
  struct Chunk {
    const T* data;   // the chunk's first element
    int64_t offset;  // where that element sits in a flat buffer (the optimizers' parameters); else unused
    int64_t count;   // elements
  };
  int size = 0;
  Chunk chunks[kCapacity];
};

// Cuts `pieces` (whole tensors: any count) into chunks of at most kChunkElements and calls launch(table)
// once per full table and once for the rest: one launch unless they need more than kCapacity chunks.
template <class T, class Launch>
void launch_chunked(const std::vector<typename ChunkTable<T>::Chunk>& pieces, Launch&& launch) {
  using Table = ChunkTable<T>;
  auto table = std::make_unique<Table>();  // 24 KB: off the host's stack
  for (const typename Table::Chunk& piece : pieces) {
    for (int64_t start = 0; start < piece.count; start += Table::kChunkElements) {
      if (table->size == Table::kCapacity) {
        launch(*table);
        table->size = 0;
      }
      table->chunks[table->size++] = {piece.data + start, piece.offset + start,
                                      std::min(Table::kChunkElements, piece.count - start)};
    }
  }
  if (table->size > 0) launch(*table);
}

// The math library in both precisions, under one name.
__device__ inline float dev_exp(float x) { return expf(x); }
__device__ inline double dev_exp(double x) { return exp(x); }
__device__ inline float dev_log1p(float x) { return log1pf(x); }
__device__ inline double dev_log1p(double x) { return log1p(x); }
__device__ inline float dev_tanh(float x) { return tanhf(x); }
__device__ inline double dev_tanh(double x) { return tanh(x); }

// ReLU as every kernel applies it (the unary op, batch norm's fused ReLU, AddRelu): NaN maps to 0, as on
// the CPU.
template <class T>
__device__ inline T relu_value(T x) {
  return x > T(0) ? x : T(0);
}

// sign(x) as the unary op computes it: +1 for x >= 0 (sign(0) = +1), -1 otherwise.
template <class T>
__device__ inline T sign_value(T x) {
  return x >= T(0) ? T(1) : T(-1);
}

// softplus(x) = log(1 + e^x), written so that e^x never overflows: max(x,0) + log1p(e^-|x|).
template <class T>
__device__ inline T softplus(T x) {
  const T neg_abs = x > T(0) ? -x : x;
  return (x > T(0) ? x : T(0)) + dev_log1p(dev_exp(neg_abs));
}

// sigmoid(x) = 1 / (1 + e^-x), the derivative of softplus, with the exponent always <= 0.
template <class T>
__device__ inline T sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + dev_exp(-x));
  const T e = dev_exp(x);
  return e / (T(1) + e);
}

// Sum of v over the warp, returned in every lane (butterfly: each lane adds the same pairs, so all
// lanes hold the same bits). Every lane of the warp must call it.
__device__ inline double warp_sum(double v) {
  for (int lane_mask = kWarp / 2; lane_mask > 0; lane_mask /= 2) v += __shfl_xor_sync(0xffffffffu, v, lane_mask);
  return v;
}

// Maximum of v over the warp, in every lane. Every lane of the warp must call it.
template <class T>
__device__ inline T warp_max(T v) {
  for (int lane_mask = kWarp / 2; lane_mask > 0; lane_mask /= 2) {
    const T other = __shfl_xor_sync(0xffffffffu, v, lane_mask);
    v = other > v ? other : v;
  }
  return v;
}

// log(sum_j e^row[j]) over a row of k values, computed by a whole warp (lane = threadIdx.x % 32) and
// returned in every lane: top + log(sum e^(row[j] - top)), the exponentials and the sum in double (the
// CPU's row_log_sum_exp). log_softmax and the fused cross-entropy share it.
template <class T>
__device__ inline T warp_log_sum_exp(const T* row, int64_t k, int lane) {
  T top = T(-INFINITY);
  for (int64_t j = lane; j < k; j += kWarp) top = row[j] > top ? row[j] : top;
  top = warp_max(top);
  double sum = 0;
  for (int64_t j = lane; j < k; j += kWarp) sum += exp(double(row[j] - top));
  return static_cast<T>(top + log(warp_sum(sum)));
}

// Sum of v over the block, returned in every thread, in a fixed order (deterministic). Every thread
// of the block must call it; blockDim.x is a multiple of 32. Two barriers suffice for back-to-back
// calls: a call's writes of `partial` and of `total` come after the previous call's last reads of
// each, with a barrier between.
__device__ inline double block_sum(double v) {
  __shared__ double partial[kWarp];
  __shared__ double total;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = warp_sum(lane < static_cast<int>(blockDim.x / kWarp) ? partial[lane] : 0.0);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

}  // namespace mdff::cuda
