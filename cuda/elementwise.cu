// CUDA kernels for the elementwise family and sum_to: fill, cast, binary (with broadcasting), scale,
// unary, unary_backward. Each is the twin of the CPU kernel of the same name and follows the contract
// in core/backend.h. Every kernel is a grid-stride loop over the output, in float and double (the
// loop's helpers and the math, softplus and sigmoid among it, are in kernel_helpers.cuh).
#include <algorithm>
#include <vector>

#include "cuda/check.h"
#include "cuda/device.h"
#include "cuda/kernel_helpers.cuh"
#include "cuda/kernels.h"

namespace mdff::cuda {

namespace {

constexpr int kMaxDims = 8;  // dimensions a broadcast or reduction can index (after merging)

void check_float(const Tensor& t, const char* kernel) {
  MDFF_CHECK(is_floating(t.dtype()), "cuda ", kernel, ": needs a float32 or float64 tensor, got ",
             dtype_name(t.dtype()));
}

void check_same(const Tensor& a, const Tensor& b, const char* kernel) {
  MDFF_CHECK(a.numel() == b.numel() && a.dtype() == b.dtype(), "cuda ", kernel, ": tensors of shape ",
             shape_str(a.shape()), " ", dtype_name(a.dtype()), " and ", shape_str(b.shape()), " ",
             dtype_name(b.dtype()), " do not match");
}

// ---------------------------------------------------------------------------------------------------
// fill, cast, scale

template <class T>
__global__ void fill_kernel(T* out, T value, int64_t n) {
  for (int64_t i = grid_start(); i < n; i += grid_step()) out[i] = value;
}

template <class T>
void launch_fill(const Tensor& out, double value) {
  const int64_t n = out.numel();
  if (n == 0) return;
  fill_kernel<T><<<blocks_for(n), kThreads, 0, stream()>>>(out.data<T>(), static_cast<T>(value), n);
  MDFF_CUDA_CHECK_LAUNCH();
}

template <class From, class To>
__global__ void cast_kernel(const From* src, To* dst, int64_t n) {
  for (int64_t i = grid_start(); i < n; i += grid_step()) dst[i] = static_cast<To>(src[i]);
}

template <class From, class To>
void launch_cast(const Tensor& src, const Tensor& dst) {
  const int64_t n = src.numel();
  if (n == 0) return;
  cast_kernel<From, To><<<blocks_for(n), kThreads, 0, stream()>>>(src.data<From>(), dst.data<To>(), n);
  MDFF_CUDA_CHECK_LAUNCH();
}

template <class T>
__global__ void scale_kernel(const T* x, T alpha, T* out, int64_t n) {
  for (int64_t i = grid_start(); i < n; i += grid_step()) out[i] = alpha * x[i];
}

template <class T>
void launch_scale(const Tensor& x, double alpha, const Tensor& out) {
  const int64_t n = x.numel();
  if (n == 0) return;
  scale_kernel<T><<<blocks_for(n), kThreads, 0, stream()>>>(x.data<T>(), static_cast<T>(alpha), out.data<T>(), n);
  MDFF_CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------------
// binary: out = a (op) b with NumPy broadcasting

// How a and b are read at each index of out. Dimensions of size 1 in out are dropped and neighbours
// that stay contiguous in all three tensors are merged, so (4,3,5,5) + (1,3,1,1) becomes three
// dimensions (4,3,25) with a's strides (75,25,1) and b's (0,1,0). Passed to the kernel by value.
struct BroadcastIndex {
  int dims = 0;
  int64_t size[kMaxDims];      // out's (merged) shape
  int64_t stride_a[kMaxDims];  // a's element stride along each dim of out; 0 where a repeats
  int64_t stride_b[kMaxDims];
};

// The strides of `in` (aligned to the right of out_shape, as NumPy does) viewed at out's shape: the
// contiguous stride where the sizes agree, 0 where `in` has size 1 or lacks the dimension.
std::vector<int64_t> broadcast_strides(const Shape& in, const Shape& out, const char* kernel) {
  const size_t nd = out.size();
  MDFF_CHECK(in.size() <= nd, "cuda ", kernel, ": shape ", shape_str(in), " does not broadcast to ", shape_str(out));
  std::vector<int64_t> strides(nd, 0);
  int64_t stride = 1;
  for (size_t k = 0; k < in.size(); ++k) {  // k-th dimension from the right
    const int64_t in_size = in[in.size() - 1 - k], out_size = out[nd - 1 - k];
    MDFF_CHECK(in_size == out_size || in_size == 1, "cuda ", kernel, ": shape ", shape_str(in),
               " does not broadcast to ", shape_str(out));
    if (in_size != 1) strides[nd - 1 - k] = stride;
    stride *= in_size;
  }
  return strides;
}

BroadcastIndex make_broadcast_index(const Shape& a, const Shape& b, const Shape& out) {
  const std::vector<int64_t> sa = broadcast_strides(a, out, "binary"), sb = broadcast_strides(b, out, "binary");
  BroadcastIndex ix;
  for (size_t d = 0; d < out.size(); ++d) {
    if (out[d] == 1) continue;  // a single position: contributes nothing to any offset
    const int last = ix.dims - 1;
    // Merge into the previous (outer) dimension when stepping past the end of this one lands exactly
    // on the next position of the previous one, for both inputs.
    if (last >= 0 && ix.stride_a[last] == sa[d] * out[d] && ix.stride_b[last] == sb[d] * out[d]) {
      ix.size[last] *= out[d];
      ix.stride_a[last] = sa[d];
      ix.stride_b[last] = sb[d];
      continue;
    }
    MDFF_CHECK(ix.dims < kMaxDims, "cuda binary: broadcasting ", shape_str(a), " and ", shape_str(b), " to ",
               shape_str(out), " needs more than ", kMaxDims, " dimensions");
    ix.size[ix.dims] = out[d];
    ix.stride_a[ix.dims] = sa[d];
    ix.stride_b[ix.dims] = sb[d];
    ++ix.dims;
  }
  return ix;
}

template <BinaryOp Op, class T>
__device__ inline T apply_binary(T a, T b) {
  if constexpr (Op == BinaryOp::Add) return a + b;
  else if constexpr (Op == BinaryOp::Sub) return a - b;
  else if constexpr (Op == BinaryOp::Mul) return a * b;
  else if constexpr (Op == BinaryOp::Div) return a / b;
  else return relu_value(a + b);  // AddRelu
}

// Fast path: a, b and out have the same number of elements (same shape up to leading 1s).
template <BinaryOp Op, class T>
__global__ void binary_same_shape_kernel(const T* a, const T* b, T* out, int64_t n) {
  for (int64_t i = grid_start(); i < n; i += grid_step()) out[i] = apply_binary<Op>(a[i], b[i]);
}

template <BinaryOp Op, class T>
__global__ void binary_broadcast_kernel(const T* a, const T* b, T* out, int64_t n, BroadcastIndex ix) {
  for (int64_t i = grid_start(); i < n; i += grid_step()) {
    // Unravel i over out's dims (last dim fastest) and gather the offsets into a and b.
    int64_t rest = i, offset_a = 0, offset_b = 0;
    for (int d = ix.dims - 1; d >= 0; --d) {
      const int64_t coord = rest % ix.size[d];
      rest /= ix.size[d];
      offset_a += coord * ix.stride_a[d];
      offset_b += coord * ix.stride_b[d];
    }
    out[i] = apply_binary<Op>(a[offset_a], b[offset_b]);
  }
}

template <BinaryOp Op, class T>
void launch_binary(const Tensor& a, const Tensor& b, const Tensor& out) {
  const int64_t n = out.numel();
  if (n == 0) return;
  const T* pa = a.data<T>();
  const T* pb = b.data<T>();
  T* po = out.data<T>();
  if (a.numel() == n && b.numel() == n) {
    binary_same_shape_kernel<Op, T><<<blocks_for(n), kThreads, 0, stream()>>>(pa, pb, po, n);
  } else {
    const BroadcastIndex ix = make_broadcast_index(a.shape(), b.shape(), out.shape());
    binary_broadcast_kernel<Op, T><<<blocks_for(n), kThreads, 0, stream()>>>(pa, pb, po, n, ix);
  }
  MDFF_CUDA_CHECK_LAUNCH();
}

template <class T>
void launch_binary(BinaryOp op, const Tensor& a, const Tensor& b, const Tensor& out) {
  switch (op) {
    case BinaryOp::Add: return launch_binary<BinaryOp::Add, T>(a, b, out);
    case BinaryOp::Sub: return launch_binary<BinaryOp::Sub, T>(a, b, out);
    case BinaryOp::Mul: return launch_binary<BinaryOp::Mul, T>(a, b, out);
    case BinaryOp::Div: return launch_binary<BinaryOp::Div, T>(a, b, out);
    case BinaryOp::AddRelu: return launch_binary<BinaryOp::AddRelu, T>(a, b, out);
  }
}

// ---------------------------------------------------------------------------------------------------
// unary and its backward

template <UnaryOp Op, class T>
__device__ inline T apply_unary(T x) {
  if constexpr (Op == UnaryOp::Relu) return relu_value(x);
  else if constexpr (Op == UnaryOp::Tanh) return dev_tanh(x);
  else if constexpr (Op == UnaryOp::Sign) return sign_value(x);
  else if constexpr (Op == UnaryOp::Heaviside) return x > T(0) ? T(1) : T(0);
  else return softplus(x);
}

template <UnaryOp Op, class T>
__global__ void unary_kernel(const T* x, T* out, int64_t n) {
  for (int64_t i = grid_start(); i < n; i += grid_step()) out[i] = apply_unary<Op>(x[i]);
}

template <class T>
void launch_unary(UnaryOp op, const Tensor& x, const Tensor& out) {
  const int64_t n = x.numel();
  if (n == 0) return;
  const T* px = x.data<T>();
  T* po = out.data<T>();
  const int blocks = blocks_for(n);
  switch (op) {
    case UnaryOp::Relu: unary_kernel<UnaryOp::Relu, T><<<blocks, kThreads, 0, stream()>>>(px, po, n); break;
    case UnaryOp::Tanh: unary_kernel<UnaryOp::Tanh, T><<<blocks, kThreads, 0, stream()>>>(px, po, n); break;
    case UnaryOp::Sign: unary_kernel<UnaryOp::Sign, T><<<blocks, kThreads, 0, stream()>>>(px, po, n); break;
    case UnaryOp::Softplus: unary_kernel<UnaryOp::Softplus, T><<<blocks, kThreads, 0, stream()>>>(px, po, n); break;
    case UnaryOp::Heaviside: unary_kernel<UnaryOp::Heaviside, T><<<blocks, kThreads, 0, stream()>>>(px, po, n); break;
  }
  MDFF_CUDA_CHECK_LAUNCH();
}

// grad_x = grad_y * d(out)/dx. `saved` is x for Relu and Softplus and y = tanh(x) for Tanh.
template <UnaryOp Op, class T>
__global__ void unary_backward_kernel(const T* saved, const T* grad_y, T* grad_x, int64_t n) {
  for (int64_t i = grid_start(); i < n; i += grid_step()) {
    const T s = saved[i], g = grad_y[i];
    if constexpr (Op == UnaryOp::Relu) grad_x[i] = s > T(0) ? g : T(0);
    else if constexpr (Op == UnaryOp::Tanh) grad_x[i] = g * (T(1) - s * s);
    else grad_x[i] = g * sigmoid(s);  // Softplus
  }
}

template <UnaryOp Op, class T>
void launch_unary_backward(const Tensor& saved, const Tensor& grad_y, const Tensor& grad_x) {
  check_defined(saved, "cuda unary_backward", Op == UnaryOp::Tanh ? "y" : "x");
  check_same(saved, grad_y, "unary_backward");
  const int64_t n = grad_y.numel();
  if (n == 0) return;
  unary_backward_kernel<Op, T>
      <<<blocks_for(n), kThreads, 0, stream()>>>(saved.data<T>(), grad_y.data<T>(), grad_x.data<T>(), n);
  MDFF_CUDA_CHECK_LAUNCH();
}

template <class T>
void launch_unary_backward(UnaryOp op, const Tensor& x, const Tensor& y, const Tensor& grad_y,
                           const Tensor& grad_x) {
  switch (op) {
    case UnaryOp::Relu: return launch_unary_backward<UnaryOp::Relu, T>(x, grad_y, grad_x);
    case UnaryOp::Tanh: return launch_unary_backward<UnaryOp::Tanh, T>(y, grad_y, grad_x);  // 1 - y^2
    case UnaryOp::Softplus: return launch_unary_backward<UnaryOp::Softplus, T>(x, grad_y, grad_x);
    case UnaryOp::Sign:
    case UnaryOp::Heaviside: return launch_fill<T>(grad_x, 0.0);  // flat almost everywhere
  }
}

// ---------------------------------------------------------------------------------------------------
// sum_to: out = src summed over the dimensions where out has size 1 (or that out lacks)

// src's dimensions split into the kept ones (they index out) and the reduced ones (summed over), each
// with its stride in src. Size-1 dimensions are dropped and neighbours of the same kind merged, so
// (N,C,H,W) -> (1,C,1,1) has kept (C) with stride H*W and reduced (N, H*W) with strides (C*H*W, 1).
struct ReduceIndex {
  int kept_dims = 0;
  int64_t kept_size[kMaxDims];
  int64_t kept_stride[kMaxDims];
  int reduced_dims = 0;
  int64_t reduced_size[kMaxDims];
  int64_t reduced_stride[kMaxDims];
  int64_t reduced_count = 1;    // elements summed into each output
  bool innermost_reduced = false;  // whether src's last (non-1) dimension is summed over
};

ReduceIndex make_reduce_index(const Shape& src, const Shape& out) {
  const std::vector<int64_t> kept_strides = broadcast_strides(out, src, "sum_to");  // 0 = reduced
  ReduceIndex ix;
  int64_t stride = 1;
  bool previous_reduced = false;  // kind of the dimension added last (to the right of this one)
  bool any = false;
  // Walk from the innermost dimension outwards, so that each merge multiplies into the outer size.
  for (int d = static_cast<int>(src.size()) - 1; d >= 0; stride *= src[d], --d) {
    if (src[d] == 1) continue;
    const bool reduced = kept_strides[d] == 0;
    int& dims = reduced ? ix.reduced_dims : ix.kept_dims;
    int64_t* sizes = reduced ? ix.reduced_size : ix.kept_size;
    int64_t* strides = reduced ? ix.reduced_stride : ix.kept_stride;
    if (!any) ix.innermost_reduced = reduced;
    if (any && reduced == previous_reduced) {
      sizes[dims - 1] *= src[d];  // src is contiguous, so same-kind neighbours always merge
    } else {
      MDFF_CHECK(dims < kMaxDims, "cuda sum_to: reducing ", shape_str(src), " to ", shape_str(out),
                 " needs more than ", kMaxDims, " dimensions");
      sizes[dims] = src[d];
      strides[dims] = stride;
      ++dims;
    }
    if (reduced) ix.reduced_count *= src[d];
    previous_reduced = reduced;
    any = true;
  }
  // The walk collected dimensions innermost first; kernels unravel them last-fastest, so flip.
  std::reverse(ix.kept_size, ix.kept_size + ix.kept_dims);
  std::reverse(ix.kept_stride, ix.kept_stride + ix.kept_dims);
  std::reverse(ix.reduced_size, ix.reduced_size + ix.reduced_dims);
  std::reverse(ix.reduced_stride, ix.reduced_stride + ix.reduced_dims);
  return ix;
}

// Offset in src of the i-th element of a row-major walk over (size[0..dims)) with these strides.
__device__ inline int64_t unravel_offset(int64_t i, int dims, const int64_t* size, const int64_t* stride) {
  int64_t offset = 0;
  for (int d = dims - 1; d >= 0; --d) {
    offset += (i % size[d]) * stride[d];
    i /= size[d];
  }
  return offset;
}

// Sums accumulate in double in both precisions, as the CPU twin does: a float sum of a million
// elements would lose digits, and the kernels are limited by memory, not by arithmetic.

// One thread per output element, looping over its reduced elements. Neighbouring threads read
// neighbouring addresses when src's innermost dimension is kept (e.g. (N,D) -> (D)).
template <class T>
__global__ void sum_to_thread_kernel(const T* src, T* out, int64_t n_out, ReduceIndex ix) {
  for (int64_t o = grid_start(); o < n_out; o += grid_step()) {
    const T* base = src + unravel_offset(o, ix.kept_dims, ix.kept_size, ix.kept_stride);
    double sum = 0;
    for (int64_t r = 0; r < ix.reduced_count; ++r)
      sum += base[unravel_offset(r, ix.reduced_dims, ix.reduced_size, ix.reduced_stride)];
    out[o] = static_cast<T>(sum);
  }
}

// One block per output element: its threads stride over the reduced elements (neighbouring threads,
// neighbouring addresses when src's innermost dimension is reduced, e.g. (N,C,H,W) -> (C)), then add
// their partial sums in shared memory.
template <class T>
__global__ void sum_to_block_kernel(const T* src, T* out, int64_t n_out, ReduceIndex ix) {
  __shared__ double partial[kThreads];
  for (int64_t o = blockIdx.x; o < n_out; o += gridDim.x) {
    const T* base = src + unravel_offset(o, ix.kept_dims, ix.kept_size, ix.kept_stride);
    double sum = 0;
    for (int64_t r = threadIdx.x; r < ix.reduced_count; r += blockDim.x)
      sum += base[unravel_offset(r, ix.reduced_dims, ix.reduced_size, ix.reduced_stride)];
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {  // tree: 256 -> 128 -> ... -> 1
      if (static_cast<int>(threadIdx.x) < half) partial[threadIdx.x] += partial[threadIdx.x + half];
      __syncthreads();
    }
    if (threadIdx.x == 0) out[o] = static_cast<T>(partial[0]);
    __syncthreads();  // partial[0] is read before the next output overwrites it
  }
}

template <class T>
void launch_sum_to(const Tensor& src, const Tensor& out) {
  const int64_t n_out = out.numel();
  if (n_out == 0) return;
  const ReduceIndex ix = make_reduce_index(src.shape(), out.shape());
  // A block per output pays off when each output sums many elements that lie next to each other.
  constexpr int64_t kBlockReduceMin = 64;
  if (ix.innermost_reduced && ix.reduced_count >= kBlockReduceMin) {
    const int blocks = static_cast<int>(std::min<int64_t>(n_out, std::max(1, device_info().multiprocessors) * 16));
    sum_to_block_kernel<T><<<blocks, kThreads, 0, stream()>>>(src.data<T>(), out.data<T>(), n_out, ix);
  } else {
    sum_to_thread_kernel<T><<<blocks_for(n_out), kThreads, 0, stream()>>>(src.data<T>(), out.data<T>(), n_out, ix);
  }
  MDFF_CUDA_CHECK_LAUNCH();
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// entry points (kernels.h): check, then dispatch on dtype

void fill(const Tensor& out, double value) {
  switch (out.dtype()) {
    case DType::F32: return launch_fill<float>(out, value);
    case DType::F64: return launch_fill<double>(out, value);
    case DType::I32: return launch_fill<int32_t>(out, value);
  }
}

void cast(const Tensor& src, const Tensor& dst) {
  MDFF_CHECK(src.numel() == dst.numel(), "cuda cast: ", shape_str(src.shape()), " into ", shape_str(dst.shape()));
  if (src.dtype() == dst.dtype()) {
    if (src.nbytes() > 0)
      MDFF_CUDA_CHECK(cudaMemcpyAsync(dst.raw(), src.raw(), src.nbytes(), cudaMemcpyDeviceToDevice, stream()));
    return;
  }
  if (src.dtype() == DType::F32 && dst.dtype() == DType::F64) return launch_cast<float, double>(src, dst);
  if (src.dtype() == DType::F64 && dst.dtype() == DType::F32) return launch_cast<double, float>(src, dst);
  MDFF_FAIL("cuda cast: from ", dtype_name(src.dtype()), " to ", dtype_name(dst.dtype()), " is not supported");
}

void binary(BinaryOp op, const Tensor& a, const Tensor& b, const Tensor& out) {
  check_float(out, "binary");
  MDFF_CHECK(a.dtype() == out.dtype() && b.dtype() == out.dtype(), "cuda binary: dtypes ", dtype_name(a.dtype()),
             ", ", dtype_name(b.dtype()), " and ", dtype_name(out.dtype()), " differ");
  if (out.dtype() == DType::F32) launch_binary<float>(op, a, b, out);
  else launch_binary<double>(op, a, b, out);
}

void scale(const Tensor& x, double alpha, const Tensor& out) {
  check_float(x, "scale");
  check_same(x, out, "scale");
  if (x.dtype() == DType::F32) launch_scale<float>(x, alpha, out);
  else launch_scale<double>(x, alpha, out);
}

void unary(UnaryOp op, const Tensor& x, const Tensor& out) {
  check_float(x, "unary");
  check_same(x, out, "unary");
  if (x.dtype() == DType::F32) launch_unary<float>(op, x, out);
  else launch_unary<double>(op, x, out);
}

void unary_backward(UnaryOp op, const Tensor& x, const Tensor& y, const Tensor& grad_y, const Tensor& grad_x) {
  check_float(grad_y, "unary_backward");
  check_same(grad_y, grad_x, "unary_backward");
  if (grad_y.dtype() == DType::F32) launch_unary_backward<float>(op, x, y, grad_y, grad_x);
  else launch_unary_backward<double>(op, x, y, grad_y, grad_x);
}

void sum_to(const Tensor& src, const Tensor& out) {
  check_float(src, "sum_to");
  MDFF_CHECK(src.dtype() == out.dtype(), "cuda sum_to: dtypes ", dtype_name(src.dtype()), " and ",
             dtype_name(out.dtype()), " differ");
  if (src.dtype() == DType::F32) launch_sum_to<float>(src, out);
  else launch_sum_to<double>(src, out);
}

}  // namespace mdff::cuda
