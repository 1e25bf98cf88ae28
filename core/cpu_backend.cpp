// The CPU backend: the reference kernels every other backend is checked against. Plain loops, written
// to be read; the two hot paths (convolution and matrix products) go through OpenBLAS GEMM (core/blas.h), and
// per-channel or per-plane loops are shared between cores with OpenMP. Every kernel is a template
// over the float type (float for work, double for gradient checks).
#include <xmmintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "core/backend.h"
#include "core/blas.h"
#include "core/error.h"

namespace mdff {

namespace {

// Calls fn(T{}) with T = float or double according to `dtype`.
template <class Fn>
void dispatch_float(DType dtype, const char* kernel, Fn&& fn) {
  switch (dtype) {
    case DType::F32: fn(float{}); return;
    case DType::F64: fn(double{}); return;
    default: MDFF_FAIL(kernel, ": needs a float32 or float64 tensor, got ", dtype_name(dtype));
  }
}

template <class T> T* ptr(const Tensor& t) { return static_cast<T*>(t.raw()); }

// Loops smaller than this run on one thread: waking the pool costs more than it saves.
constexpr int64_t kParallelGrain = 1 << 15;

// body(i) for every i in [0, n), over the threads when n is large enough. `body` is a lambda without
// branches on loop-invariant choices (take those outside, once per call) that captures its pointers
// by value; each thread runs its own copy, whose pointers GCC then keeps in registers and vectorises
// (it does not when the loop reads them through the shared closure).
template <class Body>
void for_each_index(int64_t n, const Body& body) {
#pragma omp parallel if (n > kParallelGrain)
  {
    const Body local = body;
#pragma omp for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) local(i);
  }
}

// ---- broadcasting: strides of an input viewed at the output's shape (0 along repeated dims) ----
std::vector<int64_t> broadcast_strides(const Shape& in, const Shape& out) {
  std::vector<int64_t> strides(out.size(), 0);
  int64_t stride = 1;
  for (int64_t i = static_cast<int64_t>(in.size()) - 1, o = static_cast<int64_t>(out.size()) - 1; i >= 0; --i, --o) {
    strides[o] = in[i] == 1 ? 0 : stride;
    stride *= in[i];
  }
  return strides;
}

// When `in` (broadcast to `out`) is out's trailing dimensions, e.g. a bias (C) against (N,C) or a scalar,
// its element for output flat index i is in[i % period]: returns that period, else 0.
int64_t trailing_period(const Shape& in, const Shape& out) {
  size_t lead = 0;
  while (lead < in.size() && in[lead] == 1) ++lead;  // leading 1s repeat like missing dimensions
  const size_t rank = in.size() - lead;
  if (rank > out.size()) return 0;
  int64_t period = 1;
  for (size_t d = 0; d < rank; ++d) {
    if (in[lead + d] != out[out.size() - rank + d]) return 0;
    period *= in[lead + d];
  }
  return period;
}

// Offset into a broadcast input of the output element with flat index `flat`.
int64_t broadcast_offset(int64_t flat, const Shape& out, const std::vector<int64_t>& strides) {
  int64_t offset = 0;
  for (int64_t d = static_cast<int64_t>(out.size()) - 1; d >= 0; --d) {
    offset += (flat % out[d]) * strides[d];
    flat /= out[d];
  }
  return offset;
}

// ReLU as the unary kernel computes it, for the fused batch_norm2d_relu and add_relu.
template <class T>
inline T relu_value(T v) {
  return v > T(0) ? v : T(0);
}

// sign(x) as the unary kernel computes it: +1 for x >= 0 (sign(0) = +1), -1 otherwise.
template <class T>
inline T sign_value(T v) {
  return v >= T(0) ? T(1) : T(-1);
}

// log(sum_j e^row[j]) over a row of k values, as top + log(sum e^(row[j] - top)), the sum in double:
// log_softmax and the fused cross-entropy share it.
template <class T>
T row_log_sum_exp(const T* row, int64_t k) {
  const T top = *std::max_element(row, row + k);
  double sum = 0;
  for (int64_t j = 0; j < k; ++j) sum += std::exp(static_cast<double>(row[j] - top));
  return static_cast<T>(top + std::log(sum));
}

// The sum over i < n of term(i) (a double), over fixed chunks that the threads share and whose sums are
// then added in order: the same bits for any number of threads (an OpenMP reduction adds the threads'
// sums in the order they finish).
template <class Term>
double ordered_sum(int64_t n, const Term& term) {
  constexpr int64_t kChunk = 1 << 14;
  std::vector<double> chunk_sums(static_cast<size_t>((n + kChunk - 1) / kChunk));
  const int64_t chunks = static_cast<int64_t>(chunk_sums.size());
#pragma omp parallel for schedule(static) if (n > kParallelGrain)
  for (int64_t c = 0; c < chunks; ++c) {
    double sum = 0;
    const int64_t end = std::min(n, (c + 1) * kChunk);
#pragma omp simd reduction(+ : sum)
    for (int64_t i = c * kChunk; i < end; ++i) sum += term(i);
    chunk_sums[c] = sum;
  }
  double sum = 0;
  for (double chunk : chunk_sums) sum += chunk;
  return sum;
}

// Calls fn(f) with f a function object computing `op` (one switch per call, not per element).
template <class Fn>
void with_binary_op(BinaryOp op, Fn&& fn) {
  switch (op) {
    case BinaryOp::Add: return fn([](auto a, auto b) { return a + b; });
    case BinaryOp::Sub: return fn([](auto a, auto b) { return a - b; });
    case BinaryOp::Mul: return fn([](auto a, auto b) { return a * b; });
    case BinaryOp::Div: return fn([](auto a, auto b) { return a / b; });
    case BinaryOp::AddRelu: return fn([](auto a, auto b) { return relu_value(a + b); });
  }
}

template <class T>
T stable_softplus(T x) { return std::max(x, T(0)) + std::log1p(std::exp(-std::abs(x))); }

template <class T>
T stable_sigmoid(T x) {
  if (x >= 0) return T(1) / (T(1) + std::exp(-x));
  const T e = std::exp(x);
  return e / (T(1) + e);
}

// Batch norm as y = x * scale + shift per channel, in double. batch_norm_forward and the fused
// convolution share these two helpers (explicit fma: no contraction choice left to the compiler), so
// both round alike and give equal results.
inline double batch_norm_shift(double mean, double scale, double beta) { return std::fma(-mean, scale, beta); }
template <class T>
inline T batch_norm_value(T v, double scale, double shift) {
  return static_cast<T>(std::fma(static_cast<double>(v), scale, shift));
}
// The Hamming distance of two codes of `words` 32-bit words.
inline int32_t hamming_distance(const uint32_t* a, const uint32_t* b, int64_t words) {
  int32_t d = 0;
  for (int64_t w = 0; w < words; ++w) d += __builtin_popcount(a[w] ^ b[w]);
  return d;
}

// ---- batch norm: (N,C,H,W) seen as N rows of C*H*W values, cut into tiles of whole channels ----
// A thread takes a tile (channels [c0, c0 + k)) and walks its N row pieces, each k*plane contiguous
// values: the per-channel sums come from per-column accumulators (vectorised) reduced at the end, and
// the tile's rows stay in cache between the passes over them. Walking channel by channel instead reads
// ResNet's 1x1 to 4x4 planes a few values at a time (measured 2-6 GB/s against 37 for this layout).
struct ChannelTile {
  int64_t n, row_stride, plane, c0, k;  // row_stride = C*plane; the tile's values start at c0*plane
  int64_t width() const { return k * plane; }
  int64_t offset() const { return c0 * plane; }
};

// Channels per tile: about 2,048 values a row, at least 8 tiles when there are channels enough (both
// threads busy, balanced).
int64_t channels_per_tile(int64_t c, int64_t plane) {
  return std::max<int64_t>(1, std::min({std::max<int64_t>(1, 2048 / plane), c / 8, c}));
}

// Runs tile_fn(tile, scratch) over every tile, the tiles spread over the threads; scratch is a
// per-thread buffer of `scratch_per_value` doubles per value of a row piece.
template <class TileFn>
void for_each_channel_tile(int64_t n, int64_t c, int64_t plane, int scratch_per_value, TileFn&& tile_fn) {
  const int64_t per_tile = channels_per_tile(c, plane), tiles = (c + per_tile - 1) / per_tile;
#pragma omp parallel if (n * c * plane > kParallelGrain)
  {
    std::vector<double> scratch(static_cast<size_t>(per_tile * plane * scratch_per_value));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t c0 = t * per_tile;
      tile_fn(ChannelTile{n, c * plane, plane, c0, std::min(per_tile, c - c0)}, scratch.data());
    }
  }
}

// sums[ch] (k) = the sum over the tile's rows and its plane of value(at, j), at the flat index of a
// value and j its column in the tile; acc: width() doubles of scratch.
template <class Value>
void tile_channel_sums(const ChannelTile& t, double* acc, double* sums, Value&& value) {
  const int64_t width = t.width();
  std::fill(acc, acc + width, 0.0);
  for (int64_t i = 0; i < t.n; ++i) {
    const int64_t base = i * t.row_stride + t.offset();
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) acc[j] += value(base + j, j);
  }
  for (int64_t ch = 0; ch < t.k; ++ch) {
    double sum = 0;
    for (int64_t q = 0; q < t.plane; ++q) sum += acc[ch * t.plane + q];
    sums[ch] = sum;
  }
}

// per_column[j] = per_channel[channel of column j] over the tile's row piece.
inline void spread_over_plane(const ChannelTile& t, const double* per_channel, double* per_column) {
  for (int64_t ch = 0; ch < t.k; ++ch) std::fill(per_column + ch * t.plane, per_column + (ch + 1) * t.plane, per_channel[ch]);
}

template <class T>
void batch_norm_forward_tile(const ChannelTile& t, const T* x, const T* gamma, const T* beta, T* running_mean,
                             T* running_var, bool training, double momentum, double eps, T* y, T* save_mean,
                             T* save_invstd, bool relu, double* scratch) {
  const int64_t width = t.width(), count = t.n * t.plane;
  double* col_a = scratch;          // per column: accumulator, then the scale
  double* col_b = scratch + width;  // per column: the mean, then the shift
  std::vector<double> mean(t.k), var(t.k), sums(t.k);
  if (training) {  // two passes in double: exact enough for gradient checks, no cancellation
    tile_channel_sums(t, col_a, sums.data(), [=](int64_t at, int64_t) { return double(x[at]); });
    for (int64_t ch = 0; ch < t.k; ++ch) mean[ch] = sums[ch] / count;
    spread_over_plane(t, mean.data(), col_b);
    tile_channel_sums(t, col_a, sums.data(), [=](int64_t at, int64_t j) {
      const double d = x[at] - col_b[j];
      return d * d;
    });
  }
  std::vector<double> scale(t.k), shift(t.k);
  for (int64_t ch = 0; ch < t.k; ++ch) {
    const int64_t c = t.c0 + ch;
    if (training) {
      var[ch] = sums[ch] / count;
      const double unbiased = count > 1 ? sums[ch] / (count - 1) : var[ch];
      running_mean[c] = static_cast<T>((1 - momentum) * running_mean[c] + momentum * mean[ch]);
      running_var[c] = static_cast<T>((1 - momentum) * running_var[c] + momentum * unbiased);
    } else {
      mean[ch] = running_mean[c];
      var[ch] = running_var[c];
    }
    const double invstd = 1.0 / std::sqrt(var[ch] + eps);
    save_mean[c] = static_cast<T>(mean[ch]);
    save_invstd[c] = static_cast<T>(invstd);
    scale[ch] = invstd * gamma[c];
    shift[ch] = batch_norm_shift(mean[ch], scale[ch], beta[c]);
  }
  spread_over_plane(t, scale.data(), col_a);
  spread_over_plane(t, shift.data(), col_b);
  for (int64_t i = 0; i < t.n; ++i) {
    const int64_t base = i * t.row_stride + t.offset();
    if (relu) {
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) y[base + j] = relu_value(batch_norm_value(x[base + j], col_a[j], col_b[j]));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) y[base + j] = batch_norm_value(x[base + j], col_a[j], col_b[j]);
    }
  }
}

// training: dx = g*invstd/M * (M*dy - sum(dy) - xhat*sum(dy*xhat)), evaluation: dx = g*invstd*dy, with
// xhat = (x - mean)*invstd; computed as dx = a*dy + b*(x - mean) + c with a, b, c per channel. scratch:
// 4 doubles per value of a row piece.
template <class T>
void batch_norm_backward_tile(const ChannelTile& t, const T* x, const T* gamma, const T* mean, const T* invstd,
                              const T* gy, bool training, T* gx, T* grad_gamma, T* grad_beta, double* scratch) {
  const int64_t width = t.width(), count = t.n * t.plane;
  double* col_mean = scratch;
  double* col_invstd = scratch + width;  // then a
  double* col_b = scratch + 2 * width;   // accumulator, then b
  double* col_c = scratch + 3 * width;
  std::vector<double> per_channel(t.k), sum_gy(t.k), sum_gy_xhat(t.k);
  for (int64_t ch = 0; ch < t.k; ++ch) per_channel[ch] = mean[t.c0 + ch];
  spread_over_plane(t, per_channel.data(), col_mean);
  for (int64_t ch = 0; ch < t.k; ++ch) per_channel[ch] = invstd[t.c0 + ch];
  spread_over_plane(t, per_channel.data(), col_invstd);
  tile_channel_sums(t, col_b, sum_gy.data(), [=](int64_t at, int64_t) { return double(gy[at]); });
  tile_channel_sums(t, col_b, sum_gy_xhat.data(),
                    [=](int64_t at, int64_t j) { return gy[at] * (x[at] - col_mean[j]) * col_invstd[j]; });
  for (int64_t ch = 0; ch < t.k; ++ch) {
    if (grad_gamma) grad_gamma[t.c0 + ch] = static_cast<T>(sum_gy_xhat[ch]);
    if (grad_beta) grad_beta[t.c0 + ch] = static_cast<T>(sum_gy[ch]);
  }
  if (!gx) return;
  std::vector<double> a(t.k), b(t.k), c(t.k);
  for (int64_t ch = 0; ch < t.k; ++ch) {
    const double is = invstd[t.c0 + ch], g_is = gamma[t.c0 + ch] * is;
    a[ch] = g_is;
    b[ch] = -g_is / count * sum_gy_xhat[ch] * is;
    c[ch] = -g_is / count * sum_gy[ch];
  }
  spread_over_plane(t, a.data(), col_invstd);
  spread_over_plane(t, b.data(), col_b);
  spread_over_plane(t, c.data(), col_c);
  for (int64_t i = 0; i < t.n; ++i) {
    const int64_t base = i * t.row_stride + t.offset();
    if (training) {
#pragma omp simd
      for (int64_t j = 0; j < width; ++j)
        gx[base + j] = static_cast<T>(col_invstd[j] * gy[base + j] + col_b[j] * (x[base + j] - col_mean[j]) + col_c[j]);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) gx[base + j] = static_cast<T>(col_invstd[j] * gy[base + j]);
    }
  }
}

// ---- im2col / col2im over a group of samples ----
// cols (C*kh*kw, g*Ho*Wo): row (c,ki,kj), column (sample j, oh, ow) holds x[n0+j, c, oh*s-p+ki, ow*s-p+kj]
// (0 outside the image).
// kh, kw and the padding describe the kernel taps that can reach the input (see geometry()); the
// weight has full_kh x full_kw taps, of which those start at (tap_row, tap_col).
struct ConvGeometry {
  int64_t n, c, h, w, cout, kh, kw, ho, wo, stride, pad_h, pad_w;
  int64_t full_kh, full_kw, tap_row, tap_col;
  int64_t k() const { return c * kh * kw; }
  int64_t p() const { return ho * wo; }
  bool cropped() const { return kh != full_kh || kw != full_kw; }
};

// The output columns [first, last) whose input column ow*stride - pad + tap lies inside [0, size).
inline std::pair<int64_t, int64_t> inside_range(int64_t size, int64_t out, int64_t stride, int64_t pad, int64_t tap) {
  int64_t first = 0;
  while (first < out && first * stride - pad + tap < 0) ++first;
  int64_t last = out;
  while (last > first && (last - 1) * stride - pad + tap >= size) --last;
  return {first, last};
}

template <class T>
void im2col(const T* x, const ConvGeometry& g, int64_t n0, int64_t count, T* cols) {
  const int64_t rows = g.k(), plane = g.p(), width = count * plane;
  const bool pointwise = g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad_h == 0 && g.pad_w == 0;
#pragma omp parallel for schedule(static) if (rows * width > kParallelGrain)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t c = r / (g.kh * g.kw), ki = (r / g.kw) % g.kh, kj = r % g.kw;
    const auto [ow_first, ow_last] = inside_range(g.w, g.wo, g.stride, g.pad_w, kj);
    T* row = cols + r * width;
    for (int64_t j = 0; j < count; ++j) {
      const T* src = x + ((n0 + j) * g.c + c) * g.h * g.w;
      if (pointwise) {  // 1x1, stride 1: the plane itself
        std::memcpy(row + j * plane, src, plane * sizeof(T));
        continue;
      }
      for (int64_t oh = 0; oh < g.ho; ++oh) {
        const int64_t ih = oh * g.stride - g.pad_h + ki;
        T* out = row + j * plane + oh * g.wo;
        if (ih < 0 || ih >= g.h) {
          std::fill(out, out + g.wo, T(0));
          continue;
        }
        const T* in = src + ih * g.w - g.pad_w + kj;  // in[ow * stride] for ow in [ow_first, ow_last)
        std::fill(out, out + ow_first, T(0));
        for (int64_t ow = ow_first; ow < ow_last; ++ow) out[ow] = in[ow * g.stride];
        std::fill(out + ow_last, out + g.wo, T(0));
      }
    }
  }
}

// The adjoint of im2col: adds every entry of cols back into the pixel it was read from.
template <class T>
void col2im_add(const T* cols, const ConvGeometry& g, int64_t n0, int64_t count, T* grad_x) {
  const int64_t plane = g.p(), width = count * plane;
  // Each channel owns its own rows of cols and its own planes of grad_x: channels are independent.
#pragma omp parallel for schedule(static) if (g.k() * width > kParallelGrain)
  for (int64_t c = 0; c < g.c; ++c) {
    for (int64_t ki = 0; ki < g.kh; ++ki) {
      for (int64_t kj = 0; kj < g.kw; ++kj) {
        const T* row = cols + ((c * g.kh + ki) * g.kw + kj) * width;
        const auto [ow_first, ow_last] = inside_range(g.w, g.wo, g.stride, g.pad_w, kj);
        for (int64_t j = 0; j < count; ++j) {
          T* dst = grad_x + ((n0 + j) * g.c + c) * g.h * g.w;
          for (int64_t oh = 0; oh < g.ho; ++oh) {
            const int64_t ih = oh * g.stride - g.pad_h + ki;
            if (ih < 0 || ih >= g.h) continue;
            const T* in = row + j * plane + oh * g.wo;
            T* out = dst + ih * g.w - g.pad_w + kj;  // out[ow * stride] for ow in [ow_first, ow_last)
            for (int64_t ow = ow_first; ow < ow_last; ++ow) out[ow * g.stride] += in[ow];
          }
        }
      }
    }
  }
}

// A buffer left uninitialised (every element is written before it is read): a std::vector would zero
// it first, which cost 5% of a training step.
template <class T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(n)]);
}

// How many samples share one im2col buffer: as many as fit in ~32 MiB, at least one. Batching samples
// makes the GEMM wide enough to be efficient when the feature maps are small (ResNet50 at 32x32).
int64_t samples_per_group(const ConvGeometry& g, size_t elem) {
  const int64_t per_sample = std::max<int64_t>(1, g.k() * g.p() * static_cast<int64_t>(elem));
  return std::clamp<int64_t>((int64_t{32} << 20) / per_sample, 1, g.n);
}

// (g, Cout, P) <-> (Cout, g*P): between the sample-major tensor layout and the GEMM's layout.
template <class T>
void samples_to_matrix(const T* src, int64_t count, int64_t channels, int64_t plane, T* dst) {
#pragma omp parallel for schedule(static) if (count * channels * plane > kParallelGrain)
  for (int64_t co = 0; co < channels; ++co)
    for (int64_t j = 0; j < count; ++j)
      std::memcpy(dst + co * count * plane + j * plane, src + (j * channels + co) * plane, plane * sizeof(T));
}

// What the convolution applies to each output value as it copies it out (per output channel co):
// v + bias[co]; or, in evaluation-mode inference, the batch norm y = v * scale[co] + shift[co] (in double,
// as batch_norm_forward computes it), then + residual, then ReLU.
template <class T>
struct ConvEpilogue {
  const T* bias = nullptr;         // (Cout) or null
  const double* scale = nullptr;   // (Cout) batch norm, or null
  const double* shift = nullptr;   // (Cout)
  const T* residual = nullptr;     // laid out like y (from the group's first sample), or null
  bool relu = false;
};


// (Cout, g*P) GEMM result -> (g, Cout, P) output, through the epilogue.
template <class T>
void matrix_to_samples(const T* src, int64_t count, int64_t channels, int64_t plane, const ConvEpilogue<T>& e, T* dst) {
#pragma omp parallel for schedule(static) if (count * channels * plane > kParallelGrain)
  for (int64_t co = 0; co < channels; ++co) {
    for (int64_t j = 0; j < count; ++j) {
      const T* in = src + co * count * plane + j * plane;
      const int64_t at = (j * channels + co) * plane;
      T* out = dst + at;
      if (e.scale) {
        const double scale = e.scale[co], shift = e.shift[co];
        for (int64_t q = 0; q < plane; ++q) out[q] = batch_norm_value(in[q], scale, shift);
      } else {
        const T b = e.bias ? e.bias[co] : T(0);
        for (int64_t q = 0; q < plane; ++q) out[q] = in[q] + b;
      }
      if (e.residual)
        for (int64_t q = 0; q < plane; ++q) out[q] += e.residual[at + q];
      if (e.relu)
        for (int64_t q = 0; q < plane; ++q) out[q] = out[q] > T(0) ? out[q] : T(0);
    }
  }
}

// The taps [first, last) of a kernel of size k that read the input (size in) for some output position
// (out positions); the others only ever meet padding.
std::pair<int64_t, int64_t> useful_taps(int64_t in, int64_t out, int64_t k, int64_t stride, int64_t pad) {
  int64_t first = k, last = 0;
  for (int64_t t = 0; t < k; ++t)
    for (int64_t o = 0; o < out; ++o) {
      const int64_t i = o * stride - pad + t;
      if (i >= 0 && i < in) {
        first = std::min(first, t);
        last = std::max(last, t + 1);
      }
    }
  return first < last ? std::pair{first, last} : std::pair{int64_t{0}, k};
}

// The convolution as computed: taps that only ever meet padding are dropped (with the padding reduced
// to match), because they multiply zeros. At 32x32 input, ResNet50's 3x3 convolutions on 1x1 maps keep
// only the centre tap (a ninth of the work) and those on 2x2 maps with stride 2 keep 2x2 taps.
ConvGeometry geometry(const Tensor& x, const Tensor& weight, const Conv2dParams& p) {
  ConvGeometry g{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), weight.size(2), weight.size(3),
                 0, 0, p.stride, p.padding, p.padding, weight.size(2), weight.size(3), 0, 0};
  g.ho = (g.h + 2 * p.padding - g.full_kh) / g.stride + 1;
  g.wo = (g.w + 2 * p.padding - g.full_kw) / g.stride + 1;
  const auto [row0, row1] = useful_taps(g.h, g.ho, g.full_kh, g.stride, p.padding);
  const auto [col0, col1] = useful_taps(g.w, g.wo, g.full_kw, g.stride, p.padding);
  g.kh = row1 - row0;
  g.kw = col1 - col0;
  g.tap_row = row0;
  g.tap_col = col0;
  g.pad_h = p.padding - row0;
  g.pad_w = p.padding - col0;
  return g;
}

// Copies between the full weight (Cout, C, full_kh, full_kw) and its useful taps (Cout, C, kh, kw):
// to_taps gathers them, !to_taps writes them back and zeroes the others.
template <class T>
void copy_taps(const ConvGeometry& g, T* full, T* taps, bool to_taps) {
  const int64_t planes = g.cout * g.c;
  for (int64_t pl = 0; pl < planes; ++pl) {
    T* f = full + pl * g.full_kh * g.full_kw;
    T* t = taps + pl * g.kh * g.kw;
    if (!to_taps) std::fill(f, f + g.full_kh * g.full_kw, T(0));
    for (int64_t r = 0; r < g.kh; ++r)
      for (int64_t q = 0; q < g.kw; ++q) {
        T& full_tap = f[(g.tap_row + r) * g.full_kw + g.tap_col + q];
        if (to_taps) t[r * g.kw + q] = full_tap;
        else full_tap = t[r * g.kw + q];
      }
  }
}

// The weight's useful taps, contiguous: the weight itself when nothing was dropped.
template <class T>
const T* useful_weight(const ConvGeometry& g, const T* weight, std::vector<T>& storage) {
  if (!g.cropped()) return weight;
  storage.resize(static_cast<size_t>(g.cout * g.k()));
  copy_taps(g, const_cast<T*>(weight), storage.data(), true);
  return storage.data();
}

template <class T>
void conv2d_forward_impl(const Tensor& x, const Tensor& weight, const Conv2dParams& p, ConvEpilogue<T> epilogue,
                         const Tensor& y) {
  const ConvGeometry g = geometry(x, weight, p);
  const T* xp = ptr<T>(x);
  std::vector<T> taps;
  const T* wp = useful_weight(g, ptr<T>(weight), taps);
  T* yp = ptr<T>(y);
  const T* residual = epilogue.residual;
  const int64_t group = samples_per_group(g, sizeof(T));
  const std::unique_ptr<T[]> cols = scratch<T>(g.k() * group * g.p()), out = scratch<T>(g.cout * group * g.p());
  for (int64_t n0 = 0; n0 < g.n; n0 += group) {
    const int64_t count = std::min(group, g.n - n0), width = count * g.p();
    im2col(xp, g, n0, count, cols.get());
    // out (Cout, count*P) = W (Cout, K) x cols (K, count*P)
    blas::gemm(false, false, g.cout, width, g.k(), T(1), wp, g.k(), cols.get(), width, T(0), out.get(), width);
    if (residual) epilogue.residual = residual + n0 * g.cout * g.p();
    matrix_to_samples(out.get(), count, g.cout, g.p(), epilogue, yp + n0 * g.cout * g.p());
  }
}

// Evaluation-mode batch norm as a per-channel scale and shift, computed as batch_norm_forward does.
template <class T>
void batch_norm_eval_coefficients(const BatchNormEval& bn, std::vector<double>& scale, std::vector<double>& shift) {
  const int64_t c = bn.gamma.numel();
  scale.resize(c);
  shift.resize(c);
  for (int64_t ch = 0; ch < c; ++ch) {
    const double mean = ptr<T>(bn.running_mean)[ch], var = ptr<T>(bn.running_var)[ch];
    scale[ch] = 1.0 / std::sqrt(var + bn.eps) * ptr<T>(bn.gamma)[ch];
    shift[ch] = batch_norm_shift(mean, scale[ch], ptr<T>(bn.beta)[ch]);
  }
}

template <class T>
void conv2d_backward_impl(const Tensor& x, const Tensor& weight, const Tensor& grad_y, const Conv2dParams& p,
                          const Tensor& grad_x, const Tensor& grad_weight, const Tensor& grad_bias) {
  const ConvGeometry g = geometry(x, weight, p);
  const T* xp = ptr<T>(x);
  std::vector<T> taps, grad_taps;
  const T* wp = useful_weight(g, ptr<T>(weight), taps);
  const T* gyp = ptr<T>(grad_y);
  T* gw = nullptr;  // the gradient of the useful taps: grad_weight itself unless taps were dropped
  if (grad_weight.defined()) {
    if (g.cropped()) grad_taps.resize(static_cast<size_t>(g.cout * g.k()));
    gw = g.cropped() ? grad_taps.data() : ptr<T>(grad_weight);
  }
  const int64_t group = samples_per_group(g, sizeof(T));
  const std::unique_ptr<T[]> cols = scratch<T>(g.k() * group * g.p()), gy_matrix = scratch<T>(g.cout * group * g.p());
  if (grad_x.defined()) std::fill(ptr<T>(grad_x), ptr<T>(grad_x) + grad_x.numel(), T(0));
  for (int64_t n0 = 0; n0 < g.n; n0 += group) {
    const int64_t count = std::min(group, g.n - n0), width = count * g.p();
    samples_to_matrix(gyp + n0 * g.cout * g.p(), count, g.cout, g.p(), gy_matrix.get());  // (Cout, count*P)
    if (grad_weight.defined()) {
      im2col(xp, g, n0, count, cols.get());
      // dW (Cout, K) (+)= dY (Cout, count*P) x cols^T (count*P, K)
      blas::gemm(false, true, g.cout, g.k(), width, T(1), gy_matrix.get(), width, cols.get(), width,
                n0 == 0 ? T(0) : T(1), gw, g.k());
    }
    if (grad_x.defined()) {
      // dcols (K, count*P) = W^T (K, Cout) x dY (Cout, count*P), then scattered back onto the pixels
      blas::gemm(true, false, g.k(), width, g.cout, T(1), wp, g.k(), gy_matrix.get(), width, T(0), cols.get(),
                width);
      col2im_add(cols.get(), g, n0, count, ptr<T>(grad_x));
    }
  }
  if (grad_weight.defined() && g.cropped()) copy_taps(g, ptr<T>(grad_weight), gw, false);  // dropped taps: 0
  if (grad_bias.defined()) {
    T* gb = ptr<T>(grad_bias);
    for (int64_t co = 0; co < g.cout; ++co) {
      double sum = 0;
      for (int64_t n = 0; n < g.n; ++n) {
        const T* plane = gyp + (n * g.cout + co) * g.p();
        for (int64_t q = 0; q < g.p(); ++q) sum += plane[q];
      }
      gb[co] = static_cast<T>(sum);
    }
  }
}

class CpuBackend final : public Backend {
 public:
  const char* name() const override { return "cpu"; }

  void* allocate(size_t bytes) override {
    const size_t rounded = rounded_size(bytes);
    void* p = std::aligned_alloc(64, rounded);
    MDFF_CHECK(p, "out of host memory allocating ", bytes, " bytes");
    allocations_.fetch_add(1, std::memory_order_relaxed);
    const size_t in_use = bytes_in_use_.fetch_add(rounded, std::memory_order_relaxed) + rounded;
    size_t peak = peak_bytes_in_use_.load(std::memory_order_relaxed);
    while (in_use > peak && !peak_bytes_in_use_.compare_exchange_weak(peak, in_use, std::memory_order_relaxed)) {
    }
    return p;
  }
  void deallocate(void* p, size_t bytes) override {
    std::free(p);
    bytes_in_use_.fetch_sub(rounded_size(bytes), std::memory_order_relaxed);
  }
  // Tensors' memory as allocated (nothing is cached: what is freed goes back to malloc at once).
  MemoryStats memory_stats() const override {
    MemoryStats stats;
    stats.bytes_in_use = bytes_in_use_.load(std::memory_order_relaxed);
    stats.peak_bytes_in_use = stats.peak_bytes_reserved = peak_bytes_in_use_.load(std::memory_order_relaxed);
    stats.device_malloc_calls = allocations_.load(std::memory_order_relaxed);
    return stats;
  }
  void reset_peak_memory() override {
    peak_bytes_in_use_.store(bytes_in_use_.load(std::memory_order_relaxed), std::memory_order_relaxed);
  }
  void copy_from_host(void* dst, const void* src, size_t bytes) override { copy_on_device(dst, src, bytes); }
  void copy_to_host(void* dst, const void* src, size_t bytes) override { copy_on_device(dst, src, bytes); }
  void copy_on_device(void* dst, const void* src, size_t bytes) override {
    if (bytes && dst != src) std::memmove(dst, src, bytes);
  }

  void fill(const Tensor& out, double value) override {
    const int64_t n = out.numel();
    auto fill_with = [&](auto v) {
      auto* p = static_cast<decltype(v)*>(out.raw());
      for_each_index(n, [=](int64_t i) { p[i] = v; });
    };
    switch (out.dtype()) {
      case DType::F32: fill_with(static_cast<float>(value)); break;
      case DType::F64: fill_with(value); break;
      case DType::I32: fill_with(static_cast<int32_t>(value)); break;
    }
  }

  void cast(const Tensor& src, const Tensor& dst) override {
    const int64_t n = src.numel();
    dispatch_float(src.dtype(), "cast", [&](auto s) {
      using S = decltype(s);
      dispatch_float(dst.dtype(), "cast", [&](auto d) {
        using D = decltype(d);
        const S* in = ptr<S>(src);
        D* out = ptr<D>(dst);
        for (int64_t i = 0; i < n; ++i) out[i] = static_cast<D>(in[i]);
      });
    });
  }

  void binary(BinaryOp op, const Tensor& a, const Tensor& b, const Tensor& out) override {
    dispatch_float(out.dtype(), "binary", [&](auto zero) {
      using T = decltype(zero);
      const T* ap = ptr<T>(a);
      const T* bp = ptr<T>(b);
      T* op_ = ptr<T>(out);
      const int64_t n = out.numel();
      const Shape& shape = out.shape();
      // Fast paths: both inputs whole, or one whole and the other repeating with a period (a scalar, a
      // bias row).
      const int64_t period_b = a.shape() == shape ? trailing_period(b.shape(), shape) : 0;
      const int64_t period_a = b.shape() == shape ? trailing_period(a.shape(), shape) : 0;
      with_binary_op(op, [&](auto f) {
        if (a.shape() == shape && b.shape() == shape) {
          for_each_index(n, [=](int64_t i) { op_[i] = f(ap[i], bp[i]); });
        } else if (period_b == 1) {
          const T scalar = bp[0];
          for_each_index(n, [=](int64_t i) { op_[i] = f(ap[i], scalar); });
        } else if (period_a == 1) {
          const T scalar = ap[0];
          for_each_index(n, [=](int64_t i) { op_[i] = f(scalar, bp[i]); });
        } else if (period_b > 0 || period_a > 0) {
          const int64_t period = period_b > 0 ? period_b : period_a, rows = n / period;
#pragma omp parallel for schedule(static) if (n > kParallelGrain)
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t base = r * period;
            if (period_b > 0) {
              for (int64_t j = 0; j < period; ++j) op_[base + j] = f(ap[base + j], bp[j]);
            } else {
              for (int64_t j = 0; j < period; ++j) op_[base + j] = f(ap[j], bp[base + j]);
            }
          }
        } else {
          const auto sa = broadcast_strides(a.shape(), shape), sb = broadcast_strides(b.shape(), shape);
#pragma omp parallel for schedule(static) if (n > kParallelGrain)
          for (int64_t i = 0; i < n; ++i)
            op_[i] = f(ap[broadcast_offset(i, shape, sa)], bp[broadcast_offset(i, shape, sb)]);
        }
      });
    });
  }

  void scale(const Tensor& x, double alpha, const Tensor& out) override {
    dispatch_float(x.dtype(), "scale", [&](auto zero) {
      using T = decltype(zero);
      const T* xp = ptr<T>(x);
      T* yp = ptr<T>(out);
      const T a = static_cast<T>(alpha);
      const int64_t n = x.numel();
      for_each_index(n, [=](int64_t i) { yp[i] = a * xp[i]; });
    });
  }

  void unary(UnaryOp op, const Tensor& x, const Tensor& out) override {
    dispatch_float(x.dtype(), "unary", [&](auto zero) {
      using T = decltype(zero);
      const T* xp = ptr<T>(x);
      T* yp = ptr<T>(out);
      const int64_t n = x.numel();
      switch (op) {
        case UnaryOp::Relu: for_each_index(n, [=](int64_t i) { yp[i] = relu_value(xp[i]); }); break;
        case UnaryOp::Tanh: for_each_index(n, [=](int64_t i) { yp[i] = std::tanh(xp[i]); }); break;
        case UnaryOp::Sign: for_each_index(n, [=](int64_t i) { yp[i] = sign_value(xp[i]); }); break;
        case UnaryOp::Softplus: for_each_index(n, [=](int64_t i) { yp[i] = stable_softplus(xp[i]); }); break;
        case UnaryOp::Heaviside: for_each_index(n, [=](int64_t i) { yp[i] = xp[i] > T(0) ? T(1) : T(0); }); break;
      }
    });
  }

  void unary_backward(UnaryOp op, const Tensor& x, const Tensor& y, const Tensor& grad_y,
                      const Tensor& grad_x) override {
    dispatch_float(grad_y.dtype(), "unary_backward", [&](auto zero) {
      using T = decltype(zero);
      const T* gy = ptr<T>(grad_y);
      T* gx = ptr<T>(grad_x);
      const int64_t n = grad_y.numel();
      const T* xp = x.defined() ? ptr<T>(x) : nullptr;
      const T* yp = y.defined() ? ptr<T>(y) : nullptr;
      switch (op) {
        case UnaryOp::Relu:  // both operands loaded unconditionally: a select, not a branch on the sign
          for_each_index(n, [=](int64_t i) {
            const T g = gy[i];
            gx[i] = xp[i] > T(0) ? g : T(0);
          });
          break;
        case UnaryOp::Tanh: for_each_index(n, [=](int64_t i) { gx[i] = gy[i] * (T(1) - yp[i] * yp[i]); }); break;
        case UnaryOp::Sign:
        case UnaryOp::Heaviside: for_each_index(n, [=](int64_t i) { gx[i] = T(0); }); break;
        case UnaryOp::Softplus: for_each_index(n, [=](int64_t i) { gx[i] = gy[i] * stable_sigmoid(xp[i]); }); break;
      }
    });
  }

  void sum_to(const Tensor& src, const Tensor& out) override {
    dispatch_float(src.dtype(), "sum_to", [&](auto zero) {
      using T = decltype(zero);
      const T* sp = ptr<T>(src);
      T* op_ = ptr<T>(out);
      const Shape& shape = src.shape();
      const auto strides = broadcast_strides(out.shape(), shape);
      std::vector<double> acc(static_cast<size_t>(out.numel()), 0.0);  // double: sums of many floats
      const int64_t n = src.numel();
      for (int64_t i = 0; i < n; ++i) acc[broadcast_offset(i, shape, strides)] += sp[i];
      for (size_t i = 0; i < acc.size(); ++i) op_[i] = static_cast<T>(acc[i]);
    });
  }

  void gemm(bool ta, bool tb, double alpha, const Tensor& a, const Tensor& b, double beta, const Tensor& c) override {
    dispatch_float(c.dtype(), "gemm", [&](auto zero) {
      using T = decltype(zero);
      const int m = static_cast<int>(c.size(0)), n = static_cast<int>(c.size(1));
      const int k = static_cast<int>(ta ? a.size(0) : a.size(1));
      blas::gemm(ta, tb, m, n, k, static_cast<T>(alpha), ptr<T>(a), static_cast<int>(a.size(1)), ptr<T>(b),
                static_cast<int>(b.size(1)), static_cast<T>(beta), ptr<T>(c), n);
    });
  }

  void conv2d_forward(const Tensor& x, const Tensor& w, const Tensor& b, const Conv2dParams& p,
                      const Tensor& y) override {
    dispatch_float(x.dtype(), "conv2d_forward", [&](auto zero) {
      using T = decltype(zero);
      ConvEpilogue<T> epilogue;
      epilogue.bias = b.defined() ? ptr<T>(b) : nullptr;
      conv2d_forward_impl<T>(x, w, p, epilogue, y);
    });
  }

  void conv2d_bn_forward(const Tensor& x, const Tensor& w, const Conv2dParams& p, const BatchNormEval& bn,
                         const Tensor& residual, bool relu, const Tensor& y) override {
    dispatch_float(x.dtype(), "conv2d_bn_forward", [&](auto zero) {
      using T = decltype(zero);
      std::vector<double> scale, shift;
      batch_norm_eval_coefficients<T>(bn, scale, shift);
      ConvEpilogue<T> epilogue;
      epilogue.scale = scale.data();
      epilogue.shift = shift.data();
      epilogue.residual = residual.defined() ? ptr<T>(residual) : nullptr;
      epilogue.relu = relu;
      conv2d_forward_impl<T>(x, w, p, epilogue, y);
    });
  }

  void conv2d_backward(const Tensor& x, const Tensor& w, const Tensor& gy, const Conv2dParams& p, const Tensor& gx,
                       const Tensor& gw, const Tensor& gb) override {
    dispatch_float(x.dtype(), "conv2d_backward",
                   [&](auto zero) { conv2d_backward_impl<decltype(zero)>(x, w, gy, p, gx, gw, gb); });
  }

  void batch_norm_forward(const Tensor& x, const Tensor& gamma, const Tensor& beta, const Tensor& running_mean,
                          const Tensor& running_var, bool training, double momentum, double eps, const Tensor& y,
                          const Tensor& save_mean, const Tensor& save_invstd, bool relu) override {
    dispatch_float(x.dtype(), "batch_norm_forward", [&](auto zero) {
      using T = decltype(zero);
      const int64_t n = x.size(0), c = x.size(1), plane = x.numel() / (n * c);
      for_each_channel_tile(n, c, plane, 2, [&](const ChannelTile& t, double* scratch) {
        batch_norm_forward_tile(t, ptr<T>(x), ptr<T>(gamma), ptr<T>(beta), ptr<T>(running_mean), ptr<T>(running_var),
                                training, momentum, eps, ptr<T>(y), ptr<T>(save_mean), ptr<T>(save_invstd), relu,
                                scratch);
      });
    });
  }

  void batch_norm_backward(const Tensor& x, const Tensor& gamma, const Tensor& mean, const Tensor& invstd,
                           const Tensor& grad_y, bool training, const Tensor& grad_x, const Tensor& grad_gamma,
                           const Tensor& grad_beta) override {
    dispatch_float(x.dtype(), "batch_norm_backward", [&](auto zero) {
      using T = decltype(zero);
      const int64_t n = x.size(0), c = x.size(1), plane = x.numel() / (n * c);
      auto optional = [](const Tensor& t) { return t.defined() ? ptr<T>(t) : nullptr; };
      for_each_channel_tile(n, c, plane, 4, [&](const ChannelTile& t, double* scratch) {
        batch_norm_backward_tile(t, ptr<T>(x), ptr<T>(gamma), ptr<T>(mean), ptr<T>(invstd), ptr<T>(grad_y), training,
                                 optional(grad_x), optional(grad_gamma), optional(grad_beta), scratch);
      });
    });
  }

  void max_pool2d_forward(const Tensor& x, const Pool2dParams& p, const Tensor& y, const Tensor& argmax) override {
    dispatch_float(x.dtype(), "max_pool2d_forward", [&](auto zero) {
      using T = decltype(zero);
      const int64_t planes = x.size(0) * x.size(1), h = x.size(2), w = x.size(3), ho = y.size(2), wo = y.size(3);
      const T* xp = ptr<T>(x);
      T* yp = ptr<T>(y);
      int32_t* ap = ptr<int32_t>(argmax);
      // Row by row of the output: each tap (ki, kj) of the windows is applied to the whole output row at once,
      // in the taps' row-major order, so that every output still sees its taps in that order (the first
      // maximum wins, the last NaN propagates) while the loop over the row carries no dependence from one
      // output to the next. (A window at a time, the running maximum chained every tap's compare to the last
      // and mispredicted on random data: 164 ms, 0.9 GB/s, at ResNet50's 224x224 batch 32 before.)
      const int64_t kernel = p.kernel, stride = p.stride, padding = p.padding;  // locals: no reload per tap
      // For each tap column kj, the outputs of a row whose tap falls inside the input row:
      // 0 <= ow * stride + kj - padding < w for ow in [first_ow[kj], end_ow[kj]).
      std::vector<int64_t> first_ow(kernel), end_ow(kernel);
      for (int64_t kj = 0; kj < kernel; ++kj) {
        const int64_t offset = kj - padding;
        first_ow[kj] = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
        end_ow[kj] = w - offset <= 0 ? 0 : std::min<int64_t>(wo, (w - 1 - offset) / stride + 1);
      }
#pragma omp parallel for schedule(static)
      for (int64_t pl = 0; pl < planes; ++pl) {
        const T* in = xp + pl * h * w;
        for (int64_t oh = 0; oh < ho; ++oh) {
          T* __restrict best = yp + (pl * ho + oh) * wo;
          int32_t* __restrict best_at = ap + (pl * ho + oh) * wo;
          std::fill(best, best + wo, -std::numeric_limits<T>::infinity());
          std::fill(best_at, best_at + wo, -1);  // stays -1 only for a window wholly in the padding
          for (int64_t ki = 0; ki < kernel; ++ki) {
            const int64_t ih = oh * stride - padding + ki;
            if (ih < 0 || ih >= h) continue;
            const T* __restrict row = in + ih * w;
            for (int64_t kj = 0; kj < kernel; ++kj) {
              const int64_t offset = kj - padding;
              const int32_t first_at = static_cast<int32_t>(ih * w + offset);
              for (int64_t ow = first_ow[kj], end = end_ow[kj]; ow < end; ++ow) {
                const T v = row[ow * stride + offset], current = best[ow];
                const int32_t current_at = best_at[ow];
                // Bitwise, not short-circuit: a select, not a branch that random data mispredicts.
                const bool take = (v > current) | std::isnan(v) | (current_at < 0);
                best[ow] = take ? v : current;
                best_at[ow] = take ? first_at + static_cast<int32_t>(ow * stride) : current_at;
              }
            }
          }
        }
      }
    });
  }

  void max_pool2d_backward(const Tensor& grad_y, const Tensor& argmax, const Tensor& grad_x) override {
    dispatch_float(grad_y.dtype(), "max_pool2d_backward", [&](auto zero) {
      using T = decltype(zero);
      const int64_t planes = grad_x.size(0) * grad_x.size(1), in_plane = grad_x.size(2) * grad_x.size(3);
      const int64_t out_plane = grad_y.size(2) * grad_y.size(3);
      const T* gy = ptr<T>(grad_y);
      const int32_t* ap = ptr<int32_t>(argmax);
      T* gx = ptr<T>(grad_x);
#pragma omp parallel for schedule(static)
      for (int64_t pl = 0; pl < planes; ++pl) {
        T* dst = gx + pl * in_plane;
        std::fill(dst, dst + in_plane, T(0));
        for (int64_t q = 0; q < out_plane; ++q) dst[ap[pl * out_plane + q]] += gy[pl * out_plane + q];
      }
    });
  }

  void global_avg_pool_forward(const Tensor& x, const Tensor& y) override {
    dispatch_float(x.dtype(), "global_avg_pool_forward", [&](auto zero) {
      using T = decltype(zero);
      const int64_t planes = x.size(0) * x.size(1), plane = x.size(2) * x.size(3);
      const T* xp = ptr<T>(x);
      T* yp = ptr<T>(y);
#pragma omp parallel for schedule(static) if (planes * plane > kParallelGrain)
      for (int64_t pl = 0; pl < planes; ++pl) {
        double sum = 0;
        for (int64_t q = 0; q < plane; ++q) sum += xp[pl * plane + q];
        yp[pl] = static_cast<T>(sum / plane);
      }
    });
  }

  void global_avg_pool_backward(const Tensor& grad_y, const Tensor& grad_x) override {
    dispatch_float(grad_y.dtype(), "global_avg_pool_backward", [&](auto zero) {
      using T = decltype(zero);
      const int64_t planes = grad_x.size(0) * grad_x.size(1), plane = grad_x.size(2) * grad_x.size(3);
      const T* gy = ptr<T>(grad_y);
      T* gx = ptr<T>(grad_x);
#pragma omp parallel for schedule(static) if (planes * plane > kParallelGrain)
      for (int64_t pl = 0; pl < planes; ++pl) std::fill(gx + pl * plane, gx + (pl + 1) * plane, gy[pl] / T(plane));
    });
  }

  void upsample_nearest_forward(const Tensor& x, const Tensor& y) override {
    for_each_nearest(x, y, "upsample_nearest_forward", [](auto* src, auto* dst, int64_t s, int64_t d) { dst[d] = src[s]; });
  }

  void upsample_nearest_backward(const Tensor& grad_y, const Tensor& grad_x) override {
    // Reads grad_y through the same index map and adds into grad_x (several outputs share a source).
    for_each_nearest(grad_x, grad_y, "upsample_nearest_backward",
                     [](auto* gx, auto* gy, int64_t s, int64_t d) { gx[s] += gy[d]; });
  }

  void resize_bilinear(const Tensor& x, const Tensor& y) override {
    dispatch_float(x.dtype(), "resize_bilinear", [&](auto zero) {
      using T = decltype(zero);
      const int64_t planes = x.size(0) * x.size(1), h = x.size(2), w = x.size(3), ho = y.size(2), wo = y.size(3);
      const T* xp = ptr<T>(x);
      T* yp = ptr<T>(y);
      // PyTorch, align_corners=False: src = (dst + 0.5) * in/out - 0.5, clamped at 0.
      auto source = [](int64_t dst, int64_t in, int64_t out, int64_t& i0, int64_t& i1, T& frac) {
        const T s = std::max(T(0), (dst + T(0.5)) * (T(in) / T(out)) - T(0.5));
        i0 = std::min<int64_t>(static_cast<int64_t>(s), in - 1);
        i1 = std::min<int64_t>(i0 + 1, in - 1);
        frac = s - T(i0);
      };
#pragma omp parallel for schedule(static)
      for (int64_t pl = 0; pl < planes; ++pl) {
        const T* in = xp + pl * h * w;
        for (int64_t oh = 0; oh < ho; ++oh) {
          int64_t h0, h1;
          T fh;
          source(oh, h, ho, h0, h1, fh);
          for (int64_t ow = 0; ow < wo; ++ow) {
            int64_t w0, w1;
            T fw;
            source(ow, w, wo, w0, w1, fw);
            yp[(pl * ho + oh) * wo + ow] = (T(1) - fh) * ((T(1) - fw) * in[h0 * w + w0] + fw * in[h0 * w + w1]) +
                                           fh * ((T(1) - fw) * in[h1 * w + w0] + fw * in[h1 * w + w1]);
          }
        }
      }
    });
  }

  void copy_block(const Tensor& part, const Tensor& whole, int64_t outer, int64_t part_inner, int64_t whole_inner,
                  int64_t offset, bool into_whole) override {
    const size_t elem = dtype_size(part.dtype());
    char* pp = static_cast<char*>(part.raw());
    char* wp = static_cast<char*>(whole.raw());
    for (int64_t o = 0; o < outer; ++o) {
      char* block = wp + (o * whole_inner + offset) * elem;
      char* piece = pp + o * part_inner * elem;
      if (into_whole) std::memcpy(block, piece, part_inner * elem);
      else std::memcpy(piece, block, part_inner * elem);
    }
  }

  void pairwise_logistic_forward(const Tensor& theta, const Tensor& s, const Tensor& out) override {
    dispatch_float(theta.dtype(), "pairwise_logistic_forward", [&](auto zero) {
      using T = decltype(zero);
      const T* tp = ptr<T>(theta);
      const T* sp = ptr<T>(s);
      const int64_t n = theta.numel();
      // each element in T, as the separate ops compute it
      const double sum =
          ordered_sum(n, [=](int64_t i) { return static_cast<double>(stable_softplus(tp[i]) - sp[i] * tp[i]); });
      *ptr<T>(out) = static_cast<T>(sum / static_cast<double>(n));
    });
  }

  void pairwise_logistic_backward(const Tensor& theta, const Tensor& s, const Tensor& grad_out,
                                  const Tensor& grad_theta) override {
    dispatch_float(theta.dtype(), "pairwise_logistic_backward", [&](auto zero) {
      using T = decltype(zero);
      const T* tp = ptr<T>(theta);
      const T* sp = ptr<T>(s);
      T* gp = ptr<T>(grad_theta);
      const int64_t n = theta.numel();
      const T g = static_cast<T>(static_cast<double>(*ptr<T>(grad_out)) / static_cast<double>(n));  // per element
      for_each_index(n, [=](int64_t i) { gp[i] = g * (stable_sigmoid(tp[i]) - sp[i]); });
    });
  }

  void quantization_forward(const Tensor& u, const Tensor& out) override {
    dispatch_float(u.dtype(), "quantization_forward", [&](auto zero) {
      using T = decltype(zero);
      const T* up = ptr<T>(u);
      const double sum = ordered_sum(u.numel(), [=](int64_t i) {
        const T d = sign_value(up[i]) - up[i];
        return static_cast<double>(d * d);
      });
      *ptr<T>(out) = static_cast<T>(sum / static_cast<double>(u.size(0)));
    });
  }

  void quantization_backward(const Tensor& u, const Tensor& grad_out, const Tensor& grad_u) override {
    dispatch_float(u.dtype(), "quantization_backward", [&](auto zero) {
      using T = decltype(zero);
      const T* up = ptr<T>(u);
      T* gp = ptr<T>(grad_u);
      const T g = static_cast<T>(2.0 * static_cast<double>(*ptr<T>(grad_out)) / static_cast<double>(u.size(0)));
      for_each_index(u.numel(), [=](int64_t i) { gp[i] = g * (up[i] - sign_value(up[i])); });
    });
  }

  void cross_entropy_forward(const Tensor& logits, const Tensor& target, const Tensor& out,
                             const Tensor& log_sum_exp) override {
    dispatch_float(logits.dtype(), "cross_entropy_forward", [&](auto zero) {
      using T = decltype(zero);
      const int64_t rows = logits.size(0), k = logits.size(1);
      const T* xp = ptr<T>(logits);
      const T* tp = ptr<T>(target);
      T* lp = ptr<T>(log_sum_exp);
      double total = 0;
      for (int64_t r = 0; r < rows; ++r) {
        const T* in = xp + r * k;
        const T lse = row_log_sum_exp(in, k);
        lp[r] = lse;
        double row = 0;
        for (int64_t j = 0; j < k; ++j) row += static_cast<double>(tp[r * k + j]) * static_cast<double>(lse - in[j]);
        total += row;
      }
      *ptr<T>(out) = static_cast<T>(total / static_cast<double>(rows));
    });
  }

  void cross_entropy_backward(const Tensor& logits, const Tensor& target, const Tensor& log_sum_exp,
                              const Tensor& grad_out, const Tensor& grad_logits) override {
    dispatch_float(logits.dtype(), "cross_entropy_backward", [&](auto zero) {
      using T = decltype(zero);
      const int64_t rows = logits.size(0), k = logits.size(1);
      const T* xp = ptr<T>(logits);
      const T* tp = ptr<T>(target);
      const T* lp = ptr<T>(log_sum_exp);
      T* gp = ptr<T>(grad_logits);
      const double g = static_cast<double>(*ptr<T>(grad_out)) / static_cast<double>(rows);
      for (int64_t r = 0; r < rows; ++r) {
        double mass = 0;  // the row's target total (1 for probabilities)
        for (int64_t j = 0; j < k; ++j) mass += tp[r * k + j];
        for (int64_t j = 0; j < k; ++j) {
          const int64_t i = r * k + j;
          const double softmax = std::exp(static_cast<double>(xp[i] - lp[r]));
          gp[i] = static_cast<T>(g * (softmax * mass - static_cast<double>(tp[i])));
        }
      }
    });
  }

  void log_softmax_forward(const Tensor& x, const Tensor& y) override {
    dispatch_float(x.dtype(), "log_softmax_forward", [&](auto zero) {
      using T = decltype(zero);
      const int64_t rows = x.size(0), k = x.size(1);
      const T* xp = ptr<T>(x);
      T* yp = ptr<T>(y);
      for (int64_t r = 0; r < rows; ++r) {
        const T* in = xp + r * k;
        const T log_sum = row_log_sum_exp(in, k);
        for (int64_t j = 0; j < k; ++j) yp[r * k + j] = in[j] - log_sum;
      }
    });
  }

  void log_softmax_backward(const Tensor& y, const Tensor& grad_y, const Tensor& grad_x) override {
    dispatch_float(y.dtype(), "log_softmax_backward", [&](auto zero) {
      using T = decltype(zero);
      const int64_t rows = y.size(0), k = y.size(1);
      const T* yp = ptr<T>(y);
      const T* gy = ptr<T>(grad_y);
      T* gx = ptr<T>(grad_x);
      for (int64_t r = 0; r < rows; ++r) {  // dx = dy - softmax * sum(dy)
        double sum = 0;
        for (int64_t j = 0; j < k; ++j) sum += gy[r * k + j];
        for (int64_t j = 0; j < k; ++j) gx[r * k + j] = static_cast<T>(gy[r * k + j] - std::exp(yp[r * k + j]) * sum);
      }
    });
  }

  void gather_rows(const Tensor& src, const Tensor& index, const Tensor& out) override {
    const int32_t* ip = ptr<int32_t>(index);
    const int64_t rows = index.numel(), width = src.numel() / std::max<int64_t>(src.size(0), 1);
    const size_t row_bytes = width * dtype_size(src.dtype());
    check_rows(index, src.size(0), "gather_rows");
    for (int64_t i = 0; i < rows; ++i)
      std::memcpy(static_cast<char*>(out.raw()) + i * row_bytes, static_cast<char*>(src.raw()) + ip[i] * row_bytes,
                  row_bytes);
  }

  void scatter_rows(const Tensor& src, const Tensor& index, const Tensor& dst, bool accumulate) override {
    check_rows(index, dst.size(0), "scatter_rows");
    dispatch_float(src.dtype(), "scatter_rows", [&](auto zero) {
      using T = decltype(zero);
      const int32_t* ip = ptr<int32_t>(index);
      const int64_t rows = index.numel(), width = src.numel() / std::max<int64_t>(rows, 1);
      const T* sp = ptr<T>(src);
      T* dp = ptr<T>(dst);
      for (int64_t i = 0; i < rows; ++i) {
        T* row = dp + ip[i] * width;
        for (int64_t j = 0; j < width; ++j) row[j] = accumulate ? row[j] + sp[i * width + j] : sp[i * width + j];
      }
    });
  }

  void count_non_finite(const std::vector<Tensor>& tensors, const Tensor& count) override {
    MDFF_CHECK(count.dtype() == DType::I32 && count.numel() == 1, "count_non_finite: the count must be one I32, got ",
               dtype_name(count.dtype()), " ", shape_str(count.shape()));
    int64_t found = 0;
    for (const Tensor& x : tensors) {
      dispatch_float(x.dtype(), "count_non_finite", [&](auto zero) {
        using T = decltype(zero);
        const T* xp = ptr<T>(x);
        const int64_t n = x.numel();
#pragma omp parallel for schedule(static) reduction(+ : found) if (n > kParallelGrain)
        for (int64_t i = 0; i < n; ++i) found += !std::isfinite(xp[i]);
      });
    }
    *ptr<int32_t>(count) += static_cast<int32_t>(found);  // the tensors have < 2^31 elements (ops checks)
  }

  void pack_signs(const Tensor& x, const Tensor& codes) override {
    const int64_t rows = x.size(0), bits = x.size(1), words = codes.size(1);
    dispatch_float(x.dtype(), "pack_signs", [&](auto zero) {
      using T = decltype(zero);
      const T* xp = ptr<T>(x);
      uint32_t* out = reinterpret_cast<uint32_t*>(ptr<int32_t>(codes));
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t w = 0; w < words; ++w) {
          uint32_t word = 0;
          for (int64_t b = w * 32; b < std::min(bits, (w + 1) * 32); ++b)
            if (xp[r * bits + b] >= T(0)) word |= uint32_t{1} << (b - w * 32);
          out[r * words + w] = word;
        }
      }
    });
  }

  void hamming_distances(const Tensor& queries, const Tensor& database, const Tensor& distances) override {
    const int64_t q_rows = queries.size(0), db_rows = database.size(0), words = queries.size(1);
    const uint32_t* q = reinterpret_cast<const uint32_t*>(ptr<int32_t>(queries));
    const uint32_t* db = reinterpret_cast<const uint32_t*>(ptr<int32_t>(database));
    int32_t* out = ptr<int32_t>(distances);
#pragma omp parallel for schedule(static) if (q_rows * db_rows > kParallelGrain)
    for (int64_t i = 0; i < q_rows; ++i)
      for (int64_t j = 0; j < db_rows; ++j) {
        out[i * db_rows + j] = hamming_distance(q + i * words, db + j * words, words);
      }
  }
  // Per query: the distances, their histogram, and a stable counting sort that stops at k places.
  void hamming_top_k(const Tensor& queries, const Tensor& database, int64_t k, const Tensor& indices,
                     const Tensor& distances) override {
    const int64_t q_rows = queries.size(0), db_rows = database.size(0), words = queries.size(1);
    const uint32_t* q = reinterpret_cast<const uint32_t*>(ptr<int32_t>(queries));
    const uint32_t* db = reinterpret_cast<const uint32_t*>(ptr<int32_t>(database));
    const int64_t bins = 32 * words + 1;
#pragma omp parallel for schedule(dynamic)
    for (int64_t i = 0; i < q_rows; ++i) {
      std::vector<int32_t> distance(static_cast<size_t>(db_rows));
      std::vector<int64_t> next(static_cast<size_t>(bins) + 1, 0);  // next[d]: the place of the next item at d
      for (int64_t j = 0; j < db_rows; ++j) {
        distance[j] = hamming_distance(q + i * words, db + j * words, words);
        ++next[distance[j] + 1];
      }
      for (int64_t d = 1; d <= bins; ++d) next[d] += next[d - 1];
      int32_t* index_row = ptr<int32_t>(indices) + i * k;
      int32_t* distance_row = ptr<int32_t>(distances) + i * k;
      for (int64_t j = 0; j < db_rows; ++j) {
        const int64_t place = next[distance[j]]++;
        if (place < k) {
          index_row[place] = static_cast<int32_t>(j);
          distance_row[place] = distance[j];
        }
      }
    }
  }


  void rmsprop_step(const Tensor& params, const std::vector<GradientSlice>& grads, const Tensor& square_avg,
                    double lr, double alpha, double eps, double weight_decay) override {
    check_gradient_slices(params, grads, square_avg, "rmsprop_step");
    dispatch_float(params.dtype(), "rmsprop_step", [&](auto zero) {
      using T = decltype(zero);
      const T a = T(alpha), e = T(eps), l = T(lr), wd = T(weight_decay);
      for (const GradientSlice& slice : grads) {
        T* p = ptr<T>(params) + slice.offset;
        const T* gp = ptr<T>(slice.grad);
        T* v = ptr<T>(square_avg) + slice.offset;
        const int64_t n = slice.grad.numel();
#pragma omp parallel for schedule(static) if (n > kParallelGrain)
        for (int64_t i = 0; i < n; ++i) {  // the order of PyTorch's operations, for the same rounding
          const T g = weight_decay != 0 ? gp[i] + wd * p[i] : gp[i];
          v[i] = v[i] * a + (T(1) - a) * g * g;
          p[i] -= l * (g / (std::sqrt(v[i]) + e));
        }
      }
    });
  }

  void sgd_step(const Tensor& params, const std::vector<GradientSlice>& grads, const Tensor& buffer, double lr,
                double momentum, double weight_decay, bool first_step) override {
    check_gradient_slices(params, grads, buffer, "sgd_step");
    dispatch_float(params.dtype(), "sgd_step", [&](auto zero) {
      using T = decltype(zero);
      const T m = T(momentum), l = T(lr), wd = T(weight_decay);
      for (const GradientSlice& slice : grads) {
        T* p = ptr<T>(params) + slice.offset;
        const T* gp = ptr<T>(slice.grad);
        T* b = ptr<T>(buffer) + slice.offset;
        const int64_t n = slice.grad.numel();
#pragma omp parallel for schedule(static) if (n > kParallelGrain)
        for (int64_t i = 0; i < n; ++i) {
          const T g = weight_decay != 0 ? gp[i] + wd * p[i] : gp[i];
          b[i] = first_step ? g : m * b[i] + g;
          p[i] -= l * b[i];
        }
      }
    });
  }

 private:
  static void check_rows(const Tensor& index, int64_t limit, const char* kernel) {
    const int32_t* ip = ptr<int32_t>(index);
    for (int64_t i = 0; i < index.numel(); ++i)
      MDFF_CHECK(ip[i] >= 0 && ip[i] < limit, kernel, ": row index ", ip[i], " at position ", i,
                 " is outside [0, ", limit, ")");
  }

  // Calls fn(from_plane, to_plane, s, d) for every element d of `to` (the upsampled size) and its
  // nearest source element s of `from` (the original size), plane by plane (PyTorch mode='nearest': s = floor(d * in / out) in float arithmetic).
  template <class Fn>
  static void for_each_nearest(const Tensor& from, const Tensor& to, const char* kernel, Fn fn) {
    dispatch_float(from.dtype(), kernel, [&](auto zero) {
      using T = decltype(zero);
      const int64_t planes = from.size(0) * from.size(1), h = from.size(2), w = from.size(3);
      const int64_t ho = to.size(2), wo = to.size(3);
      const float sh = static_cast<float>(h) / ho, sw = static_cast<float>(w) / wo;
      T* fp = ptr<T>(from);
      T* tp = ptr<T>(to);
#pragma omp parallel for schedule(static)
      for (int64_t pl = 0; pl < planes; ++pl)
        for (int64_t oh = 0; oh < ho; ++oh) {
          const int64_t ih = std::min<int64_t>(static_cast<int64_t>(std::floor(oh * sh)), h - 1);
          for (int64_t ow = 0; ow < wo; ++ow) {
            const int64_t iw = std::min<int64_t>(static_cast<int64_t>(std::floor(ow * sw)), w - 1);
            fn(fp + pl * h * w, tp + pl * ho * wo, ih * w + iw, oh * wo + ow);
          }
        }
    });
  }

  // 64-byte alignment: whole cache lines and AVX-512 vectors; aligned_alloc needs a multiple of it.
  static size_t rounded_size(size_t bytes) { return (std::max<size_t>(bytes, 1) + 63) / 64 * 64; }

  std::atomic<size_t> bytes_in_use_{0}, peak_bytes_in_use_{0};
  std::atomic<int64_t> allocations_{0};
};

}  // namespace

// Flush denormal floats to zero (FTZ) and read them as zero (DAZ), for the whole process: set in the
// main thread before main() runs, so that every thread created later (OpenMP's and OpenBLAS's pools,
// the data loader) inherits it (POSIX threads inherit the floating-point environment). Training
// produces denormals (RMSProp's running mean of g^2 decays towards 0 for parameters with tiny
// gradients), and arithmetic on them is up to 100x slower on x86: measured on ResNet50-MDFF-SH, the
// step time grew from 0.4 s to 1.1 s within an epoch without this, and stays at 0.4 s with it.
// PyTorch offers the same switch (torch.set_flush_denormal). Values below 1.2e-38 in float32
// (2.2e-308 in float64) become 0.
const bool kDenormalsFlushed = [] {
  _mm_setcsr(_mm_getcsr() | 0x8040);  // FTZ (bit 15) | DAZ (bit 6)
  return true;
}();

Backend& cpu_backend() {
  static CpuBackend instance;
  return instance;
}

bool denormals_flushed() { return kDenormalsFlushed && (_mm_getcsr() & 0x8040) == 0x8040; }

}  // namespace mdff
