// CUDA kernels for the network layers, the row kernels and the optimizers: batch norm, max and average
// pooling, nearest and bilinear resizing, copy_block (concat), log_softmax, gather_rows / scatter_rows,
// RMSProp and SGD steps. Each is the twin of the CPU kernel of the same name (core/cpu_backend.cpp) and
// follows the contract in core/backend.h: sums accumulate in double as the CPU's do, and per-element
// formulas are written in the CPU's order of operations. Row indices out of range are recorded in a
// device-side error word that check_device_errors() reads at the next synchronisation.
// Batch norm spreads each channel's reduction over a (channel, slice) grid sized to fill the GPU: the
// blocks' double partial sums are combined per channel in a fixed order (deterministic, no atomics),
// and y and grad_x are written by elementwise kernels over the whole tensor (see its section).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "cuda/allocator.h"
#include "cuda/check.h"
#include "cuda/device.h"
#include "cuda/kernel_helpers.cuh"
#include "cuda/kernels.h"

namespace mdff::cuda {

namespace {

// Batch norm's (channel, slice) reduction grids: blocks of kReduceThreads, at least kReduceBlocksPerSm
// of them resident per SM (__launch_bounds__: at most 64 registers), slices of at least kMinSlicePacks
// packs.
constexpr int kReduceThreads = 256;
constexpr int kReduceBlocksPerSm = 4;
constexpr int64_t kMinSlicePacks = 2 * kReduceThreads;

__device__ inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ inline float dev_sqrt(float x) { return sqrtf(x); }
__device__ inline double dev_sqrt(double x) { return sqrt(x); }

// ---- checks ----

void check_float(const Tensor& t, const char* kernel, const char* what) {
  MDFF_CHECK(t.defined(), "cuda ", kernel, ": ", what, " is undefined");
  MDFF_CHECK(is_floating(t.dtype()), "cuda ", kernel, ": ", what, " needs float32 or float64, got ",
             dtype_name(t.dtype()));
}

// t is defined, has this dtype and this shape.
void check_tensor(const Tensor& t, DType dtype, const Shape& shape, const char* kernel, const char* what) {
  MDFF_CHECK(t.defined(), "cuda ", kernel, ": ", what, " is undefined");
  MDFF_CHECK(t.dtype() == dtype && t.shape() == shape, "cuda ", kernel, ": ", what, " must be ", dtype_name(dtype),
             " ", shape_str(shape), ", got ", dtype_name(t.dtype()), " ", shape_str(t.shape()));
}

void check_rank(const Tensor& t, int64_t rank, const char* kernel, const char* what) {
  MDFF_CHECK(t.dim() == rank, "cuda ", kernel, ": ", what, " must have ", rank, " dimensions, got ",
             shape_str(t.shape()));
}

// (N,C,H,W) input and output that share N and C and the dtype.
void check_planes(const Tensor& in, const Tensor& out, const char* kernel, const char* in_name, const char* out_name) {
  check_float(in, kernel, in_name);
  check_rank(in, 4, kernel, in_name);
  check_rank(out, 4, kernel, out_name);
  MDFF_CHECK(out.dtype() == in.dtype() && out.size(0) == in.size(0) && out.size(1) == in.size(1), "cuda ", kernel,
             ": ", in_name, " ", dtype_name(in.dtype()), " ", shape_str(in.shape()), " and ", out_name, " ",
             dtype_name(out.dtype()), " ", shape_str(out.shape()), " differ in dtype, N or C");
}

// Calls fn(T{}) with T = float or double according to `dtype` (checked float beforehand).
template <class Fn>
void dispatch_float(DType dtype, Fn&& fn) {
  if (dtype == DType::F32) fn(float{});
  else fn(double{});
}

// Calls fn(U{}) with U an unsigned integer of the dtype's size: kernels that only move values.
template <class Fn>
void dispatch_word(DType dtype, Fn&& fn) {
  if (dtype_size(dtype) == 8) fn(uint64_t{});
  else fn(uint32_t{});
}

// ---------------------------------------------------------------------------------------------------
// batch norm: x (N,C,plane) with plane = H*W (the product of the dimensions after C). A channel's
// values are N runs of `plane` contiguous values at stride C*plane.
//
// Training forward, 5 kernels:
//   1. batch_norm_partial_kernel (grid (C, S)): partial (C,S) = sums of x over slice s of channel c
//   2. batch_norm_mean_kernel (a warp per channel): mean (C) = the partials' sum / (N*plane)
//   3. batch_norm_partial_kernel again: partial (C,S) = sums of (x - mean)^2
//   4. batch_norm_forward_finish_kernel (a warp per channel): running statistics, save_mean,
//      save_invstd, and coef (C,2) = (scale, shift)
//   5. batch_norm_forward_apply_kernel (grid-stride over all N*C*plane): y = x * scale + shift (then
//      max(y, 0) for batch_norm2d_relu)
// Evaluation runs 4 (from the running statistics) and 5. Backward: batch_norm_backward_partial_kernel
// (grid (C, S), partial (2,C,S): sums of dy and of dy*xhat) when sums are needed, then
// batch_norm_backward_finish_kernel (grad_gamma, grad_beta, coef (C,4) = (a, b, c, mean)), then
// batch_norm_backward_apply_kernel for grad_x.
//
// Each channel's N*plane values are cut into S slices (see slices_for: with C <= 4 x SMs the grid is
// about 4 blocks per SM, one wave of equal blocks; with more channels S = 1 and C blocks): slice s is
// a contiguous run of (sample, position) work, the block's threads stride over it. The partials are
// combined in a fixed order (slice order per lane, then a butterfly over the warp) and there are no
// atomics: the same inputs give the same bits on the same GPU (S depends on its SM count). Values are
// read in packs of V (16 bytes) when plane is a multiple of V: the order of the sums depends on the
// shape only, not on the tensors' alignment, which only chooses vector loads over V scalar loads.
//
// Traffic, (128,64,112,112) F32 (411 MB a tensor, larger than the 50 MB L2, so every pass goes to
// memory): training forward reads x three times and writes y, 1.64 GB, ~0.55 ms at 3 TB/s; backward
// reads dy and x twice and writes dx, 2.06 GB, ~0.69 ms. The per-channel partials and coefficients
// are a few KB. The former design moved the same bytes with one 512-thread block per channel (64
// blocks: under half of the 132 SMs, a quarter of each one's threads, and an emulated 64-bit division
// per value), latency-bound at a fraction of the bandwidth: expect it several times slower (estimate,
// not measured).

template <class T>
constexpr int kPack = 16 / sizeof(T);  // values per 16-byte pack: 4 float, 2 double

template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Pack `unit` (values [unit*V, unit*V + V)) of base: one vector access when kAligned, V scalar ones
// otherwise.
template <class T, int V, bool kAligned>
__device__ inline Pack<T, V> load_pack(const T* base, int64_t unit) {
  if constexpr (kAligned) {
    return reinterpret_cast<const Pack<T, V>*>(base)[unit];
  } else {
    Pack<T, V> p;
#pragma unroll
    for (int j = 0; j < V; ++j) p.v[j] = base[unit * V + j];
    return p;
  }
}

template <class T, int V, bool kAligned>
__device__ inline void store_pack(T* base, int64_t unit, const Pack<T, V>& p) {
  if constexpr (kAligned) {
    reinterpret_cast<Pack<T, V>*>(base)[unit] = p;
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) base[unit * V + j] = p.v[j];
  }
}

// Calls fn(at) for this thread's packs of slice blockIdx.y (of gridDim.y) of channel blockIdx.x, at
// being the pack's index in x seen as (N, C, units) packs, units = plane / V. The channel's n*units
// packs, in (sample, position) order, are cut into gridDim.y contiguous runs; thread t takes packs
// first + t, first + t + blockDim.x, ... The (sample, position) pair is carried from one pack to the
// next by the step's quotient and remainder (no division per value).
template <class Fn>
__device__ inline void for_each_in_slice(int64_t n, int64_t channels, int64_t units, Fn&& fn) {
  const int64_t c = blockIdx.x, count = n * units;
  const int64_t first = count * blockIdx.y / gridDim.y, last = count * (blockIdx.y + 1) / gridDim.y;
  int64_t k = first + threadIdx.x;
  if (k >= last) return;  // (count > 0 from here, so units > 0)
  const int64_t sample = k / units, row = channels * units;
  int64_t position = k - sample * units, base = (sample * channels + c) * units;  // at = base + position
  const int64_t step_samples = blockDim.x / units, step_position = blockDim.x - step_samples * units;
  const int64_t step_base = step_samples * row;
#pragma unroll 4
  for (; k < last; k += blockDim.x) {
    fn(base + position);
    position += step_position;  // < 2*units: at most one carry
    base += step_base;
    if (position >= units) {
      position -= units;
      base += row;
    }
  }
}

// Calls fn(i, c) for this thread's packs i of a grid-stride loop over x seen as (N, C, units) packs,
// c being the pack's channel; (position, channel) are carried from one pack to the next like above.
template <class Fn>
__device__ inline void for_each_pack(int64_t total, int64_t channels, int64_t units, Fn&& fn) {
  int64_t i = grid_start();
  if (i >= total) return;  // (total > 0 from here, so units > 0)
  const int64_t step = grid_step(), planes = i / units, step_planes = step / units;
  int64_t position = i - planes * units, c = planes % channels;
  const int64_t step_position = step - step_planes * units, step_channel = step_planes % channels;
  for (; i < total; i += step) {
    fn(i, c);
    position += step_position;  // < 2*units: at most one carry
    c += step_channel;          // < 2*channels with the carry: at most one wrap
    if (position >= units) {
      position -= units;
      ++c;
    }
    if (c >= channels) c -= channels;
  }
}

// Sum over s of partial[c*slices + s] (partial (C,S)), in every lane of the warp: lane l adds slices
// l, l + 32, ... in order, then the butterfly (a fixed order). Every lane must call it.
__device__ inline double combine_partials(const double* partial, int64_t c, int64_t slices) {
  double sum = 0;
  for (int64_t s = threadIdx.x % kWarp; s < slices; s += kWarp) sum += partial[c * slices + s];
  return warp_sum(sum);
}

// partial (C,S): the sum over slice (blockIdx.y) of channel blockIdx.x of x (kSquares false) or of
// (x - mean)^2 (kSquares true; mean (C) in double). x (N,C,plane) in packs of V.
template <class T, int V, bool kAligned, bool kSquares>
__global__ void __launch_bounds__(kReduceThreads, kReduceBlocksPerSm)
    batch_norm_partial_kernel(const T* x, const double* mean, double* partial, int64_t n, int64_t channels,
                              int64_t units) {
  const double m = kSquares ? mean[blockIdx.x] : 0.0;
  double sum = 0;
  for_each_in_slice(n, channels, units, [&](int64_t at) {
    const Pack<T, V> p = load_pack<T, V, kAligned>(x, at);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if constexpr (kSquares) {
        const double d = double(p.v[j]) - m;
        sum += d * d;
      } else {
        sum += double(p.v[j]);
      }
    }
  });
  sum = block_sum(sum);
  if (threadIdx.x == 0) partial[int64_t(blockIdx.x) * gridDim.y + blockIdx.y] = sum;
}

// mean (C) = sum of partial (C,S) / count, a warp per channel.
__global__ void batch_norm_mean_kernel(const double* partial, int64_t slices, int64_t channels, int64_t count,
                                       double* mean) {
  for (int64_t c = grid_start() / kWarp; c < channels; c += grid_step() / kWarp) {
    const double sum = combine_partials(partial, c, slices);
    if (threadIdx.x % kWarp == 0) mean[c] = sum / count;
  }
}

// A warp per channel. Training: var = sum of partial (C,S) (squared deviations from batch_mean (C)) /
// count, running statistics updated; evaluation: the running statistics (partial and batch_mean
// unused). Then save_mean, save_invstd (C) and coef (C,2) = (scale, shift) for y = x*scale + shift.
template <class T>
__global__ void batch_norm_forward_finish_kernel(const double* partial, int64_t slices, const double* batch_mean,
                                                 const T* gamma, const T* beta, T* running_mean, T* running_var,
                                                 bool training, double momentum, double eps, int64_t channels,
                                                 int64_t count, T* save_mean, T* save_invstd, double* coef) {
  for (int64_t c = grid_start() / kWarp; c < channels; c += grid_step() / kWarp) {
    const double sum_squares = training ? combine_partials(partial, c, slices) : 0.0;  // (all lanes)
    if (threadIdx.x % kWarp == 0) {
      double mean, var;
      if (training) {
        mean = batch_mean[c];
        var = sum_squares / count;
        const double unbiased = count > 1 ? sum_squares / (count - 1) : var;
        running_mean[c] = static_cast<T>((1 - momentum) * running_mean[c] + momentum * mean);
        running_var[c] = static_cast<T>((1 - momentum) * running_var[c] + momentum * unbiased);
      } else {
        mean = running_mean[c];
        var = running_var[c];
      }
      const double invstd = 1.0 / sqrt(var + eps);
      const double scale = invstd * gamma[c];
      save_mean[c] = static_cast<T>(mean);
      save_invstd[c] = static_cast<T>(invstd);
      coef[2 * c] = scale;
      coef[2 * c + 1] = fma(-mean, scale, double(beta[c]));  // as the CPU's batch_norm_shift
    }
  }
}

// y = x * scale + shift (N,C,plane), coef (C,2), in the CPU's rounding (batch_norm_value).
// kRelu: y = max(y, 0) as it is written (batch_norm2d_relu), the unary ReLU's expression.
template <class T, int V, bool kAligned, bool kRelu>
__global__ void batch_norm_forward_apply_kernel(const T* x, const double* coef, T* y, int64_t total, int64_t channels,
                                                int64_t units) {
  for_each_pack(total, channels, units, [&](int64_t i, int64_t c) {
    const double scale = coef[2 * c], shift = coef[2 * c + 1];
    const Pack<T, V> in = load_pack<T, V, kAligned>(x, i);
    Pack<T, V> out;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const T v = static_cast<T>(fma(double(in.v[j]), scale, shift));
      out.v[j] = kRelu ? relu_value(v) : v;
    }
    store_pack<T, V, kAligned>(y, i, out);
  });
}

// partial (2,C,S): [0] the sums of dy, [1] the sums of dy * xhat, xhat = (x - mean) * invstd, over
// slice blockIdx.y of channel blockIdx.x. x and gy (N,C,plane) in packs of V; mean, invstd (C).
template <class T, int V, bool kAligned>
__global__ void __launch_bounds__(kReduceThreads, kReduceBlocksPerSm)
    batch_norm_backward_partial_kernel(const T* x, const T* gy, const T* mean, const T* invstd, double* partial,
                                       int64_t n, int64_t channels, int64_t units) {
  const double m = mean[blockIdx.x], is = invstd[blockIdx.x];
  double sum_gy = 0, sum_gy_xhat = 0;
  for_each_in_slice(n, channels, units, [&](int64_t at) {
    const Pack<T, V> g = load_pack<T, V, kAligned>(gy, at), v = load_pack<T, V, kAligned>(x, at);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const double dy = g.v[j];
      sum_gy += dy;
      sum_gy_xhat += dy * (double(v.v[j]) - m) * is;
    }
  });
  sum_gy = block_sum(sum_gy);
  sum_gy_xhat = block_sum(sum_gy_xhat);
  if (threadIdx.x == 0) {
    const int64_t at = int64_t(blockIdx.x) * gridDim.y + blockIdx.y, stride = int64_t(gridDim.x) * gridDim.y;
    partial[at] = sum_gy;
    partial[stride + at] = sum_gy_xhat;
  }
}

// A warp per channel. With slices > 0: sum(dy) and sum(dy * xhat) from partial (2,C,S), written to
// grad_beta and grad_gamma when given (0 sums otherwise). With coef given: coef (C,4) = (a, b, c,
// mean) for grad_x, training dx = a*dy + b*(x - mean) + c with a = gamma*invstd,
// b = -a/M * sum(dy*xhat) * invstd, c = -a/M * sum(dy); evaluation dx = a*dy.
template <class T>
__global__ void batch_norm_backward_finish_kernel(const double* partial, int64_t slices, const T* gamma,
                                                  const T* mean, const T* invstd, int64_t channels, int64_t count,
                                                  T* grad_gamma, T* grad_beta, double* coef) {
  for (int64_t c = grid_start() / kWarp; c < channels; c += grid_step() / kWarp) {
    double sum_gy = 0, sum_gy_xhat = 0;
    if (slices > 0) {
      sum_gy = combine_partials(partial, c, slices);
      sum_gy_xhat = combine_partials(partial + channels * slices, c, slices);
    }
    if (threadIdx.x % kWarp == 0) {
      if (slices > 0 && grad_gamma) grad_gamma[c] = static_cast<T>(sum_gy_xhat);
      if (slices > 0 && grad_beta) grad_beta[c] = static_cast<T>(sum_gy);
      if (coef) {
        const double is = invstd[c];
        const double a = gamma[c] * is;
        coef[4 * c] = a;
        coef[4 * c + 1] = -a / count * sum_gy_xhat * is;
        coef[4 * c + 2] = -a / count * sum_gy;
        coef[4 * c + 3] = mean[c];
      }
    }
  }
}

// grad_x (N,C,plane) from gy and, in training, x; coef (C,4) from batch_norm_backward_finish_kernel.
template <class T, int V, bool kAligned>
__global__ void batch_norm_backward_apply_kernel(const T* x, const T* gy, const double* coef, bool training, T* gx,
                                                 int64_t total, int64_t channels, int64_t units) {
  for_each_pack(total, channels, units, [&](int64_t i, int64_t c) {
    const double a = coef[4 * c];
    const Pack<T, V> g = load_pack<T, V, kAligned>(gy, i);
    Pack<T, V> out;
    if (training) {
      const double b = coef[4 * c + 1], shift = coef[4 * c + 2], m = coef[4 * c + 3];
      const Pack<T, V> v = load_pack<T, V, kAligned>(x, i);
#pragma unroll
      for (int j = 0; j < V; ++j) out.v[j] = static_cast<T>(a * g.v[j] + b * (double(v.v[j]) - m) + shift);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) out.v[j] = static_cast<T>(a * g.v[j]);
    }
    store_pack<T, V, kAligned>(gx, i, out);
  });
}

// Slices per channel for the (C, S) reduction grids of batch norm: C*S at most the kReduceBlocksPerSm
// blocks per SM that are sure to be resident (S rounded down: one wave of equal blocks, no tail wave of
// a few; 512 of 528 blocks on an H200 for ResNet's 64 to 512 channels), each slice at least
// kMinSlicePacks packs (two per thread), 1 <= S <= 65535 (the grid's y limit). S depends on the GPU's
// SM count, and so do the sums' order and bits.
int64_t slices_for(int64_t channels, int64_t packs_per_channel) {
  const int64_t resident = std::max(1, device_info().multiprocessors) * int64_t(kReduceBlocksPerSm);
  return std::clamp<int64_t>(std::min(resident / channels, packs_per_channel / kMinSlicePacks), 1, 65535);
}

// Calls fn(std::integral_constant<int, V>, std::bool_constant<aligned>) for the batch norm kernels over
// planes of `plane` values of T: V = kPack<T> when plane is a multiple of it, 1 otherwise (the shape
// alone fixes the sums' order); aligned when V > 1 and every pointer (nullptr counts as aligned) is on
// a 16-byte boundary (vector loads and stores).
template <class T, class Fn>
void dispatch_pack(int64_t plane, std::initializer_list<const void*> pointers, Fn&& fn) {
  if (plane % kPack<T> != 0) {
    fn(std::integral_constant<int, 1>{}, std::false_type{});
    return;
  }
  bool aligned = true;
  for (const void* p : pointers) aligned = aligned && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  if (aligned) fn(std::integral_constant<int, kPack<T>>{}, std::true_type{});
  else fn(std::integral_constant<int, kPack<T>>{}, std::false_type{});
}

// ---------------------------------------------------------------------------------------------------
// pooling: one thread per output element (N*C*Ho*Wo), or per plane value in the backward passes

// The CPU's scan: the first maximum wins, a NaN wins over numbers (the last NaN), padding is skipped
// (-inf start); argmax is the index in the H*W plane.
template <class T>
__global__ void max_pool2d_forward_kernel(const T* x, T* y, int32_t* argmax, int64_t total, int64_t h, int64_t w,
                                          int64_t ho, int64_t wo, int kernel, int stride, int padding) {
  for (int64_t o = grid_start(); o < total; o += grid_step()) {
    const int64_t ow = o % wo, oh = (o / wo) % ho, pl = o / (wo * ho);
    const T* in = x + pl * h * w;
    T best = T(-INFINITY);
    int64_t best_at = -1;
    for (int ki = 0; ki < kernel; ++ki) {
      const int64_t ih = oh * stride - padding + ki;
      if (ih < 0 || ih >= h) continue;
      for (int kj = 0; kj < kernel; ++kj) {
        const int64_t iw = ow * stride - padding + kj;
        if (iw < 0 || iw >= w) continue;
        const T v = in[ih * w + iw];
        if (v > best || isnan(v) || best_at < 0) {
          best = v;
          best_at = ih * w + iw;
        }
      }
    }
    y[o] = best;
    argmax[o] = static_cast<int32_t>(best_at);
  }
}

// grad_x (zeroed before) += grad_y at each output's argmax. Overlapping windows can send several
// outputs to one input, hence atomicAdd; an argmax outside the plane is skipped.
template <class T>
__global__ void max_pool2d_backward_kernel(const T* gy, const int32_t* argmax, T* gx, int64_t total,
                                           int64_t out_plane, int64_t in_plane) {
  for (int64_t o = grid_start(); o < total; o += grid_step()) {
    const int32_t at = argmax[o];
    if (at >= 0 && at < in_plane) atomicAdd(gx + (o / out_plane) * in_plane + at, gy[o]);
  }
}

// One warp per (n,c) plane: y = (sum in double) / plane.
template <class T>
__global__ void global_avg_pool_forward_kernel(const T* x, T* y, int64_t planes, int64_t plane) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t pl = grid_start() / kWarp; pl < planes; pl += grid_step() / kWarp) {
    double sum = 0;
    for (int64_t q = lane; q < plane; q += kWarp) sum += double(x[pl * plane + q]);
    sum = warp_sum(sum);
    if (lane == 0) y[pl] = static_cast<T>(sum / plane);
  }
}

template <class T>
__global__ void global_avg_pool_backward_kernel(const T* gy, T* gx, int64_t total, int64_t plane) {
  for (int64_t i = grid_start(); i < total; i += grid_step()) gx[i] = gy[i / plane] / T(plane);
}

// ---------------------------------------------------------------------------------------------------
// resizing (N*C planes of h x w <-> ho x wo)

// PyTorch's mode='nearest' as the CPU computes it: floor(dst * scale) in float, scale = float(in) / out,
// clamped to in - 1.
__device__ inline int64_t nearest_source(int64_t dst, float scale, int64_t in) {
  return min64(static_cast<int64_t>(floorf(static_cast<float>(dst) * scale)), in - 1);
}

// The smallest dst in [0, out] with dst == out or nearest_source(dst) >= target. nearest_source is
// non-decreasing in dst, so the dst mapping to `target` are [first(target), first(target + 1)). The
// search starts at the exact-arithmetic answer and steps the few places float rounding can move it.
__device__ inline int64_t first_reaching(int64_t target, float scale, int64_t in, int64_t out) {
  int64_t dst = min64(target * out / in, out);
  while (dst > 0 && nearest_source(dst - 1, scale, in) >= target) --dst;
  while (dst < out && nearest_source(dst, scale, in) < target) ++dst;
  return dst;
}

template <class T>
__global__ void upsample_nearest_forward_kernel(const T* x, T* y, int64_t total, int64_t h, int64_t w, int64_t ho,
                                                int64_t wo, float scale_h, float scale_w) {
  for (int64_t o = grid_start(); o < total; o += grid_step()) {
    const int64_t ow = o % wo, oh = (o / wo) % ho, pl = o / (wo * ho);
    y[o] = x[(pl * h + nearest_source(oh, scale_h, h)) * w + nearest_source(ow, scale_w, w)];
  }
}

// One thread per source element: adds the outputs that copied it, in the CPU's order (row-major over
// the output), so the sum is deterministic and equal to the CPU's.
template <class T>
__global__ void upsample_nearest_backward_kernel(const T* gy, T* gx, int64_t total, int64_t h, int64_t w,
                                                 int64_t ho, int64_t wo, float scale_h, float scale_w) {
  for (int64_t s = grid_start(); s < total; s += grid_step()) {
    const int64_t iw = s % w, ih = (s / w) % h, pl = s / (w * h);
    const int64_t oh0 = first_reaching(ih, scale_h, h, ho), oh1 = first_reaching(ih + 1, scale_h, h, ho);
    const int64_t ow0 = first_reaching(iw, scale_w, w, wo), ow1 = first_reaching(iw + 1, scale_w, w, wo);
    if (oh0 == oh1 || ow0 == ow1) continue;  // no output reads this element (downsampling)
    const T* plane = gy + pl * ho * wo;
    T acc = gx[s];
    for (int64_t oh = oh0; oh < oh1; ++oh)
      for (int64_t ow = ow0; ow < ow1; ++ow) acc += plane[oh * wo + ow];
    gx[s] = acc;
  }
}

// PyTorch, align_corners=False, as the CPU computes it: src = (dst + 0.5) * in/out - 0.5, clamped at 0.
template <class T>
__device__ inline void bilinear_source(int64_t dst, int64_t in, int64_t out, int64_t& i0, int64_t& i1, T& frac) {
  const T s = (T(dst) + T(0.5)) * (T(in) / T(out)) - T(0.5);
  const T clamped = T(0) < s ? s : T(0);
  i0 = min64(static_cast<int64_t>(clamped), in - 1);
  i1 = min64(i0 + 1, in - 1);
  frac = clamped - T(i0);
}

template <class T>
__global__ void resize_bilinear_kernel(const T* x, T* y, int64_t total, int64_t h, int64_t w, int64_t ho,
                                       int64_t wo) {
  for (int64_t o = grid_start(); o < total; o += grid_step()) {
    const int64_t ow = o % wo, oh = (o / wo) % ho, pl = o / (wo * ho);
    int64_t h0, h1, w0, w1;
    T fh, fw;
    bilinear_source(oh, h, ho, h0, h1, fh);
    bilinear_source(ow, w, wo, w0, w1, fw);
    const T* in = x + pl * h * w;
    y[o] = (T(1) - fh) * ((T(1) - fw) * in[h0 * w + w0] + fw * in[h0 * w + w1]) +
           fh * ((T(1) - fw) * in[h1 * w + w0] + fw * in[h1 * w + w1]);
  }
}

// ---------------------------------------------------------------------------------------------------
// copy_block: (outer, inner) values between two row-strided views; U is a word of the dtype's size.

template <class U>
__global__ void copy_block_kernel(const U* src, U* dst, int64_t total, int64_t inner, int64_t src_stride,
                                  int64_t src_offset, int64_t dst_stride, int64_t dst_offset) {
  for (int64_t i = grid_start(); i < total; i += grid_step()) {
    const int64_t o = i / inner, j = i - o * inner;
    dst[o * dst_stride + dst_offset + j] = src[o * src_stride + src_offset + j];
  }
}

// ---------------------------------------------------------------------------------------------------
// log_softmax over the last dimension of (N,K): one warp per row

// y = x - log_sum_exp(x), as on the CPU.
template <class T>
__global__ void log_softmax_forward_kernel(const T* x, T* y, int64_t rows, int64_t k) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t r = grid_start() / kWarp; r < rows; r += grid_step() / kWarp) {
    const T* in = x + r * k;
    const T log_sum = warp_log_sum_exp(in, k, lane);
    for (int64_t j = lane; j < k; j += kWarp) y[r * k + j] = in[j] - log_sum;
  }
}

// dx = dy - exp(y) * sum(dy), the sum in double.
template <class T>
__global__ void log_softmax_backward_kernel(const T* y, const T* gy, T* gx, int64_t rows, int64_t k) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t r = grid_start() / kWarp; r < rows; r += grid_step() / kWarp) {
    double sum = 0;
    for (int64_t j = lane; j < k; j += kWarp) sum += gy[r * k + j];
    sum = warp_sum(sum);
    for (int64_t j = lane; j < k; j += kWarp)
      gx[r * k + j] = static_cast<T>(gy[r * k + j] - double(dev_exp(y[r * k + j])) * sum);
  }
}

// ---------------------------------------------------------------------------------------------------
// rows: index (M) I32 into the R rows of a (R, width) tensor. A bad index is skipped and reported.

enum RowKernel : int { kGatherRows = 1, kScatterRows = 2 };

// The first bad row index met: the launch that met one first (0: none yet) owns the word, and keeps the
// smallest position it met, packed with its value as (position << 32) | uint32(value) for atomicMin.
struct DeviceError {
  unsigned long long launch;
  unsigned long long first;
  long long limit;
  int kernel;
};
constexpr DeviceError kNoDeviceError{0, ~0ull, 0, 0};
__device__ DeviceError g_device_error{0, ~0ull, 0, 0};  // kNoDeviceError

// Host side: launches are numbered from 1; reports_possible says a row kernel ran since the last check
// (so that check_device_errors costs nothing in the common case).
std::atomic<unsigned long long> g_row_launches{0};
std::atomic<bool> g_reports_possible{false};

unsigned long long next_row_launch() {
  g_reports_possible.store(true);
  return ++g_row_launches;
}

__device__ void report_bad_row(RowKernel kernel, unsigned long long launch, int64_t position, int32_t value,
                               int64_t limit) {
  const unsigned long long owner = atomicCAS(&g_device_error.launch, 0ull, launch);
  if (owner != 0 && owner != launch) return;  // an earlier launch reported first
  if (owner == 0) {
    g_device_error.kernel = kernel;
    g_device_error.limit = limit;
  }
  atomicMin(&g_device_error.first, (static_cast<unsigned long long>(position) << 32) | static_cast<uint32_t>(value));
}

// Items of the row kernels: M rows of max(width, 1) items (a row of width 0 is still checked); the
// item's row r and column j (j < width for a real value).
__device__ inline void row_item(int64_t i, int64_t per_row, int64_t& r, int64_t& j) {
  r = i / per_row;
  j = i - r * per_row;
}

template <class U>
__global__ void gather_rows_kernel(const U* src, const int32_t* index, U* out, int64_t total, int64_t width,
                                   int64_t limit, unsigned long long launch) {
  const int64_t per_row = width > 0 ? width : 1;
  for (int64_t i = grid_start(); i < total; i += grid_step()) {
    int64_t r, j;
    row_item(i, per_row, r, j);
    const int32_t row = index[r];
    if (row < 0 || row >= limit) {
      if (j == 0) report_bad_row(kGatherRows, launch, r, row, limit);
      continue;
    }
    if (j < width) out[r * width + j] = src[row * width + j];
  }
}

// accumulate: dst[index[r]] += src[r] (atomicAdd: repeated rows add up).
template <class T>
__global__ void scatter_rows_add_kernel(const T* src, const int32_t* index, T* dst, int64_t total, int64_t width,
                                        int64_t limit, unsigned long long launch) {
  const int64_t per_row = width > 0 ? width : 1;
  for (int64_t i = grid_start(); i < total; i += grid_step()) {
    int64_t r, j;
    row_item(i, per_row, r, j);
    const int32_t row = index[r];
    if (row < 0 || row >= limit) {
      if (j == 0) report_bad_row(kScatterRows, launch, r, row, limit);
      continue;
    }
    if (j < width) atomicAdd(dst + row * width + j, src[r * width + j]);
  }
}

// Assignment, first pass: winner[row] = the last r writing that row (the CPU writes in order, so the
// last occurrence of a repeated index wins); reports bad indices.
__global__ void scatter_rows_winner_kernel(const int32_t* index, int32_t* winner, int64_t rows, int64_t limit,
                                           unsigned long long launch) {
  for (int64_t r = grid_start(); r < rows; r += grid_step()) {
    const int32_t row = index[r];
    if (row < 0 || row >= limit) report_bad_row(kScatterRows, launch, r, row, limit);
    else atomicMax(winner + row, static_cast<int32_t>(r));
  }
}

// Assignment, second pass: dst[index[r]] = src[r] for the winning r of each row.
template <class T>
__global__ void scatter_rows_assign_kernel(const T* src, const int32_t* index, const int32_t* winner, T* dst,
                                           int64_t total, int64_t width, int64_t limit) {
  for (int64_t i = grid_start(); i < total; i += grid_step()) {
    const int64_t r = i / width, j = i - r * width;
    const int32_t row = index[r];
    if (row >= 0 && row < limit && winner[row] == r) dst[row * width + j] = src[r * width + j];
  }
}

// index is a 1-D I32 tensor of M rows; rows and other have the same dtype and trailing shape (width).
void check_rows(const Tensor& index, const Tensor& rows, const Tensor& other, const char* kernel) {
  check_tensor(index, DType::I32, {index.numel()}, kernel, "index");
  MDFF_CHECK(rows.defined() && other.defined() && rows.dim() >= 1 && other.dim() >= 1, "cuda ", kernel,
             ": needs two defined tensors of rows");
  Shape a = rows.shape(), b = other.shape();
  a[0] = b[0] = 0;
  MDFF_CHECK(rows.dtype() == other.dtype() && a == b && other.size(0) == index.numel(), "cuda ", kernel, ": ",
             index.numel(), " indices with rows ", dtype_name(rows.dtype()), " ", shape_str(rows.shape()), " and ",
             dtype_name(other.dtype()), " ", shape_str(other.shape()), " do not match");
  MDFF_CHECK(index.numel() <= INT32_MAX && rows.size(0) <= INT32_MAX, "cuda ", kernel, ": ", index.numel(),
             " indices into ", rows.size(0), " rows exceed 32-bit positions");
}

// ---------------------------------------------------------------------------------------------------
// optimizers: one block per chunk of the gradients (kernel_helpers.cuh), one thread per element of it, the
// CPU's formulas in T; the chunk's offset places it in the flat parameters and state.

// g = grad + weight_decay * p, then update(p, state, g) per element.
template <class T, class Update>
__global__ void optimizer_kernel(const __grid_constant__ ChunkTable<T> grads, T* param, T* state, T weight_decay,
                                 bool decay, Update update) {
  const typename ChunkTable<T>::Chunk& chunk = grads.chunks[blockIdx.x];
  T* p = param + chunk.offset;
  T* s = state + chunk.offset;
  for (int64_t i = threadIdx.x; i < chunk.count; i += blockDim.x)
    update(p[i], s[i], decay ? chunk.data[i] + weight_decay * p[i] : chunk.data[i]);
}

template <class T>
struct RMSPropUpdate {  // state: the running mean of g^2
  T lr, alpha, eps;
  __device__ void operator()(T& p, T& square_avg, T g) const {
    const T v = square_avg * alpha + (T(1) - alpha) * g * g;
    square_avg = v;
    p -= lr * (g / (dev_sqrt(v) + eps));
  }
};

template <class T>
struct SgdUpdate {  // state: the momentum buffer
  T lr, momentum;
  bool first_step;
  __device__ void operator()(T& p, T& buffer, T g) const {
    const T b = first_step ? g : momentum * buffer + g;
    buffer = b;
    p -= lr * b;
  }
};

// Checks, then one launch per table of chunks (one for a whole model) of optimizer_kernel with the update
// that make_update<T>() returns.
template <class MakeUpdate>
void launch_optimizer(const Tensor& params, const std::vector<GradientSlice>& grads, const Tensor& state,
                      double weight_decay, const char* kernel, MakeUpdate&& make_update) {
  check_gradient_slices(params, grads, state, kernel);
  dispatch_float(params.dtype(), [&](auto zero) {
    using T = decltype(zero);
    std::vector<typename ChunkTable<T>::Chunk> pieces;
    pieces.reserve(grads.size());
    for (const GradientSlice& slice : grads) pieces.push_back({slice.grad.data<T>(), slice.offset, slice.grad.numel()});
    const auto update = make_update(zero);
    launch_chunked<T>(pieces, [&](const ChunkTable<T>& table) {
      optimizer_kernel<T><<<table.size, kThreads, 0, stream()>>>(table, params.data<T>(), state.data<T>(),
                                                                 T(weight_decay), weight_decay != 0, update);
      MDFF_CUDA_CHECK_LAUNCH();
    });
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// entry points (kernels.h): check, then dispatch on dtype

void batch_norm_forward(const Tensor& x, const Tensor& gamma, const Tensor& beta, const Tensor& running_mean,
                        const Tensor& running_var, bool training, double momentum, double eps, const Tensor& y,
                        const Tensor& save_mean, const Tensor& save_invstd, bool relu) {
  const char* kernel = "batch_norm_forward";
  check_float(x, kernel, "input");
  MDFF_CHECK(x.dim() >= 2, "cuda batch_norm_forward: input must be (N,C,...), got ", shape_str(x.shape()));
  const DType dt = x.dtype();
  const int64_t n = x.size(0), channels = x.size(1), plane = n * channels > 0 ? x.numel() / (n * channels) : 0;
  const Shape per_channel{channels};
  check_tensor(y, dt, x.shape(), kernel, "output");
  check_tensor(gamma, dt, per_channel, kernel, "gamma");
  check_tensor(beta, dt, per_channel, kernel, "beta");
  check_tensor(running_mean, dt, per_channel, kernel, "running_mean");
  check_tensor(running_var, dt, per_channel, kernel, "running_var");
  check_tensor(save_mean, dt, per_channel, kernel, "save_mean");
  check_tensor(save_invstd, dt, per_channel, kernel, "save_invstd");
  if (channels == 0) return;  // (an empty batch still writes the per-channel statistics)
  MDFF_CHECK(channels <= INT32_MAX, "cuda batch_norm_forward: ", channels, " channels exceed the grid");
  const int64_t count = n * plane;
  const int finish_blocks = blocks_for(channels * kWarp);
  dispatch_float(dt, [&](auto zero) {
    using T = decltype(zero);
    dispatch_pack<T>(plane, {x.raw(), y.raw()}, [&](auto pack, auto aligned) {
      constexpr int V = decltype(pack)::value;
      constexpr bool kAligned = decltype(aligned)::value;
      const int64_t units = plane / V, total = n * channels * units;
      const int64_t slices = training ? slices_for(channels, n * units) : 0;
      // coef (C,2), then in training batch_mean (C) and partial (C,S), in double
      ScratchBuffer scratch(sizeof(double) * static_cast<size_t>(channels * (training ? 3 + slices : 2)));
      double* coef = static_cast<double*>(scratch.data());
      double* batch_mean = training ? coef + 2 * channels : nullptr;
      double* partial = training ? batch_mean + channels : nullptr;
      if (training) {
        const dim3 grid(static_cast<unsigned>(channels), static_cast<unsigned>(slices));
        batch_norm_partial_kernel<T, V, kAligned, false>
            <<<grid, kReduceThreads, 0, stream()>>>(x.data<T>(), nullptr, partial, n, channels, units);
        MDFF_CUDA_CHECK_LAUNCH();
        batch_norm_mean_kernel<<<finish_blocks, kThreads, 0, stream()>>>(partial, slices, channels, count, batch_mean);
        MDFF_CUDA_CHECK_LAUNCH();
        batch_norm_partial_kernel<T, V, kAligned, true>
            <<<grid, kReduceThreads, 0, stream()>>>(x.data<T>(), batch_mean, partial, n, channels, units);
        MDFF_CUDA_CHECK_LAUNCH();
      }
      batch_norm_forward_finish_kernel<T><<<finish_blocks, kThreads, 0, stream()>>>(
          partial, slices, batch_mean, gamma.data<T>(), beta.data<T>(), running_mean.data<T>(), running_var.data<T>(),
          training, momentum, eps, channels, count, save_mean.data<T>(), save_invstd.data<T>(), coef);
      MDFF_CUDA_CHECK_LAUNCH();
      if (total == 0) return;
      if (relu)
        batch_norm_forward_apply_kernel<T, V, kAligned, true>
            <<<blocks_for(total), kThreads, 0, stream()>>>(x.data<T>(), coef, y.data<T>(), total, channels, units);
      else
        batch_norm_forward_apply_kernel<T, V, kAligned, false>
            <<<blocks_for(total), kThreads, 0, stream()>>>(x.data<T>(), coef, y.data<T>(), total, channels, units);
      MDFF_CUDA_CHECK_LAUNCH();
    });
  });
}

void batch_norm_backward(const Tensor& x, const Tensor& gamma, const Tensor& mean, const Tensor& invstd,
                         const Tensor& grad_y, bool training, const Tensor& grad_x, const Tensor& grad_gamma,
                         const Tensor& grad_beta) {
  const char* kernel = "batch_norm_backward";
  check_float(x, kernel, "input");
  MDFF_CHECK(x.dim() >= 2, "cuda batch_norm_backward: input must be (N,C,...), got ", shape_str(x.shape()));
  const DType dt = x.dtype();
  const int64_t n = x.size(0), channels = x.size(1), plane = n * channels > 0 ? x.numel() / (n * channels) : 0;
  const Shape per_channel{channels};
  check_tensor(grad_y, dt, x.shape(), kernel, "grad_y");
  check_tensor(gamma, dt, per_channel, kernel, "gamma");
  check_tensor(mean, dt, per_channel, kernel, "mean");
  check_tensor(invstd, dt, per_channel, kernel, "invstd");
  if (grad_x.defined()) check_tensor(grad_x, dt, x.shape(), kernel, "grad_x");
  if (grad_gamma.defined()) check_tensor(grad_gamma, dt, per_channel, kernel, "grad_gamma");
  if (grad_beta.defined()) check_tensor(grad_beta, dt, per_channel, kernel, "grad_beta");
  const bool need_sums = grad_gamma.defined() || grad_beta.defined() || (grad_x.defined() && training);
  if (channels == 0 || (!need_sums && !grad_x.defined())) return;
  MDFF_CHECK(channels <= INT32_MAX, "cuda batch_norm_backward: ", channels, " channels exceed the grid");
  const int64_t count = n * plane;
  const int finish_blocks = blocks_for(channels * kWarp);
  dispatch_float(dt, [&](auto zero) {
    using T = decltype(zero);
    auto optional = [](const Tensor& t) { return t.defined() ? t.data<T>() : nullptr; };
    T* gx = optional(grad_x);
    dispatch_pack<T>(plane, {x.raw(), grad_y.raw(), static_cast<const void*>(gx)}, [&](auto pack, auto aligned) {
      constexpr int V = decltype(pack)::value;
      constexpr bool kAligned = decltype(aligned)::value;
      const int64_t units = plane / V, total = n * channels * units;
      const int64_t slices = need_sums ? slices_for(channels, n * units) : 0;
      // partial (2,C,S), then coef (C,4) when grad_x is wanted, in double
      ScratchBuffer scratch(sizeof(double) * static_cast<size_t>(channels * (2 * slices + (gx ? 4 : 0))));
      double* partial = static_cast<double*>(scratch.data());
      double* coef = gx ? partial + 2 * channels * slices : nullptr;
      if (need_sums) {
        const dim3 grid(static_cast<unsigned>(channels), static_cast<unsigned>(slices));
        batch_norm_backward_partial_kernel<T, V, kAligned><<<grid, kReduceThreads, 0, stream()>>>(
            x.data<T>(), grad_y.data<T>(), mean.data<T>(), invstd.data<T>(), partial, n, channels, units);
        MDFF_CUDA_CHECK_LAUNCH();
      }
      batch_norm_backward_finish_kernel<T><<<finish_blocks, kThreads, 0, stream()>>>(
          partial, slices, gamma.data<T>(), mean.data<T>(), invstd.data<T>(), channels, count, optional(grad_gamma),
          optional(grad_beta), coef);
      MDFF_CUDA_CHECK_LAUNCH();
      if (!gx || total == 0) return;
      batch_norm_backward_apply_kernel<T, V, kAligned><<<blocks_for(total), kThreads, 0, stream()>>>(
          x.data<T>(), grad_y.data<T>(), coef, training, gx, total, channels, units);
      MDFF_CUDA_CHECK_LAUNCH();
    });
  });
}

void max_pool2d_forward(const Tensor& x, const Pool2dParams& p, const Tensor& y, const Tensor& argmax) {
  const char* kernel = "max_pool2d_forward";
  check_planes(x, y, kernel, "input", "output");
  check_tensor(argmax, DType::I32, y.shape(), kernel, "argmax");
  const int64_t h = x.size(2), w = x.size(3), ho = y.size(2), wo = y.size(3);
  MDFF_CHECK(p.kernel >= 1 && p.stride >= 1 && p.padding >= 0 && 2 * p.padding <= p.kernel, "cuda ", kernel,
             ": kernel ", p.kernel, ", stride ", p.stride, ", padding ", p.padding, " are invalid");
  MDFF_CHECK(ho == (h + 2 * p.padding - p.kernel) / p.stride + 1 && wo == (w + 2 * p.padding - p.kernel) / p.stride + 1,
             "cuda ", kernel, ": output ", shape_str(y.shape()), " does not match input ", shape_str(x.shape()),
             " with kernel ", p.kernel, ", stride ", p.stride, ", padding ", p.padding);
  MDFF_CHECK(h * w <= INT32_MAX, "cuda ", kernel, ": a ", h, "x", w, " plane is too large for I32 argmax");
  const int64_t total = y.numel();
  if (total == 0) return;
  dispatch_float(x.dtype(), [&](auto zero) {
    using T = decltype(zero);
    max_pool2d_forward_kernel<T><<<blocks_for(total), kThreads, 0, stream()>>>(
        x.data<T>(), y.data<T>(), argmax.data<int32_t>(), total, h, w, ho, wo, p.kernel, p.stride, p.padding);
    MDFF_CUDA_CHECK_LAUNCH();
  });
}

void max_pool2d_backward(const Tensor& grad_y, const Tensor& argmax, const Tensor& grad_x) {
  const char* kernel = "max_pool2d_backward";
  check_planes(grad_y, grad_x, kernel, "grad_y", "grad_x");
  check_tensor(argmax, DType::I32, grad_y.shape(), kernel, "argmax");
  if (grad_x.numel() == 0) return;
  MDFF_CUDA_CHECK(cudaMemsetAsync(grad_x.raw(), 0, grad_x.nbytes(), stream()));  // all-zero bits are 0.0
  const int64_t total = grad_y.numel();
  if (total == 0) return;
  dispatch_float(grad_y.dtype(), [&](auto zero) {
    using T = decltype(zero);
    max_pool2d_backward_kernel<T><<<blocks_for(total), kThreads, 0, stream()>>>(
        grad_y.data<T>(), argmax.data<int32_t>(), grad_x.data<T>(), total, grad_y.size(2) * grad_y.size(3),
        grad_x.size(2) * grad_x.size(3));
    MDFF_CUDA_CHECK_LAUNCH();
  });
}

void global_avg_pool_forward(const Tensor& x, const Tensor& y) {
  const char* kernel = "global_avg_pool_forward";
  check_float(x, kernel, "input");
  check_rank(x, 4, kernel, "input");
  check_tensor(y, x.dtype(), {x.size(0), x.size(1)}, kernel, "output");
  const int64_t planes = y.numel(), plane = x.size(2) * x.size(3);
  if (planes == 0) return;  // (an empty plane gives 0/0 = NaN, as on the CPU)
  dispatch_float(x.dtype(), [&](auto zero) {
    using T = decltype(zero);
    global_avg_pool_forward_kernel<T>
        <<<blocks_for(planes * kWarp), kThreads, 0, stream()>>>(x.data<T>(), y.data<T>(), planes, plane);
    MDFF_CUDA_CHECK_LAUNCH();
  });
}

void global_avg_pool_backward(const Tensor& grad_y, const Tensor& grad_x) {
  const char* kernel = "global_avg_pool_backward";
  check_float(grad_x, kernel, "grad_x");
  check_rank(grad_x, 4, kernel, "grad_x");
  check_tensor(grad_y, grad_x.dtype(), {grad_x.size(0), grad_x.size(1)}, kernel, "grad_y");
  const int64_t total = grad_x.numel(), plane = grad_x.size(2) * grad_x.size(3);
  if (total == 0) return;
  dispatch_float(grad_x.dtype(), [&](auto zero) {
    using T = decltype(zero);
    global_avg_pool_backward_kernel<T>
        <<<blocks_for(total), kThreads, 0, stream()>>>(grad_y.data<T>(), grad_x.data<T>(), total, plane);
    MDFF_CUDA_CHECK_LAUNCH();
  });
}

void upsample_nearest_forward(const Tensor& x, const Tensor& y) {
  const char* kernel = "upsample_nearest_forward";
  check_planes(x, y, kernel, "input", "output");
  const int64_t total = y.numel(), h = x.size(2), w = x.size(3), ho = y.size(2), wo = y.size(3);
  if (total == 0) return;
  MDFF_CHECK(h > 0 && w > 0, "cuda ", kernel, ": cannot fill ", shape_str(y.shape()), " from an empty input ",
             shape_str(x.shape()));
  const float scale_h = static_cast<float>(h) / ho, scale_w = static_cast<float>(w) / wo;  // as the CPU
  dispatch_float(x.dtype(), [&](auto zero) {
    using T = decltype(zero);
    upsample_nearest_forward_kernel<T><<<blocks_for(total), kThreads, 0, stream()>>>(
        x.data<T>(), y.data<T>(), total, h, w, ho, wo, scale_h, scale_w);
    MDFF_CUDA_CHECK_LAUNCH();
  });
}

void upsample_nearest_backward(const Tensor& grad_y, const Tensor& grad_x) {
  const char* kernel = "upsample_nearest_backward";
  check_planes(grad_y, grad_x, kernel, "grad_y", "grad_x");
  const int64_t total = grad_x.numel(), h = grad_x.size(2), w = grad_x.size(3), ho = grad_y.size(2),
                wo = grad_y.size(3);
  if (total == 0 || grad_y.numel() == 0) return;
  const float scale_h = static_cast<float>(h) / ho, scale_w = static_cast<float>(w) / wo;  // as the CPU
  dispatch_float(grad_y.dtype(), [&](auto zero) {
    using T = decltype(zero);
    upsample_nearest_backward_kernel<T><<<blocks_for(total), kThreads, 0, stream()>>>(
        grad_y.data<T>(), grad_x.data<T>(), total, h, w, ho, wo, scale_h, scale_w);
    MDFF_CUDA_CHECK_LAUNCH();
  });
}

void resize_bilinear(const Tensor& x, const Tensor& y) {
  const char* kernel = "resize_bilinear";
  check_planes(x, y, kernel, "input", "output");
  const int64_t total = y.numel(), h = x.size(2), w = x.size(3), ho = y.size(2), wo = y.size(3);
  if (total == 0) return;
  MDFF_CHECK(h > 0 && w > 0, "cuda ", kernel, ": cannot fill ", shape_str(y.shape()), " from an empty input ",
             shape_str(x.shape()));
  dispatch_float(x.dtype(), [&](auto zero) {
    using T = decltype(zero);
    resize_bilinear_kernel<T>
        <<<blocks_for(total), kThreads, 0, stream()>>>(x.data<T>(), y.data<T>(), total, h, w, ho, wo);
    MDFF_CUDA_CHECK_LAUNCH();
  });
}

void copy_block(const Tensor& part, const Tensor& whole, int64_t outer, int64_t part_inner, int64_t whole_inner,
                int64_t offset, bool into_whole) {
  MDFF_CHECK(part.defined() && whole.defined() && part.dtype() == whole.dtype(),
             "cuda copy_block: needs two defined tensors of one dtype");
  MDFF_CHECK(outer >= 0 && part_inner >= 0 && offset >= 0 && offset + part_inner <= whole_inner &&
                 part.numel() == outer * part_inner && whole.numel() == outer * whole_inner,
             "cuda copy_block: part ", shape_str(part.shape()), " as (", outer, ",", part_inner, ") at column ",
             offset, " of whole ", shape_str(whole.shape()), " as (", outer, ",", whole_inner, ")");
  const int64_t total = outer * part_inner;
  if (total == 0) return;
  const size_t elem = dtype_size(part.dtype());
  char* block = static_cast<char*>(whole.raw()) + offset * elem;
  if (outer == 1 || part_inner == whole_inner) {  // the block is one contiguous run
    void* dst = into_whole ? static_cast<void*>(block) : part.raw();
    const void* src = into_whole ? part.raw() : static_cast<const void*>(block);
    MDFF_CUDA_CHECK(cudaMemcpyAsync(dst, src, total * elem, cudaMemcpyDeviceToDevice, stream()));
    return;
  }
  dispatch_word(part.dtype(), [&](auto zero) {
    using U = decltype(zero);
    U* p = static_cast<U*>(part.raw());
    U* wh = static_cast<U*>(whole.raw());
    if (into_whole)
      copy_block_kernel<U><<<blocks_for(total), kThreads, 0, stream()>>>(p, wh, total, part_inner, part_inner, 0,
                                                                         whole_inner, offset);
    else
      copy_block_kernel<U><<<blocks_for(total), kThreads, 0, stream()>>>(wh, p, total, part_inner, whole_inner,
                                                                         offset, part_inner, 0);
    MDFF_CUDA_CHECK_LAUNCH();
  });
}

void log_softmax_forward(const Tensor& x, const Tensor& y) {
  const char* kernel = "log_softmax_forward";
  check_float(x, kernel, "input");
  check_rank(x, 2, kernel, "input (N,K)");
  check_tensor(y, x.dtype(), x.shape(), kernel, "output");
  const int64_t rows = x.size(0), k = x.size(1);
  if (x.numel() == 0) return;
  dispatch_float(x.dtype(), [&](auto zero) {
    using T = decltype(zero);
    log_softmax_forward_kernel<T>
        <<<blocks_for(rows * kWarp), kThreads, 0, stream()>>>(x.data<T>(), y.data<T>(), rows, k);
    MDFF_CUDA_CHECK_LAUNCH();
  });
}

void log_softmax_backward(const Tensor& y, const Tensor& grad_y, const Tensor& grad_x) {
  const char* kernel = "log_softmax_backward";
  check_float(y, kernel, "output");
  check_rank(y, 2, kernel, "output (N,K)");
  check_tensor(grad_y, y.dtype(), y.shape(), kernel, "grad_y");
  check_tensor(grad_x, y.dtype(), y.shape(), kernel, "grad_x");
  const int64_t rows = y.size(0), k = y.size(1);
  if (y.numel() == 0) return;
  dispatch_float(y.dtype(), [&](auto zero) {
    using T = decltype(zero);
    log_softmax_backward_kernel<T><<<blocks_for(rows * kWarp), kThreads, 0, stream()>>>(
        y.data<T>(), grad_y.data<T>(), grad_x.data<T>(), rows, k);
    MDFF_CUDA_CHECK_LAUNCH();
  });
}

void gather_rows(const Tensor& src, const Tensor& index, const Tensor& out) {
  check_rows(index, src, out, "gather_rows");
  const int64_t rows = index.numel();
  if (rows == 0) return;
  const int64_t width = out.numel() / rows, total = rows * std::max<int64_t>(width, 1);
  const unsigned long long launch = next_row_launch();
  dispatch_word(src.dtype(), [&](auto zero) {
    using U = decltype(zero);
    gather_rows_kernel<U><<<blocks_for(total), kThreads, 0, stream()>>>(
        static_cast<const U*>(src.raw()), index.data<int32_t>(), static_cast<U*>(out.raw()), total, width,
        src.size(0), launch);
    MDFF_CUDA_CHECK_LAUNCH();
  });
}

void scatter_rows(const Tensor& src, const Tensor& index, const Tensor& dst, bool accumulate) {
  check_float(src, "scatter_rows", "source");
  check_rows(index, dst, src, "scatter_rows");
  const int64_t rows = index.numel();
  if (rows == 0) return;
  const int64_t width = src.numel() / rows, limit = dst.size(0);
  const unsigned long long launch = next_row_launch();
  dispatch_float(src.dtype(), [&](auto zero) {
    using T = decltype(zero);
    if (accumulate) {
      const int64_t total = rows * std::max<int64_t>(width, 1);
      scatter_rows_add_kernel<T><<<blocks_for(total), kThreads, 0, stream()>>>(
          src.data<T>(), index.data<int32_t>(), dst.data<T>(), total, width, limit, launch);
      MDFF_CUDA_CHECK_LAUNCH();
      return;
    }
    // winner (R) I32, -1 where no index points (all-ones bits)
    ScratchBuffer winner(static_cast<size_t>(limit) * sizeof(int32_t));
    int32_t* winner_rows = static_cast<int32_t*>(winner.data());
    if (limit > 0) MDFF_CUDA_CHECK(cudaMemsetAsync(winner_rows, 0xff, limit * sizeof(int32_t), stream()));
    scatter_rows_winner_kernel<<<blocks_for(rows), kThreads, 0, stream()>>>(index.data<int32_t>(), winner_rows, rows,
                                                                            limit, launch);
    MDFF_CUDA_CHECK_LAUNCH();
    const int64_t total = rows * width;
    if (total == 0) return;
    scatter_rows_assign_kernel<T><<<blocks_for(total), kThreads, 0, stream()>>>(
        src.data<T>(), index.data<int32_t>(), winner_rows, dst.data<T>(), total, width, limit);
    MDFF_CUDA_CHECK_LAUNCH();
  });
}

void rmsprop_step(const Tensor& params, const std::vector<GradientSlice>& grads, const Tensor& square_avg, double lr,
                  double alpha, double eps, double weight_decay) {
  launch_optimizer(params, grads, square_avg, weight_decay, "cuda rmsprop_step", [&](auto zero) {
    using T = decltype(zero);
    return RMSPropUpdate<T>{T(lr), T(alpha), T(eps)};
  });
}

void sgd_step(const Tensor& params, const std::vector<GradientSlice>& grads, const Tensor& buffer, double lr,
              double momentum, double weight_decay, bool first_step) {
  launch_optimizer(params, grads, buffer, weight_decay, "cuda sgd_step", [&](auto zero) {
    using T = decltype(zero);
    return SgdUpdate<T>{T(lr), T(momentum), first_step};
  });
}

// Called right after the stream was synchronised (a counted host wait, cuda_backend.cpp), so its own two
// synchronisations find the stream empty and are not counted again.
void check_device_errors() {
  if (!g_reports_possible.exchange(false)) return;  // no row kernel ran since the last check
  DeviceError error;
  MDFF_CUDA_CHECK(cudaMemcpyFromSymbolAsync(&error, g_device_error, sizeof error, 0, cudaMemcpyDeviceToHost, stream()));
  MDFF_CUDA_CHECK(cudaStreamSynchronize(stream()));
  if (error.launch == 0) return;
  MDFF_CUDA_CHECK(
      cudaMemcpyToSymbolAsync(g_device_error, &kNoDeviceError, sizeof kNoDeviceError, 0, cudaMemcpyHostToDevice, stream()));
  MDFF_CUDA_CHECK(cudaStreamSynchronize(stream()));
  const long long position = static_cast<long long>(error.first >> 32);
  const int32_t value = static_cast<int32_t>(static_cast<uint32_t>(error.first & 0xffffffffull));
  MDFF_FAIL(error.kernel == kGatherRows ? "gather_rows" : "scatter_rows", ": row index ", value, " at position ",
            position, " is outside [0, ", error.limit, ") (found on the GPU; that kernel skipped the row)");
}

}  // namespace mdff::cuda
