// CUDA kernels for the fused loss ops, one pass each way: pairwise_logistic (J1's likelihood
// mean(softplus(theta) - s * theta) over an (N,M) matrix of pairs), quantization (J2: the sum of
// (sign(u) - u)^2 over (N,L) divided by N) and cross_entropy (J3: soft-target cross-entropy over (N,K),
// one warp per row). Twins of the CPU kernels in core/cpu_backend.cpp; contracts in core/backend.h.
// The sums are deterministic: each block (or row) reduces its share in double into a partial sum of
// its own, and one block adds those partials in a fixed order (no atomics). The backward kernels read
// the loss's gradient on the device, so nothing waits for the GPU.
#include "cuda/allocator.h"
#include "cuda/check.h"
#include "cuda/device.h"
#include "cuda/kernel_helpers.cuh"
#include "cuda/kernels.h"

namespace mdff::cuda {

namespace {

// The terms of the fused sums, element i each, computed in T (as the CPU computes them), returned as double.
template <class T>
struct LogisticTerm {  // softplus(theta) - s * theta
  const T* theta;
  const T* s;
  __device__ double operator()(int64_t i) const {
    const T x = theta[i];
    return static_cast<double>(softplus(x) - s[i] * x);
  }
};

template <class T>
struct QuantizationTerm {  // (sign(u) - u)^2
  const T* u;
  __device__ double operator()(int64_t i) const {
    const T d = sign_value(u[i]) - u[i];
    return static_cast<double>(d * d);
  }
};

// partial[block] = the sum of term(i) over this block's share of i < n, in double.
template <class Term>
__global__ void partial_sum_kernel(Term term, int64_t n, double* partial) {
  double sum = 0;
  for (int64_t i = grid_start(); i < n; i += grid_step()) sum += term(i);
  sum = block_sum(sum);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

// One block: out = (the `count` partial sums added in a fixed order) / divisor.
template <class T>
__global__ void finalize_sum_kernel(const double* partial, int64_t count, double divisor, T* out) {
  double sum = 0;
  for (int64_t b = threadIdx.x; b < count; b += blockDim.x) sum += partial[b];
  sum = block_sum(sum);
  if (threadIdx.x == 0) *out = static_cast<T>(sum / divisor);
}

// out (0-dim T) = sum over i < n of term(i), divided by divisor.
template <class T, class Term>
void launch_sum(const Term& term, int64_t n, double divisor, const Tensor& out) {
  const int blocks = blocks_for(n);
  const ScratchBuffer scratch(sizeof(double) * static_cast<size_t>(blocks));  // a partial sum per block
  auto* partial = static_cast<double*>(scratch.data());
  partial_sum_kernel<<<blocks, kThreads, 0, stream()>>>(term, n, partial);
  MDFF_CUDA_CHECK_LAUNCH();
  finalize_sum_kernel<T><<<1, kThreads, 0, stream()>>>(partial, blocks, divisor, out.data<T>());
  MDFF_CUDA_CHECK_LAUNCH();
}

// grad_theta = (grad_out / n) * (sigmoid(theta) - s), with grad_out read here, on the device.
template <class T>
__global__ void pairwise_logistic_backward_kernel(const T* theta, const T* s, const T* grad_out, int64_t n,
                                                  T* grad_theta) {
  const T g = static_cast<T>(static_cast<double>(*grad_out) / static_cast<double>(n));  // per element
  for (int64_t i = grid_start(); i < n; i += grid_step()) grad_theta[i] = g * (sigmoid(theta[i]) - s[i]);
}

// grad_u = (2 grad_out / rows) * (u - sign(u)).
template <class T>
__global__ void quantization_backward_kernel(const T* u, const T* grad_out, int64_t n, int64_t rows, T* grad_u) {
  const T g = static_cast<T>(2.0 * static_cast<double>(*grad_out) / static_cast<double>(rows));
  for (int64_t i = grid_start(); i < n; i += grid_step()) grad_u[i] = g * (u[i] - sign_value(u[i]));
}

// One warp per row r of (rows,k): lse[r] = the row's log-sum-exp, row_loss[r] = sum_j t[r,j] (lse - x[r,j])
// in double.
template <class T>
__global__ void cross_entropy_rows_kernel(const T* x, const T* t, int64_t rows, int64_t k, T* lse, double* row_loss) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t r = grid_start() / kWarp; r < rows; r += grid_step() / kWarp) {
    const T* in = x + r * k;
    const T* target = t + r * k;
    const T log_sum = warp_log_sum_exp(in, k, lane);
    double sum = 0;
    for (int64_t j = lane; j < k; j += kWarp)
      sum += static_cast<double>(target[j]) * static_cast<double>(log_sum - in[j]);
    sum = warp_sum(sum);
    if (lane == 0) {
      lse[r] = log_sum;
      row_loss[r] = sum;
    }
  }
}

// One warp per row: gx[r,j] = (grad_out / rows) (exp(x[r,j] - lse[r]) sum_i t[r,i] - t[r,j]), in double.
template <class T>
__global__ void cross_entropy_backward_kernel(const T* x, const T* t, const T* lse, const T* grad_out, int64_t rows,
                                              int64_t k, T* gx) {
  const int lane = threadIdx.x % kWarp;
  const double g = static_cast<double>(*grad_out) / static_cast<double>(rows);
  for (int64_t r = grid_start() / kWarp; r < rows; r += grid_step() / kWarp) {
    double mass = 0;  // the row's target total (1 for probabilities)
    for (int64_t j = lane; j < k; j += kWarp) mass += t[r * k + j];
    mass = warp_sum(mass);
    for (int64_t j = lane; j < k; j += kWarp) {
      const int64_t i = r * k + j;
      const double softmax = exp(static_cast<double>(x[i] - lse[r]));
      gx[i] = static_cast<T>(g * (softmax * mass - static_cast<double>(t[i])));
    }
  }
}

// ---- checks ----

void check_float(const Tensor& t, const char* kernel, const char* what) {
  MDFF_CHECK(t.defined() && is_floating(t.dtype()), "cuda ", kernel, ": ", what, " needs float32 or float64");
}

// `other` has t's dtype and number of elements.
void check_like(const Tensor& t, const Tensor& other, const char* kernel, const char* what, const char* other_name) {
  MDFF_CHECK(other.defined() && other.dtype() == t.dtype() && other.numel() == t.numel(), "cuda ", kernel, ": ",
             other_name, " must be ", dtype_name(t.dtype()), " with ", t.numel(), " elements like ", what, " ",
             shape_str(t.shape()));
}

// `scalar` is a single element of t's dtype.
void check_scalar(const Tensor& t, const Tensor& scalar, const char* kernel, const char* scalar_name) {
  MDFF_CHECK(scalar.defined() && scalar.dtype() == t.dtype() && scalar.numel() == 1, "cuda ", kernel, ": ",
             scalar_name, " must be one ", dtype_name(t.dtype()), " element");
}

// x is (N,K) float with N, K >= 1; target and grad (when defined) have its dtype and shape; lse is (N).
void check_rows(const Tensor& x, const Tensor& target, const Tensor& lse, const Tensor& grad, const char* kernel) {
  check_float(x, kernel, "logits");
  MDFF_CHECK(x.dim() == 2 && x.numel() >= 1, "cuda ", kernel, ": logits must be (N,K) with N, K >= 1, got ",
             shape_str(x.shape()));
  check_like(x, target, kernel, "logits", "target");
  MDFF_CHECK(lse.defined() && lse.dtype() == x.dtype() && lse.numel() == x.size(0), "cuda ", kernel,
             ": log_sum_exp must be ", dtype_name(x.dtype()), " (", x.size(0), ")");
  if (grad.defined()) check_like(x, grad, kernel, "logits", "grad_logits");
}

template <class Fn>
void dispatch_float(DType dtype, Fn&& fn) {
  if (dtype == DType::F32) fn(float{});
  else fn(double{});
}

}  // namespace

void pairwise_logistic_forward(const Tensor& theta, const Tensor& s, const Tensor& out) {
  const char* kernel = "pairwise_logistic_forward";
  check_float(theta, kernel, "theta");
  check_like(theta, s, kernel, "theta", "s");
  check_scalar(theta, out, kernel, "out");
  MDFF_CHECK(theta.numel() > 0, "cuda ", kernel, ": the mean of no pairs");
  dispatch_float(theta.dtype(), [&](auto zero) {
    using T = decltype(zero);
    launch_sum<T>(LogisticTerm<T>{theta.data<T>(), s.data<T>()}, theta.numel(), static_cast<double>(theta.numel()),
                  out);
  });
}

void pairwise_logistic_backward(const Tensor& theta, const Tensor& s, const Tensor& grad_out,
                                const Tensor& grad_theta) {
  const char* kernel = "pairwise_logistic_backward";
  check_float(theta, kernel, "theta");
  check_like(theta, s, kernel, "theta", "s");
  check_like(theta, grad_theta, kernel, "theta", "grad_theta");
  check_scalar(theta, grad_out, kernel, "grad_out");
  const int64_t n = theta.numel();
  if (n == 0) return;
  dispatch_float(theta.dtype(), [&](auto zero) {
    using T = decltype(zero);
    pairwise_logistic_backward_kernel<T><<<blocks_for(n), kThreads, 0, stream()>>>(
        theta.data<T>(), s.data<T>(), grad_out.data<T>(), n, grad_theta.data<T>());
    MDFF_CUDA_CHECK_LAUNCH();
  });
}

void quantization_forward(const Tensor& u, const Tensor& out) {
  const char* kernel = "quantization_forward";
  check_float(u, kernel, "u");
  check_scalar(u, out, kernel, "out");
  MDFF_CHECK(u.dim() >= 1 && u.size(0) >= 1 && u.numel() > 0, "cuda ", kernel, ": u must be (N,L) with N, L >= 1, got ",
             shape_str(u.shape()));
  dispatch_float(u.dtype(), [&](auto zero) {
    using T = decltype(zero);
    launch_sum<T>(QuantizationTerm<T>{u.data<T>()}, u.numel(), static_cast<double>(u.size(0)), out);
  });
}

void quantization_backward(const Tensor& u, const Tensor& grad_out, const Tensor& grad_u) {
  const char* kernel = "quantization_backward";
  check_float(u, kernel, "u");
  check_like(u, grad_u, kernel, "u", "grad_u");
  check_scalar(u, grad_out, kernel, "grad_out");
  const int64_t n = u.numel();
  if (n == 0) return;
  dispatch_float(u.dtype(), [&](auto zero) {
    using T = decltype(zero);
    quantization_backward_kernel<T><<<blocks_for(n), kThreads, 0, stream()>>>(u.data<T>(), grad_out.data<T>(), n,
                                                                              u.size(0), grad_u.data<T>());
    MDFF_CUDA_CHECK_LAUNCH();
  });
}

void cross_entropy_forward(const Tensor& logits, const Tensor& target, const Tensor& out, const Tensor& log_sum_exp) {
  const char* kernel = "cross_entropy_forward";
  check_rows(logits, target, log_sum_exp, Tensor(), kernel);
  check_scalar(logits, out, kernel, "out");
  const int64_t rows = logits.size(0), k = logits.size(1);
  dispatch_float(logits.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const ScratchBuffer scratch(sizeof(double) * static_cast<size_t>(rows));  // each row's loss
    auto* row_loss = static_cast<double*>(scratch.data());
    cross_entropy_rows_kernel<T><<<blocks_for(rows * kWarp), kThreads, 0, stream()>>>(
        logits.data<T>(), target.data<T>(), rows, k, log_sum_exp.data<T>(), row_loss);
    MDFF_CUDA_CHECK_LAUNCH();
    finalize_sum_kernel<T><<<1, kThreads, 0, stream()>>>(row_loss, rows, static_cast<double>(rows), out.data<T>());
    MDFF_CUDA_CHECK_LAUNCH();
  });
}

void cross_entropy_backward(const Tensor& logits, const Tensor& target, const Tensor& log_sum_exp,
                            const Tensor& grad_out, const Tensor& grad_logits) {
  const char* kernel = "cross_entropy_backward";
  check_rows(logits, target, log_sum_exp, grad_logits, kernel);
  check_scalar(logits, grad_out, kernel, "grad_out");
  const int64_t rows = logits.size(0), k = logits.size(1);
  dispatch_float(logits.dtype(), [&](auto zero) {
    using T = decltype(zero);
    cross_entropy_backward_kernel<T><<<blocks_for(rows * kWarp), kThreads, 0, stream()>>>(
        logits.data<T>(), target.data<T>(), log_sum_exp.data<T>(), grad_out.data<T>(), rows, k,
        grad_logits.data<T>());
    MDFF_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace mdff::cuda
