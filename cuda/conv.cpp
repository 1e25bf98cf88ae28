// Convolutions on the GPU through cuDNN 9's convolution API (see conv.h): forward, backward-data,
// backward-filter and the bias terms, NCHW, for F32 and F64.
//
// Each (shape, dtype, TF32 setting, direction) gets a plan on first use: its cuDNN descriptors and two of the
// algorithms that cudnnFind*AlgorithmEx measures on the real tensors (PyTorch's benchmark mode keeps the fastest),
// within a workspace of at most kMaxWorkspaceBytes: the fastest, and a lean one that needs at most kLeanWorkspaceBytes
// where some algorithm does (core/workspace_policy.h). A call runs the fastest unless its workspace would lift the
// memory in use above the highest level seen at a convolution before: at a training step's peak the lean one runs, so
// that a workspace raises the peak of bytes in use by no more than the lean one's, a few MiB as a rule. (The first
// step, while that level still rises, runs the lean ones; so does a call whose fastest workspace the device cannot
// give.) Passes that record no graph (encoding, evaluation: !grad_enabled()) keep a level of their own: held to the
// training step's, far higher, their forward calls would all run the fastest algorithm, and a workspace would lift
// the encoding's peak by up to the largest fastest one's (at 224x224 batch 32 in FP32, an encoding after training
// steps peaked at 917 MiB, PyTorch's at 854). Plans are cached for the life of the process, so a training step in
// the steady state makes no descriptor calls and no searches. Each call takes its workspace from the caching
// allocator and gives it back once queued, as PyTorch does: a workspace holds memory only while its convolution
// runs (a single block kept at the largest plan's size, the first design, held it through every step's peak).
//
// A 1x1 convolution of stride 1 without padding is a matrix product per image. The plan of each of its
// products also times that product through cuBLAS (strided-batched GEMMs, see gemm_convolution) against
// its fastest cuDNN algorithm, and the calls take cuBLAS when it ran faster (Conv1x1Route in conv.h). cuBLAS's
// GEMMs need no workspace but cuBLAS's own (32 MiB, a block of the caching allocator from the moment the
// handle is made: cuda/device.h).
//
// Shapes: x (N,C,H,W), weight (Cout,C,kh,kw), bias (Cout), y (N,Cout,Ho,Wo) with
// Ho = (H + 2*padding - kh) / stride + 1 (and Wo alike); cross-correlation (no kernel flip), as PyTorch
// and the CPU backend compute it.
#include <cublas_v2.h>
#include <cudnn.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "core/autograd.h"
#include "core/backend.h"
#include "core/error.h"
#include "core/workspace_policy.h"
#include "cuda/allocator.h"
#include "cuda/check.h"
#include "cuda/conv.h"
#include "cuda/device.h"

namespace mdff::cuda {

namespace {

// The most workspace a search lends the algorithms (less when the device has less free memory).
constexpr size_t kMaxWorkspaceBytes = size_t(1) << 30;

cudnnHandle_t cudnn_handle() {
  // Never destroyed, like cublas_handle(): cudnnDestroy during static destruction can run after the CUDA
  // runtime has shut down.
  static cudnnHandle_t handle = [] {
    cudnnHandle_t h = nullptr;
    MDFF_CUDNN_CHECK(cudnnCreate(&h));
    MDFF_CUDNN_CHECK(cudnnSetStream(h, stream()));
    return h;
  }();
  return handle;
}

// Owns one cuDNN descriptor: created in the constructor, destroyed in the destructor.
template <class Handle, cudnnStatus_t (*create)(Handle*), cudnnStatus_t (*destroy)(Handle)>
class Descriptor {
 public:
  Descriptor() { MDFF_CUDNN_CHECK(create(&handle_)); }
  ~Descriptor() { destroy(handle_); }
  Descriptor(const Descriptor&) = delete;
  Descriptor& operator=(const Descriptor&) = delete;
  Handle get() const { return handle_; }

 private:
  Handle handle_ = nullptr;
};
using TensorDescriptor = Descriptor<cudnnTensorDescriptor_t, cudnnCreateTensorDescriptor, cudnnDestroyTensorDescriptor>;
using FilterDescriptor = Descriptor<cudnnFilterDescriptor_t, cudnnCreateFilterDescriptor, cudnnDestroyFilterDescriptor>;
using ConvolutionDescriptor =
    Descriptor<cudnnConvolutionDescriptor_t, cudnnCreateConvolutionDescriptor, cudnnDestroyConvolutionDescriptor>;

cudnnDataType_t cudnn_dtype(DType dtype) { return dtype == DType::F64 ? CUDNN_DATA_DOUBLE : CUDNN_DATA_FLOAT; }

void set_nchw(const TensorDescriptor& desc, DType dtype, int n, int c, int h, int w) {
  MDFF_CUDNN_CHECK(cudnnSetTensor4dDescriptor(desc.get(), CUDNN_TENSOR_NCHW, cudnn_dtype(dtype), n, c, h, w));
}

// alpha and beta: cuDNN reads them as double for double data and as float otherwise.
class Scale {
 public:
  explicit Scale(double value) : as_float_(static_cast<float>(value)), as_double_(value) {}
  const void* of(DType dtype) const {
    return dtype == DType::F64 ? static_cast<const void*>(&as_double_) : static_cast<const void*>(&as_float_);
  }

 private:
  float as_float_;
  double as_double_;
};
const Scale kOne(1.0), kZero(0.0);

enum class Direction { Forward, BackwardData, BackwardFilter };

const char* direction_name(Direction direction) {
  switch (direction) {
    case Direction::Forward: return "forward";
    case Direction::BackwardData: return "backward-data";
    case Direction::BackwardFilter: return "backward-filter";
  }
  return "?";
}

// The geometry of one convolution, every size checked to fit cuDNN's int.
struct ConvShape {
  int n = 0, c = 0, h = 0, w = 0;  // input (N,C,H,W)
  int cout = 0, kh = 0, kw = 0;    // weight (Cout,C,kh,kw)
  int ho = 0, wo = 0;              // output (N,Cout,Ho,Wo), which the others determine
  int stride = 1, padding = 0;
  DType dtype = DType::F32;

  auto key() const { return std::tie(n, c, h, w, cout, kh, kw, stride, padding, dtype); }
  bool operator<(const ConvShape& other) const { return key() < other.key(); }
  // Whether some operand has no elements: then no convolution runs (see the callers).
  bool empty() const { return n == 0 || c == 0 || h == 0 || w == 0 || cout == 0 || kh == 0 || kw == 0; }
};

std::string describe(const ConvShape& s) {
  return ::mdff::detail::concat("input ", shape_str({s.n, s.c, s.h, s.w}), ", weight ",
                                shape_str({s.cout, s.c, s.kh, s.kw}), ", stride ", s.stride, ", padding ", s.padding,
                                ", ", dtype_name(s.dtype));
}

// Checks x, weight and y (the output, or its gradient: `y_name`) against each other and the parameters.
ConvShape conv_shape(const char* op, const Tensor& x, const Tensor& weight, const Tensor& y, const char* y_name,
                     const Conv2dParams& p) {
  check_defined(x, op, "input");
  check_defined(weight, op, "weight");
  check_defined(y, op, y_name);
  MDFF_CHECK(is_floating(x.dtype()), op, ": needs F32 or F64 tensors, got ", dtype_name(x.dtype()));
  for (const Tensor* t : {&weight, &y}) check_same_dtype(x, *t, op);
  for (const Tensor* t : {&x, &weight, &y})
    MDFF_CHECK(t->device() == Device::CUDA, op, ": the cuda backend got a tensor on ", device_name(t->device()));
  MDFF_CHECK(x.dim() == 4 && weight.dim() == 4, op, ": needs input (N,C,H,W) and weight (Cout,C,kh,kw), got ",
             shape_str(x.shape()), " and ", shape_str(weight.shape()));
  MDFF_CHECK(x.size(1) == weight.size(1), op, ": input ", shape_str(x.shape()), " has ", x.size(1),
             " channels but the weight ", shape_str(weight.shape()), " expects ", weight.size(1));
  MDFF_CHECK(p.stride >= 1 && p.padding >= 0, op, ": stride ", p.stride, " and padding ", p.padding,
             " must be >= 1 and >= 0");
  const int64_t padded_h = x.size(2) + 2 * int64_t(p.padding), padded_w = x.size(3) + 2 * int64_t(p.padding);
  MDFF_CHECK(padded_h >= weight.size(2) && padded_w >= weight.size(3), op, ": a ", weight.size(2), "x",
             weight.size(3), " kernel does not fit the input ", shape_str(x.shape()), " padded by ", p.padding);
  const Shape y_shape{x.size(0), weight.size(0), (padded_h - weight.size(2)) / p.stride + 1,
                      (padded_w - weight.size(3)) / p.stride + 1};
  MDFF_CHECK(y.shape() == y_shape, op, ": ", y_name, " of shape ", shape_str(y.shape()), " for input ",
             shape_str(x.shape()), ", weight ", shape_str(weight.shape()), ", stride ", p.stride, " and padding ",
             p.padding, " (expected ", shape_str(y_shape), ")");
  // cuDNN's 4-d descriptors take int sizes and address at most 2^31-1 elements per tensor.
  for (const Tensor* t : {&x, &weight, &y}) {
    const bool fits = t->numel() <= INT32_MAX && *std::max_element(t->shape().begin(), t->shape().end()) <= INT32_MAX;
    MDFF_CHECK(fits, op, ": tensor of shape ", shape_str(t->shape()), " exceeds cuDNN's 32-bit limit for 4-d ",
               "tensors (2^31-1 elements, and each size an int); split the batch");
  }
  ConvShape s;
  s.n = int(x.size(0)), s.c = int(x.size(1)), s.h = int(x.size(2)), s.w = int(x.size(3));
  s.cout = int(weight.size(0)), s.kh = int(weight.size(2)), s.kw = int(weight.size(3));
  s.ho = int(y_shape[2]), s.wo = int(y_shape[3]);
  s.stride = p.stride, s.padding = p.padding;
  s.dtype = x.dtype();
  return s;
}

// A gradient or bias, when defined, must have `expected` shape and the convolution's dtype and device.
void check_operand(const char* op, const char* what, const Tensor& t, const Shape& expected, DType dtype) {
  if (!t.defined()) return;
  MDFF_CHECK(t.shape() == expected, op, ": ", what, " of shape ", shape_str(t.shape()), ", expected ",
             shape_str(expected));
  MDFF_CHECK(t.dtype() == dtype, op, ": ", what, " is ", dtype_name(t.dtype()), " but the convolution is ",
             dtype_name(dtype));
  MDFF_CHECK(t.device() == Device::CUDA, op, ": the cuda backend got ", what, " on ", device_name(t.device()));
}

// The tensor descriptors of one shape, shared by every direction's plan.
struct ShapeDescriptors {
  TensorDescriptor x;     // (N,C,H,W): the input and its gradient
  FilterDescriptor w;     // (Cout,C,kh,kw): the weight and its gradient
  TensorDescriptor y;     // (N,Cout,Ho,Wo): the output and its gradient
  TensorDescriptor bias;  // (1,Cout,1,1): the bias broadcast over y, and its gradient

  explicit ShapeDescriptors(const ConvShape& s) {
    set_nchw(x, s.dtype, s.n, s.c, s.h, s.w);
    MDFF_CUDNN_CHECK(
        cudnnSetFilter4dDescriptor(w.get(), cudnn_dtype(s.dtype), CUDNN_TENSOR_NCHW, s.cout, s.c, s.kh, s.kw));
    set_nchw(y, s.dtype, s.n, s.cout, s.ho, s.wo);
    set_nchw(bias, s.dtype, 1, s.cout, 1, 1);
  }
};

// One algorithm for a plan. The convolution descriptor carries the math type the algorithm was measured
// with, which cuDNN needs at every call with that algorithm.
struct Variant {
  ConvolutionDescriptor conv;
  int algorithm = 0;  // a cudnnConvolution{Fwd,BwdData,BwdFilter}Algo_t, by direction
  size_t workspace_bytes = 0;
};

// One direction's algorithms for one shape, dtype and TF32 setting: the fastest, and the lean one (the same
// algorithm when the fastest is lean); for a 1x1 convolution of stride 1 without padding, also whether
// cuBLAS's GEMMs ran faster than the fastest.
struct Plan {
  Variant fastest, lean;
  bool matrix_product = false;  // is_matrix_product: cuBLAS can run it
  bool timed_on_cublas = false;  // whether cublas_faster has been measured (ConvCache::time_against_cublas)
  bool cublas_faster = false;
};

struct PlanKey {
  ConvShape shape;
  bool tf32 = false;
  Direction direction = Direction::Forward;
  bool operator<(const PlanKey& o) const {
    return std::tie(shape, tf32, direction) < std::tie(o.shape, o.tf32, o.direction);
  }
};

// Math types (cuDNN API reference, cudnn_graph library, cudnnMathType_t): CUDNN_FMA_MATH is "restricted to
// only kernels that use FMA instructions"; CUDNN_DEFAULT_MATH "permits TF32 Tensor Core operation" on
// NVIDIA Ampere and newer (FP32 data), and with it set before cudnnFind the search considers tensor-core and
// FMA kernels both, reporting in each result the math type it ran with. CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION
// may also convert the data down to FP16, which we never accept. So, as PyTorch's cuDNN convolutions do:
// F32 with TF32 allowed searches under CUDNN_DEFAULT_MATH, F32 without it under CUDNN_FMA_MATH (rejecting
// any result that reports tensor-op math, and running the chosen one under CUDNN_FMA_MATH again, whatever
// math type the result reports: FMA-only is then guaranteed by the descriptor, not by the report), F64 under
// CUDNN_DEFAULT_MATH (FP64 has no reduced-precision mode).
cudnnMathType_t search_math_type(DType dtype, bool tf32) {
  return dtype == DType::F32 && !tf32 ? CUDNN_FMA_MATH : CUDNN_DEFAULT_MATH;
}
bool acceptable_math_type(cudnnMathType_t math, DType dtype, bool tf32) {
  if (dtype == DType::F32 && !tf32) return math == CUDNN_FMA_MATH || math == CUDNN_DEFAULT_MATH;
  return math != CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION;
}

// The device memory a search may lend the algorithms: kMaxWorkspaceBytes, or half of the most one request
// could get when that is less: the allocator's largest free block, or the device's free memory plus the
// whole free segments the allocator gives back when the device is full (gaps in segments that hold
// tensors cannot be given back, and may be too small).
size_t workspace_budget() {
  size_t free_bytes = 0, total_bytes = 0;
  MDFF_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  const AllocatorStats cache = allocator_stats();
  const size_t obtainable = std::max(cache.largest_free_block, free_bytes + cache.bytes_in_free_segments);
  return std::min(kMaxWorkspaceBytes, obtainable / 2);
}

// The largest workspace that one of `algorithm_count` algorithms needs within `budget`; `size_of(algo,
// &bytes)` is the direction's cudnnGet*WorkspaceSize, which fails for algorithms that cannot run this shape.
template <class SizeOf>
size_t largest_workspace(int algorithm_count, size_t budget, SizeOf size_of) {
  size_t largest = 0;
  for (int algo = 0; algo < algorithm_count; ++algo) {
    size_t bytes = 0;
    if (size_of(algo, &bytes) == CUDNN_STATUS_SUCCESS && bytes <= budget) largest = std::max(largest, bytes);
  }
  return largest;
}

// The device buffers of one call, in the descriptors' slots: x (N,C,H,W), w (Cout,C,kh,kw) and
// y (N,Cout,Ho,Wo). The direction's output is written: forward writes y, backward-data x (grad_x),
// backward-filter w (grad_weight). A plan's search measures on its first call's buffers and leaves
// arbitrary values in the output, which that call then replaces.
struct ConvBuffers {
  void* x = nullptr;
  void* w = nullptr;
  void* y = nullptr;
};

struct Choice {
  int algorithm = 0;
  cudnnMathType_t math = CUDNN_DEFAULT_MATH;
  size_t workspace_bytes = 0;
};

struct Choices {
  Choice fastest, lean;
};

// Of the results that succeeded, fit the workspace and have an acceptable math type: the fastest and the
// lean one (choose_fastest_and_lean).
template <class Perf>
Choices choose(const std::vector<Perf>& results, int returned, size_t workspace_bytes, bool tf32,
               Direction direction, const ConvShape& s) {
  std::vector<const Perf*> usable;
  std::vector<MeasuredAlgorithm> measured;
  for (int i = 0; i < returned; ++i) {
    const Perf& r = results[i];
    if (r.status != CUDNN_STATUS_SUCCESS || r.memory > workspace_bytes ||
        !acceptable_math_type(r.mathType, s.dtype, tf32))
      continue;
    usable.push_back(&r);
    measured.push_back({r.memory, r.time});
  }
  MDFF_CHECK(!usable.empty(), "cuda conv2d: cuDNN found no usable ", direction_name(direction), " algorithm (",
             returned, " tried) for ", describe(s), ", TF32 ", tf32 ? "on" : "off");
  const AlgorithmPair pair = choose_fastest_and_lean(measured);
  auto choice = [&](int i) {
    return Choice{static_cast<int>(usable[i]->algo), usable[i]->mathType, usable[i]->memory};
  };
  return {choice(pair.fastest), choice(pair.lean)};
}

// Measures the direction's algorithms with cudnnFind*AlgorithmEx and returns the fastest and the lean one.
// `conv` carries the search math type.
Choices search(Direction direction, const ConvShape& s, bool tf32, const ShapeDescriptors& d,
              cudnnConvolutionDescriptor_t conv, const ConvBuffers& buffers) {
  cudnnHandle_t handle = cudnn_handle();
  const size_t budget = workspace_budget();
  int max_count = 0, returned = 0;
  switch (direction) {
    case Direction::Forward: {
      const size_t needed = largest_workspace(CUDNN_CONVOLUTION_FWD_ALGO_COUNT, budget, [&](int algo, size_t* bytes) {
        return cudnnGetConvolutionForwardWorkspaceSize(handle, d.x.get(), d.w.get(), conv, d.y.get(),
                                                       static_cast<cudnnConvolutionFwdAlgo_t>(algo), bytes);
      });
      const ScratchBuffer scratch(needed);  // returned to the allocator after the search
      MDFF_CUDNN_CHECK(cudnnGetConvolutionForwardAlgorithmMaxCount(handle, &max_count));
      std::vector<cudnnConvolutionFwdAlgoPerf_t> results(static_cast<size_t>(max_count));
      MDFF_CUDNN_CHECK(cudnnFindConvolutionForwardAlgorithmEx(handle, d.x.get(), buffers.x, d.w.get(), buffers.w,
                                                              conv, d.y.get(), buffers.y, max_count, &returned,
                                                              results.data(), scratch.data(), scratch.bytes()));
      return choose(results, returned, scratch.bytes(), tf32, direction, s);
    }
    case Direction::BackwardData: {
      const size_t needed =
          largest_workspace(CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, budget, [&](int algo, size_t* bytes) {
            return cudnnGetConvolutionBackwardDataWorkspaceSize(handle, d.w.get(), d.y.get(), conv, d.x.get(),
                                                                static_cast<cudnnConvolutionBwdDataAlgo_t>(algo),
                                                                bytes);
          });
      const ScratchBuffer scratch(needed);  // returned to the allocator after the search
      MDFF_CUDNN_CHECK(cudnnGetConvolutionBackwardDataAlgorithmMaxCount(handle, &max_count));
      std::vector<cudnnConvolutionBwdDataAlgoPerf_t> results(static_cast<size_t>(max_count));
      MDFF_CUDNN_CHECK(cudnnFindConvolutionBackwardDataAlgorithmEx(handle, d.w.get(), buffers.w, d.y.get(),
                                                                   buffers.y, conv, d.x.get(), buffers.x, max_count,
                                                                   &returned, results.data(), scratch.data(),
                                                                   scratch.bytes()));
      return choose(results, returned, scratch.bytes(), tf32, direction, s);
    }
    case Direction::BackwardFilter: {
      const size_t needed =
          largest_workspace(CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, budget, [&](int algo, size_t* bytes) {
            return cudnnGetConvolutionBackwardFilterWorkspaceSize(
                handle, d.x.get(), d.y.get(), conv, d.w.get(), static_cast<cudnnConvolutionBwdFilterAlgo_t>(algo),
                bytes);
          });
      const ScratchBuffer scratch(needed);  // returned to the allocator after the search
      MDFF_CUDNN_CHECK(cudnnGetConvolutionBackwardFilterAlgorithmMaxCount(handle, &max_count));
      std::vector<cudnnConvolutionBwdFilterAlgoPerf_t> results(static_cast<size_t>(max_count));
      MDFF_CUDNN_CHECK(cudnnFindConvolutionBackwardFilterAlgorithmEx(handle, d.x.get(), buffers.x, d.y.get(),
                                                                     buffers.y, conv, d.w.get(), buffers.w,
                                                                     max_count, &returned, results.data(),
                                                                     scratch.data(), scratch.bytes()));
      return choose(results, returned, scratch.bytes(), tf32, direction, s);
    }
  }
  MDFF_FAIL("cuda conv2d: unknown direction");
}

// ---- 1x1 convolutions of stride 1 without padding, as matrix products ----
//
// In NCHW such a convolution is, for each image n, y[n] (Cout, HW) = w (Cout, C) x[n] (C, HW) with HW = H*W;
// backward-data is grad_x[n] = w^T grad_y[n], and backward-filter grad_w = the sum over the images of
// grad_y[n] x[n]^T. cuBLAS is column-major, and a row-major (R, K) matrix is a column-major (K, R) one, so
// each product is computed transposed, on the same memory:
//   y[n]^T (HW, Cout) = x[n]^T (HW, C) w^T (C, Cout)
//   grad_x[n]^T (HW, C) = grad_y[n]^T (HW, Cout) w (Cout, C)
//   grad_w^T (C, Cout) = sum over n of x[n] (C, HW) grad_y[n]^T (HW, Cout)
// In NCHW one image's pixels are not one stride from the next image's, so backward-filter is one GEMM per
// image, each adding to the last: launch-bound on small maps, where the measured route keeps cuDNN.

bool is_matrix_product(const ConvShape& s) { return s.kh == 1 && s.kw == 1 && s.stride == 1 && s.padding == 0; }

// One column-major operand of a strided-batched GEMM: its data, whether it is transposed, its leading
// dimension, and the elements from one batch entry's matrix to the next (0: the same matrix for all).
struct GemmOperand {
  const void* data;
  cublasOperation_t op;
  int ld;
  long long stride;
};

// c[i] (m,n) = op(a[i]) (m,k) op(b[i]) (k,n) + beta c[i] for each i < batch, column-major.
void gemm(DType dtype, int m, int n, int k, const GemmOperand& a, const GemmOperand& b, double beta, void* c,
          int ldc, long long stride_c, int batch) {
  cublasHandle_t handle = cublas_handle();
  if (dtype == DType::F32) {
    const float one = 1.0f, beta_f = static_cast<float>(beta);
    MDFF_CUBLAS_CHECK(cublasSgemmStridedBatched(handle, a.op, b.op, m, n, k, &one, static_cast<const float*>(a.data),
                                                a.ld, a.stride, static_cast<const float*>(b.data), b.ld, b.stride,
                                                &beta_f, static_cast<float*>(c), ldc, stride_c, batch));
  } else {
    const double one = 1.0;
    MDFF_CUBLAS_CHECK(cublasDgemmStridedBatched(handle, a.op, b.op, m, n, k, &one, static_cast<const double*>(a.data),
                                                a.ld, a.stride, static_cast<const double*>(b.data), b.ld, b.stride,
                                                &beta, static_cast<double*>(c), ldc, stride_c, batch));
  }
}

// The direction's product of a 1x1 convolution of stride 1 without padding (is_matrix_product), through
// cuBLAS on `buffers`, TF32 as the plan's key says (cuBLAS reads the handle's math mode at each call).
void gemm_convolution(Direction direction, const ConvShape& s, bool tf32, const ConvBuffers& buffers) {
  MDFF_CUBLAS_CHECK(cublasSetMathMode(cublas_handle(), tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
  const int hw = s.h * s.w;  // within int: conv_shape checked every tensor's element count
  const long long x_image = static_cast<long long>(s.c) * hw, y_image = static_cast<long long>(s.cout) * hw;
  switch (direction) {
    case Direction::Forward:
      gemm(s.dtype, hw, s.cout, s.c, {buffers.x, CUBLAS_OP_N, hw, x_image}, {buffers.w, CUBLAS_OP_N, s.c, 0}, 0.0,
           buffers.y, hw, y_image, s.n);
      return;
    case Direction::BackwardData:
      gemm(s.dtype, hw, s.c, s.cout, {buffers.y, CUBLAS_OP_N, hw, y_image}, {buffers.w, CUBLAS_OP_T, s.c, 0}, 0.0,
           buffers.x, hw, x_image, s.n);
      return;
    case Direction::BackwardFilter: {
      const size_t element = dtype_size(s.dtype);
      const char* x = static_cast<const char*>(buffers.x);
      const char* grad_y = static_cast<const char*>(buffers.y);
      for (int n = 0; n < s.n; ++n)  // beta 0 for the first image: grad_w's old values are never read
        gemm(s.dtype, s.c, s.cout, hw, {x + n * x_image * element, CUBLAS_OP_T, hw, 0},
             {grad_y + n * y_image * element, CUBLAS_OP_N, hw, 0}, n == 0 ? 0.0 : 1.0, buffers.w, s.c, 0, 1);
      return;
    }
  }
}

// Runs one direction of a convolution on `buffers` (ConvBuffers) with cuDNN's algorithm `v`, in `workspace`
// (at least v.workspace_bytes).
void cudnn_convolution(Direction direction, const ConvShape& s, const ShapeDescriptors& d, const Variant& v,
                       const ScratchBuffer& workspace, const ConvBuffers& buffers) {
  cudnnHandle_t handle = cudnn_handle();
  const void* one = kOne.of(s.dtype);
  const void* zero = kZero.of(s.dtype);
  switch (direction) {
    case Direction::Forward:
      MDFF_CUDNN_CHECK(cudnnConvolutionForward(handle, one, d.x.get(), buffers.x, d.w.get(), buffers.w, v.conv.get(),
                                               static_cast<cudnnConvolutionFwdAlgo_t>(v.algorithm), workspace.data(),
                                               v.workspace_bytes, zero, d.y.get(), buffers.y));
      return;
    case Direction::BackwardData:
      MDFF_CUDNN_CHECK(cudnnConvolutionBackwardData(handle, one, d.w.get(), buffers.w, d.y.get(), buffers.y,
                                                    v.conv.get(), static_cast<cudnnConvolutionBwdDataAlgo_t>(v.algorithm),
                                                    workspace.data(), v.workspace_bytes, zero, d.x.get(), buffers.x));
      return;
    case Direction::BackwardFilter:
      MDFF_CUDNN_CHECK(cudnnConvolutionBackwardFilter(handle, one, d.x.get(), buffers.x, d.y.get(), buffers.y,
                                                      v.conv.get(),
                                                      static_cast<cudnnConvolutionBwdFilterAlgo_t>(v.algorithm),
                                                      workspace.data(), v.workspace_bytes, zero, d.w.get(),
                                                      buffers.w));
      return;
  }
}

// Owns a CUDA event that records time.
class TimingEvent {
 public:
  TimingEvent() { MDFF_CUDA_CHECK(cudaEventCreate(&event_)); }
  ~TimingEvent() { cudaEventDestroy(event_); }
  TimingEvent(const TimingEvent&) = delete;
  TimingEvent& operator=(const TimingEvent&) = delete;
  cudaEvent_t get() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
};

// The milliseconds one call of `call` takes on the stream: the median of 5 calls, after one to warm up.
// (The host waits here, as it does in cudnnFind*: only once per plan, at its first call.)
float milliseconds_per_call(const std::function<void()>& call) {
  const TimingEvent start, stop;
  call();
  std::vector<float> times;
  for (int i = 0; i < 5; ++i) {
    MDFF_CUDA_CHECK(cudaEventRecord(start.get(), stream()));
    call();
    MDFF_CUDA_CHECK(cudaEventRecord(stop.get(), stream()));
    MDFF_CUDA_CHECK(cudaEventSynchronize(stop.get()));
    float ms = 0;
    MDFF_CUDA_CHECK(cudaEventElapsedTime(&ms, start.get(), stop.get()));
    times.push_back(ms);
  }
  std::nth_element(times.begin(), times.begin() + 2, times.end());
  return times[2];
}

// The route the process starts with: MDFF_CONV_1X1, else Measured.
Conv1x1Route route_from_environment() {
  const char* value = std::getenv("MDFF_CONV_1X1");
  const std::string route = value ? value : "";
  if (route.empty() || route == "measured") return Conv1x1Route::Measured;
  if (route == "cudnn") return Conv1x1Route::Cudnn;
  if (route == "cublas") return Conv1x1Route::Cublas;
  MDFF_FAIL("MDFF_CONV_1X1=", route, ": expected measured (the default: the faster of cuDNN and cuBLAS), cudnn or "
            "cublas; unset it or choose one of those");
}

// False when MDFF_CONV_LEAN=0: every call then runs its plan's fastest algorithm, as PyTorch's benchmark mode
// does (scripts/gpu_check.sh times the model both ways, to measure what the lean choice costs and saves).
bool lean_allowed() {
  static const bool allowed = !env_equals("MDFF_CONV_LEAN", "0");
  return allowed;
}

// The plans and their descriptors. Every convolution holds the mutex from its look-up to its last queued
// call: the handle and the cache are shared.
class ConvCache {
 public:
  std::mutex mutex;

  const ShapeDescriptors& descriptors(const ConvShape& s) {
    auto it = descriptors_.find(s);
    if (it == descriptors_.end()) it = descriptors_.emplace(s, std::make_unique<ShapeDescriptors>(s)).first;
    return *it->second;
  }

  // The direction's plan, searched (on `buffers`) on first use; a 1x1 stride-1 plan is also timed against
  // cuBLAS at its first call on a route other than Cudnn (on that one, nothing runs on cuBLAS).
  const Plan& plan(Direction direction, const ConvShape& s, bool tf32, const ShapeDescriptors& d,
                   const ConvBuffers& buffers) {
    const PlanKey key{s, tf32, direction};
    auto it = plans_.find(key);
    if (it == plans_.end()) it = plans_.emplace(key, search_plan(direction, s, tf32, d, buffers)).first;
    Plan& found = *it->second;
    if (found.matrix_product && !found.timed_on_cublas && route_ != Conv1x1Route::Cudnn)
      time_against_cublas(found, direction, s, tf32, d, buffers);
    return found;
  }

  // Whether a call of `plan` runs through cuBLAS (the route, and what the plan measured). Such a call takes
  // no cuDNN workspace, but the memory in use at it still counts toward its pass's mark.
  bool runs_cublas(const Plan& plan, Direction direction) {
    if (!plan.matrix_product || route_ == Conv1x1Route::Cudnn) return false;
    if (route_ == Conv1x1Route::Measured && !plan.cublas_faster) return false;
    headroom(direction).observe(bytes_in_use());
    ++cublas_calls_;
    return true;
  }

  // The cuDNN variant a call of `direction` with the memory in use now runs (see the top of this file).
  const Variant& variant(const Plan& plan, Direction direction) {
    const bool fits = headroom(direction).fits(bytes_in_use(), plan.fastest.workspace_bytes);
    if (fits || !lean_allowed() || plan.lean.workspace_bytes >= plan.fastest.workspace_bytes) return plan.fastest;
    ++lean_calls_;
    return plan.lean;
  }

  void reset_memory_mark() { training_ = inference_ = WorkspaceHeadroom(); }
  void count_lean_call() { ++lean_calls_; }

  Conv1x1Route route() const { return route_; }
  void set_route(Conv1x1Route route) { route_ = route; }

  ConvStats stats() const {
    return {static_cast<int64_t>(plans_.size()), searches_, largest_workspace_bytes_, plans_with_lean_variant_,
            lean_calls_, training_.mark(), inference_.mark(), plans_timed_on_cublas_, plans_faster_on_cublas_,
            cublas_calls_};
  }

 private:
  // The mark a call is held to: a forward call in a pass that records no graph has its own (see the top).
  WorkspaceHeadroom& headroom(Direction direction) {
    return direction == Direction::Forward && !grad_enabled() ? inference_ : training_;
  }

  // A new plan: its descriptors and the algorithms cuDNN's search measured on `buffers`.
  std::unique_ptr<Plan> search_plan(Direction direction, const ConvShape& s, bool tf32, const ShapeDescriptors& d,
                                    const ConvBuffers& buffers) {
    auto plan = std::make_unique<Plan>();
    for (const Variant* v : {&plan->fastest, &plan->lean})
      MDFF_CUDNN_CHECK(cudnnSetConvolution2dDescriptor(v->conv.get(), s.padding, s.padding, s.stride, s.stride, 1,
                                                       1, CUDNN_CROSS_CORRELATION, cudnn_dtype(s.dtype)));
    MDFF_CUDNN_CHECK(cudnnSetConvolutionMathType(plan->fastest.conv.get(), search_math_type(s.dtype, tf32)));
    const Choices choices = search(direction, s, tf32, d, plan->fastest.conv.get(), buffers);
    // The math type is part of the algorithm's identity: run with the one it was measured with (FMA-only
    // for F32 without TF32, see search_math_type).
    auto settle = [&](Variant& v, const Choice& choice) {
      MDFF_CUDNN_CHECK(cudnnSetConvolutionMathType(v.conv.get(), s.dtype == DType::F32 && !tf32 ? CUDNN_FMA_MATH
                                                                                                : choice.math));
      v.algorithm = choice.algorithm;
      v.workspace_bytes = choice.workspace_bytes;
    };
    settle(plan->fastest, choices.fastest);
    settle(plan->lean, choices.lean);
    plan->matrix_product = is_matrix_product(s);
    largest_workspace_bytes_ = std::max(largest_workspace_bytes_, choices.fastest.workspace_bytes);
    if (choices.lean.workspace_bytes < choices.fastest.workspace_bytes) ++plans_with_lean_variant_;
    ++searches_;
    return plan;
  }

  // Times the plan's product through cuBLAS and through its fastest cuDNN algorithm, the same way (the median
  // of 5 calls between events, milliseconds_per_call) on `buffers`, and keeps the faster. (cuDNN's search
  // reports its own times, but not how it takes them: a comparison on equal terms times both here.)
  void time_against_cublas(Plan& plan, Direction direction, const ConvShape& s, bool tf32, const ShapeDescriptors& d,
                           const ConvBuffers& buffers) {
    const float cublas_ms = milliseconds_per_call([&] { gemm_convolution(direction, s, tf32, buffers); });
    const ScratchBuffer workspace(plan.fastest.workspace_bytes);  // as the search lent, back after the timing
    const float cudnn_ms =
        milliseconds_per_call([&] { cudnn_convolution(direction, s, d, plan.fastest, workspace, buffers); });
    plan.timed_on_cublas = true;
    plan.cublas_faster = cublas_ms < cudnn_ms;
    ++plans_timed_on_cublas_;
    plans_faster_on_cublas_ += plan.cublas_faster;
  }

  std::map<ConvShape, std::unique_ptr<ShapeDescriptors>> descriptors_;
  std::map<PlanKey, std::unique_ptr<Plan>> plans_;
  int64_t searches_ = 0;
  size_t largest_workspace_bytes_ = 0;
  int64_t plans_with_lean_variant_ = 0, lean_calls_ = 0;
  WorkspaceHeadroom training_, inference_;  // the marks of passes that record a graph and of those that do not
  Conv1x1Route route_ = route_from_environment();
  int64_t plans_timed_on_cublas_ = 0, plans_faster_on_cublas_ = 0, cublas_calls_ = 0;
};

ConvCache& cache() {
  // Never destroyed, like the handle: the descriptors live as long as the process.
  static ConvCache* instance = new ConvCache;
  return *instance;
}

void fill_zero(const Tensor& t) {
  if (t.defined() && t.numel() > 0) MDFF_CUDA_CHECK(cudaMemsetAsync(t.raw(), 0, t.nbytes(), stream()));
}

// y (N,Cout,Ho,Wo) += bias (Cout), broadcast over N, Ho and Wo.
void add_bias(DType dtype, const TensorDescriptor& bias_desc, const Tensor& bias, const TensorDescriptor& y_desc,
              const Tensor& y) {
  MDFF_CUDNN_CHECK(cudnnAddTensor(cudnn_handle(), kOne.of(dtype), bias_desc.get(), bias.raw(), kOne.of(dtype),
                                  y_desc.get(), y.raw()));
}

// grad_bias (Cout) = the sum of grad_y (N,Cout,Ho,Wo) over N, Ho and Wo.
void bias_gradient(DType dtype, const TensorDescriptor& y_desc, const Tensor& grad_y,
                   const TensorDescriptor& bias_desc, const Tensor& grad_bias) {
  MDFF_CUDNN_CHECK(cudnnConvolutionBackwardBias(cudnn_handle(), kOne.of(dtype), y_desc.get(), grad_y.raw(),
                                                kZero.of(dtype), bias_desc.get(), grad_bias.raw()));
}

// Runs one direction of a convolution on `buffers` (ConvBuffers): the plan's cuDNN algorithm, or cuBLAS's
// GEMMs (ConvCache::runs_cublas). The caller holds the cache's mutex.
void convolve(ConvCache& c, Direction direction, const ConvShape& s, bool tf32, const ShapeDescriptors& d,
              const ConvBuffers& buffers) {
  const Plan& plan = c.plan(direction, s, tf32, d, buffers);
  if (c.runs_cublas(plan, direction)) {
    gemm_convolution(direction, s, tf32, buffers);
    return;
  }
  const Variant* v = &c.variant(plan, direction);
  std::optional<ScratchBuffer> workspace;  // back to the allocator once the call is queued
  try {
    workspace.emplace(v->workspace_bytes);
  } catch (const OutOfMemory&) {
    // The device cannot give the fastest algorithm's workspace even after the cache is released: the lean
    // one's (a few MiB as a rule) may still fit, as PyTorch tries its next algorithm. Counted as a lean call.
    if (plan.lean.workspace_bytes >= v->workspace_bytes) throw;
    v = &plan.lean;
    workspace.emplace(v->workspace_bytes);
    c.count_lean_call();
  }
  cudnn_convolution(direction, s, d, *v, *workspace, buffers);
}

// The output side's descriptors for a shape that cuDNN cannot convolve (an operand without elements) but whose
// bias terms still apply.
struct BiasDescriptors {
  TensorDescriptor y, bias;
  explicit BiasDescriptors(const ConvShape& s) {
    set_nchw(y, s.dtype, s.n, s.cout, s.ho, s.wo);
    set_nchw(bias, s.dtype, 1, s.cout, 1, 1);
  }
};

}  // namespace

void conv2d_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, const Conv2dParams& p,
                    const Tensor& y) {
  const char* op = "cuda conv2d_forward";
  const ConvShape s = conv_shape(op, x, weight, y, "output", p);
  check_operand(op, "bias", bias, {s.cout}, s.dtype);
  if (y.numel() == 0) return;
  const bool tf32 = s.dtype == DType::F32 && tf32_allowed();
  ConvCache& c = cache();
  const std::lock_guard<std::mutex> lock(c.mutex);
  if (s.empty()) {  // no input channels or taps (or an empty input with padding): y = bias, or 0
    fill_zero(y);
    if (bias.defined()) {
      const BiasDescriptors d(s);
      add_bias(s.dtype, d.bias, bias, d.y, y);
    }
    return;
  }
  const ShapeDescriptors& d = c.descriptors(s);
  convolve(c, Direction::Forward, s, tf32, d, {x.raw(), weight.raw(), y.raw()});
  if (bias.defined()) add_bias(s.dtype, d.bias, bias, d.y, y);
}

void conv2d_backward(const Tensor& x, const Tensor& weight, const Tensor& grad_y, const Conv2dParams& p,
                     const Tensor& grad_x, const Tensor& grad_weight, const Tensor& grad_bias) {
  const char* op = "cuda conv2d_backward";
  const ConvShape s = conv_shape(op, x, weight, grad_y, "grad_y", p);
  check_operand(op, "grad_x", grad_x, x.shape(), s.dtype);
  check_operand(op, "grad_weight", grad_weight, weight.shape(), s.dtype);
  check_operand(op, "grad_bias", grad_bias, {s.cout}, s.dtype);
  const bool tf32 = s.dtype == DType::F32 && tf32_allowed();
  ConvCache& c = cache();
  const std::lock_guard<std::mutex> lock(c.mutex);
  if (s.empty()) {  // the convolution contributes nothing: grad_x = 0, grad_weight = 0; grad_bias sums grad_y
    fill_zero(grad_x);
    fill_zero(grad_weight);
    if (grad_bias.defined() && grad_y.numel() > 0) {
      const BiasDescriptors d(s);
      bias_gradient(s.dtype, d.y, grad_y, d.bias, grad_bias);
    } else {
      fill_zero(grad_bias);
    }
    return;
  }
  const ShapeDescriptors& d = c.descriptors(s);
  if (grad_x.defined()) convolve(c, Direction::BackwardData, s, tf32, d, {grad_x.raw(), weight.raw(), grad_y.raw()});
  if (grad_weight.defined())
    convolve(c, Direction::BackwardFilter, s, tf32, d, {x.raw(), grad_weight.raw(), grad_y.raw()});
  if (grad_bias.defined()) bias_gradient(s.dtype, d.y, grad_y, d.bias, grad_bias);
}

void reset_conv_memory_mark() {
  ConvCache& c = cache();
  const std::lock_guard<std::mutex> lock(c.mutex);
  c.reset_memory_mark();
}

void set_conv1x1_route(Conv1x1Route route) {
  ConvCache& c = cache();
  const std::lock_guard<std::mutex> lock(c.mutex);
  c.set_route(route);
}

Conv1x1Route conv1x1_route() {
  ConvCache& c = cache();
  const std::lock_guard<std::mutex> lock(c.mutex);
  return c.route();
}

ConvStats conv_stats() {
  ConvCache& c = cache();
  const std::lock_guard<std::mutex> lock(c.mutex);
  return c.stats();
}

}  // namespace mdff::cuda
