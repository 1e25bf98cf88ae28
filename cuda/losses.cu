// CUDA kernels for the fused loss ops: pairwise_logistic_forward and _backward, MDFF-SH's pairwise
// likelihood mean(softplus(theta) - s * theta) over an (N,M) matrix of pairs in one pass each way.
// Twins of the CPU kernels in core/cpu_backend.cpp; contracts in core/backend.h. The mean is
// deterministic: each block reduces its share in double into a partial sum of its own, and one block
// adds those partials in a fixed order (no atomics). The backward reads the mean's gradient on the
// device, so nothing waits for the GPU.
#include "cuda/allocator.h"
#include "cuda/check.h"
#include "cuda/device.h"
#include "cuda/kernel_helpers.cuh"
#include "cuda/kernels.h"

namespace mdff::cuda {

namespace {

// partial[block] = the sum over this block's elements of softplus(theta) - s * theta, each element in T
// (as the CPU computes it), the sum in double.
template <class T>
__global__ void pairwise_logistic_partial_kernel(const T* theta, const T* s, int64_t n, double* partial) {
  double sum = 0;
  for (int64_t i = grid_start(); i < n; i += grid_step()) {
    const T x = theta[i];
    sum += static_cast<double>(softplus(x) - s[i] * x);
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

// One block: out = (the partial sums added in a fixed order) / n.
template <class T>
__global__ void pairwise_logistic_finalize_kernel(const double* partial, int blocks, int64_t n, T* out) {
  double sum = 0;
  for (int b = threadIdx.x; b < blocks; b += blockDim.x) sum += partial[b];
  sum = block_sum(sum);
  if (threadIdx.x == 0) *out = static_cast<T>(sum / static_cast<double>(n));
}

// grad_theta = (grad_out / n) * (sigmoid(theta) - s), with grad_out read here, on the device.
template <class T>
__global__ void pairwise_logistic_backward_kernel(const T* theta, const T* s, const T* grad_out, int64_t n,
                                                  T* grad_theta) {
  const T g = static_cast<T>(static_cast<double>(*grad_out) / static_cast<double>(n));  // per element
  for (int64_t i = grid_start(); i < n; i += grid_step()) grad_theta[i] = g * (sigmoid(theta[i]) - s[i]);
}

// theta and `other` are float tensors of one dtype and size; `scalar` a single element of that dtype.
void check_pairs(const Tensor& theta, const Tensor& other, const Tensor& scalar, const char* kernel,
                 const char* other_name, const char* scalar_name) {
  MDFF_CHECK(theta.defined() && is_floating(theta.dtype()), "cuda ", kernel, ": theta needs float32 or float64");
  MDFF_CHECK(other.defined() && other.dtype() == theta.dtype() && other.numel() == theta.numel(), "cuda ", kernel,
             ": ", other_name, " must be ", dtype_name(theta.dtype()), " with ", theta.numel(), " elements like theta ",
             shape_str(theta.shape()));
  MDFF_CHECK(scalar.defined() && scalar.dtype() == theta.dtype() && scalar.numel() == 1, "cuda ", kernel, ": ",
             scalar_name, " must be one ", dtype_name(theta.dtype()), " element");
}

template <class T>
void launch_forward(const Tensor& theta, const Tensor& s, const Tensor& out) {
  const int64_t n = theta.numel();
  const int blocks = blocks_for(n);
  const ScratchBuffer scratch(sizeof(double) * static_cast<size_t>(blocks));  // a partial sum per block
  auto* partial = static_cast<double*>(scratch.data());
  pairwise_logistic_partial_kernel<T><<<blocks, kThreads, 0, stream()>>>(theta.data<T>(), s.data<T>(), n, partial);
  MDFF_CUDA_CHECK_LAUNCH();
  pairwise_logistic_finalize_kernel<T><<<1, kThreads, 0, stream()>>>(partial, blocks, n, out.data<T>());
  MDFF_CUDA_CHECK_LAUNCH();
}

template <class T>
void launch_backward(const Tensor& theta, const Tensor& s, const Tensor& grad_out, const Tensor& grad_theta) {
  const int64_t n = theta.numel();
  pairwise_logistic_backward_kernel<T><<<blocks_for(n), kThreads, 0, stream()>>>(
      theta.data<T>(), s.data<T>(), grad_out.data<T>(), n, grad_theta.data<T>());
  MDFF_CUDA_CHECK_LAUNCH();
}

}  // namespace

void pairwise_logistic_forward(const Tensor& theta, const Tensor& s, const Tensor& out) {
  check_pairs(theta, s, out, "pairwise_logistic_forward", "s", "out");
  MDFF_CHECK(theta.numel() > 0, "cuda pairwise_logistic_forward: the mean of no pairs");
  if (theta.dtype() == DType::F32) launch_forward<float>(theta, s, out);
  else launch_forward<double>(theta, s, out);
}

void pairwise_logistic_backward(const Tensor& theta, const Tensor& s, const Tensor& grad_out,
                                const Tensor& grad_theta) {
  check_pairs(theta, s, grad_out, "pairwise_logistic_backward", "s", "grad_out");
  check_pairs(theta, grad_theta, grad_out, "pairwise_logistic_backward", "grad_theta", "grad_out");
  if (theta.numel() == 0) return;
  if (theta.dtype() == DType::F32) launch_backward<float>(theta, s, grad_out, grad_theta);
  else launch_backward<double>(theta, s, grad_out, grad_theta);
}

}  // namespace mdff::cuda
