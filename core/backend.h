// The kernel interface that every device implements: the CPU backend (core/cpu_backend.cpp) and the
// CUDA backend (cuda/cuda_backend.cpp). Ops (core/ops.h) define shapes, autograd and formulas once,
// and call these kernels through backend(device): the one place where dispatch on device happens.
//
// Contracts: every tensor is contiguous and already has its final shape and dtype (ops allocate
// outputs); inputs and outputs share one device; float kernels take F32 or F64. "Writes" means the
// output is assigned; "adds" means the kernel accumulates into it. A kernel that a backend does not
// have throws an mdff::Error naming the kernel and the backend.
#pragma once
#include <cstddef>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace mdff {

struct Conv2dParams {
  int stride = 1;
  int padding = 0;
};

struct Pool2dParams {
  int kernel = 3;
  int stride = 2;
  int padding = 1;
};

// A batch norm in evaluation mode (running statistics), as conv2d_bn_forward applies it.
struct BatchNormEval {
  Tensor gamma, beta, running_mean, running_var;  // (C) each
  double eps = 1e-5;
};

// A device's memory as its allocator sees it. The CPU backend caches nothing: every tensor is a malloc
// (64-byte blocks), freed at once, so its reserved peak is its peak in use and it never has cached bytes.
struct MemoryStats {
  size_t bytes_in_use = 0;       // held by live tensors (rounded to the allocator's block sizes)
  size_t peak_bytes_in_use = 0;  // the most bytes_in_use since the start or the last reset_peak_memory
  size_t bytes_cached = 0;       // freed blocks kept for reuse
  size_t peak_bytes_reserved = 0;   // the most memory held from the driver (in use + cached), same period
  int64_t device_malloc_calls = 0;  // blocks obtained from the driver (cudaMalloc; malloc on the CPU): cache misses
};

// One parameter's gradient for an optimizer step: the parameter is elements [offset, offset + grad.numel())
// of the flat parameter buffer (and of the optimizer's state), grad a tensor of its own, of the buffer's
// dtype and device.
struct GradientSlice {
  Tensor grad;
  int64_t offset = 0;
};

// Throws an mdff::Error naming `kernel` unless `state` matches the flat float `params` in dtype, device and
// size, and every slice's gradient has their dtype and device and lies within their elements. The
// optimizer kernels of every backend call it first.
void check_gradient_slices(const Tensor& params, const std::vector<GradientSlice>& grads, const Tensor& state,
                           const char* kernel);

// AddRelu: max(a + b, 0), the residual join of a bottleneck block in one pass (ops::add_relu).
enum class BinaryOp { Add, Sub, Mul, Div, AddRelu };
// Heaviside: 1 for x > 0, 0 otherwise (the pair similarity from label-overlap counts).
enum class UnaryOp { Relu, Tanh, Sign, Softplus, Heaviside };

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;

  // ---- memory ----
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* ptr, size_t bytes) = 0;
  // Copies `bytes` between host memory and this device (device-to-device when both are on it).
  virtual void copy_from_host(void* dst, const void* host_src, size_t bytes);
  virtual void copy_to_host(void* host_dst, const void* src, size_t bytes);
  virtual void copy_on_device(void* dst, const void* src, size_t bytes);
  virtual void synchronize() {}
  // How many times the host has waited for all the work queued on this device: synchronize(), each copy to
  // the host, an upload too large for the staging buffers (0 on the CPU, where nothing is queued). A
  // training step makes none (the trainer waits at its read-outs only; a test counts). Not counted: an
  // upload waiting for a staging buffer the GPU has not yet read, when the host runs 8 uploads ahead.
  virtual int64_t host_waits() const { return 0; }
  virtual MemoryStats memory_stats() const { return {}; }
  virtual void reset_peak_memory() {}
  // Gives the device's cached free memory back to its driver (nothing to do on the CPU).
  virtual void release_cached_memory() {}

  // ---- elementwise ----
  virtual void fill(const Tensor& out, double value);
  virtual void cast(const Tensor& src, const Tensor& dst);  // F32 <-> F64 (and same-type copies)
  // out = a (op) b with NumPy broadcasting: a and b are viewed at out's shape (size-1 dims repeat).
  virtual void binary(BinaryOp op, const Tensor& a, const Tensor& b, const Tensor& out);
  virtual void scale(const Tensor& x, double alpha, const Tensor& out);  // writes out = alpha * x
  virtual void unary(UnaryOp op, const Tensor& x, const Tensor& out);
  // Writes grad_x from grad_y. Relu uses x (gradient 0 at x <= 0), Tanh uses y, Softplus uses x; Sign and
  // Heaviside write 0.
  virtual void unary_backward(UnaryOp op, const Tensor& x, const Tensor& y, const Tensor& grad_y,
                              const Tensor& grad_x);

  // ---- reductions ----
  // Writes out (a shape that broadcasts to src's) = sum of src over the broadcast dimensions.
  virtual void sum_to(const Tensor& src, const Tensor& out);

  // Adds to count (an I32 scalar, on this device) the number of NaN and infinite elements of all of
  // `tensors` (floating point, one dtype; one kernel launch on the GPU for up to 1,000 chunks of 2^16
  // elements, which covers a whole model's gradients). Adding
  // lets a training loop check every step without waiting for the device; it reads count once in a while
  // (before the count could wrap at 2^31).
  virtual void count_non_finite(const std::vector<Tensor>& tensors, const Tensor& count);

  // ---- matrix products ----
  // C = alpha * op(A) op(B) + beta * C for 2-D tensors; op transposes when trans_* is set.
  virtual void gemm(bool trans_a, bool trans_b, double alpha, const Tensor& a, const Tensor& b, double beta,
                    const Tensor& c);

  // ---- convolution (NCHW, weight (Cout,Cin,kh,kw), bias (Cout) or undefined) ----
  virtual void conv2d_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, const Conv2dParams& p,
                              const Tensor& y);
  // Inference: convolution (no bias), batch norm in evaluation mode, the residual added when defined,
  // ReLU when asked, in one call: y = relu?(bn(conv(x)) + residual). Equal bit for bit to the separate
  // kernels, which the default calls in place on y (no temporary of y's size: batch norm's and the binary
  // kernels must allow their output to be their input); the CPU backend applies the rest while it writes
  // the convolution's output, saving three passes over the activations. Forward only.
  virtual void conv2d_bn_forward(const Tensor& x, const Tensor& weight, const Conv2dParams& p, const BatchNormEval& bn,
                                 const Tensor& residual, bool relu, const Tensor& y);
  // Writes each defined gradient (grad_x, grad_weight, grad_bias).
  virtual void conv2d_backward(const Tensor& x, const Tensor& weight, const Tensor& grad_y, const Conv2dParams& p,
                               const Tensor& grad_x, const Tensor& grad_weight, const Tensor& grad_bias);

  // ---- batch normalisation over (N,H,W) per channel ----
  // training: normalises with batch statistics (biased variance) and updates running_mean /
  // running_var in place as PyTorch does (r <- (1-momentum) r + momentum * batch statistic, with the
  // unbiased variance). Evaluation: normalises with the running statistics, which stay untouched.
  // Both write save_mean and save_invstd (C): the mean and 1/sqrt(var+eps) that were used. relu: y is
  // max(normalised, 0) as it is written (ops::batch_norm2d_relu), equal to a separate ReLU bit for bit.
  virtual void batch_norm_forward(const Tensor& x, const Tensor& gamma, const Tensor& beta,
                                  const Tensor& running_mean, const Tensor& running_var, bool training,
                                  double momentum, double eps, const Tensor& y, const Tensor& save_mean,
                                  const Tensor& save_invstd, bool relu);
  // training = true: mean/invstd are batch statistics and depend on x; false: they are constants.
  virtual void batch_norm_backward(const Tensor& x, const Tensor& gamma, const Tensor& mean, const Tensor& invstd,
                                   const Tensor& grad_y, bool training, const Tensor& grad_x,
                                   const Tensor& grad_gamma, const Tensor& grad_beta);

  // ---- pooling and resizing (NCHW) ----
  // Writes y and argmax (I32, index into the H*W plane of each (n,c)).
  virtual void max_pool2d_forward(const Tensor& x, const Pool2dParams& p, const Tensor& y, const Tensor& argmax);
  virtual void max_pool2d_backward(const Tensor& grad_y, const Tensor& argmax, const Tensor& grad_x);
  virtual void global_avg_pool_forward(const Tensor& x, const Tensor& y);       // (N,C,H,W) -> (N,C)
  virtual void global_avg_pool_backward(const Tensor& grad_y, const Tensor& grad_x);
  // Nearest neighbour as PyTorch's mode='nearest': source index = floor(dst * in / out).
  virtual void upsample_nearest_forward(const Tensor& x, const Tensor& y);
  virtual void upsample_nearest_backward(const Tensor& grad_y, const Tensor& grad_x);  // adds
  // Bilinear as PyTorch's align_corners=False without antialiasing.
  virtual void resize_bilinear(const Tensor& x, const Tensor& y);

  // ---- layout ----
  // Concat and its backward. Views `whole` as (outer, whole_inner) and `part` as (outer, part_inner);
  // the block whole[:, offset : offset + part_inner] is written from part (into_whole) or read into
  // part (!into_whole).
  virtual void copy_block(const Tensor& part, const Tensor& whole, int64_t outer, int64_t part_inner,
                          int64_t whole_inner, int64_t offset, bool into_whole);

  // ---- losses ----
  // The pairwise likelihood of MDFF-SH in one pass: out (0-dim) = the mean over all elements of
  // softplus(theta) - s * theta, softplus in the stable form max(x,0) + log1p(e^-|x|), each element
  // computed in the tensors' dtype and the sum accumulated in double in a fixed order (the same bits on
  // every run). theta and s have one shape.
  virtual void pairwise_logistic_forward(const Tensor& theta, const Tensor& s, const Tensor& out);
  // Writes grad_theta = grad_out * (sigmoid(theta) - s) / numel, with grad_out the 0-dim gradient of the
  // mean, read on this device (a GPU backend does not wait for it). s is a constant: it gets no gradient.
  virtual void pairwise_logistic_backward(const Tensor& theta, const Tensor& s, const Tensor& grad_out,
                                          const Tensor& grad_theta);
  // J2 in one pass: out (0-dim) = the sum over all elements of u (N,L) of (sign(u) - u)^2, divided by N,
  // with sign(0) = +1; each element in u's dtype, the sum in double in a fixed order.
  virtual void quantization_forward(const Tensor& u, const Tensor& out);
  // Writes grad_u = (grad_out / N) * 2 (u - sign(u)), sign(u) a constant; grad_out read on this device.
  virtual void quantization_backward(const Tensor& u, const Tensor& grad_out, const Tensor& grad_u);
  // Cross-entropy against soft targets in one pass: out (0-dim) = (1/N) sum over rows n of
  // sum_k target[n,k] (lse[n] - logits[n,k]), lse[n] the row's log-sum-exp as log_softmax_forward computes
  // it (written to log_sum_exp (N) for backward), each row's sum in double, rows added in a fixed order.
  // logits and target (N,K).
  virtual void cross_entropy_forward(const Tensor& logits, const Tensor& target, const Tensor& out,
                                     const Tensor& log_sum_exp);
  // Writes grad_logits[n,k] = (grad_out / N) (exp(logits[n,k] - lse[n]) sum_j target[n,j] - target[n,k]);
  // target is a constant.
  virtual void cross_entropy_backward(const Tensor& logits, const Tensor& target, const Tensor& log_sum_exp,
                                      const Tensor& grad_out, const Tensor& grad_logits);

  // ---- rows ----
  virtual void log_softmax_forward(const Tensor& x, const Tensor& y);  // over the last dim of (N,K)
  virtual void log_softmax_backward(const Tensor& y, const Tensor& grad_y, const Tensor& grad_x);
  // out[i,:] = src[index[i],:]   (index I32 of shape (M), src (R,D), out (M,D))
  virtual void gather_rows(const Tensor& src, const Tensor& index, const Tensor& out);
  // dst[index[i],:] += src[i,:] when accumulate, else dst[index[i],:] = src[i,:]
  virtual void scatter_rows(const Tensor& src, const Tensor& index, const Tensor& dst, bool accumulate);

  // ---- optimizers, in place (PyTorch's semantics) ----
  // The parameters and the optimizer's state are flat buffers of equal size (P); each gradient is its own
  // tensor (a GradientSlice) over a range of them. Elements outside every slice (parameters that got no
  // gradient) do not change, nor does their state: PyTorch skips a parameter whose .grad is None. One
  // kernel launch on the GPU for up to 1,000 chunks of 2^16 elements (ResNet50-MDFF-SH's gradients make
  // 566). Per element:
  // g = grad + weight_decay * param;  square_avg = alpha * square_avg + (1 - alpha) g^2;
  // param -= lr * g / (sqrt(square_avg) + eps)
  virtual void rmsprop_step(const Tensor& params, const std::vector<GradientSlice>& grads, const Tensor& square_avg,
                            double lr, double alpha, double eps, double weight_decay);
  // g = grad + weight_decay * param;  buffer = first_step ? g : momentum * buffer + g;  param -= lr * buffer
  virtual void sgd_step(const Tensor& params, const std::vector<GradientSlice>& grads, const Tensor& buffer,
                        double lr, double momentum, double weight_decay, bool first_step);

  // ---- binary codes (retrieval) ----
  // codes (N,W) I32 from x (N,D) float, W = ceil(D/32): bit d%32 of word d/32 is set when x[n,d] >= 0
  // (sign(0) = +1, as ops::sign); the unused high bits of the last word are 0.
  virtual void pack_signs(const Tensor& x, const Tensor& codes);
  // distances (Q,N) I32: popcount(query[q] xor database[n]) summed over the W words.
  virtual void hamming_distances(const Tensor& queries, const Tensor& database, const Tensor& distances);
  // The first k (1 <= k <= N) of each query's ranking of the database by Hamming distance, ties by database
  // index: indices and distances (Q,k) I32, row q in ranking order.
  virtual void hamming_top_k(const Tensor& queries, const Tensor& database, int64_t k, const Tensor& indices,
                             const Tensor& distances);

 protected:
  [[noreturn]] void missing(const char* kernel) const;
};

// The backend that runs tensors on `device`. Asking for CUDA in a build without CUDA, or on a machine
// without a usable GPU, throws an mdff::Error that says which. While the profiler is enabled
// (core/profiler.h), it is a ProfilingBackend wrapping that backend.
Backend& backend(Device device);
Backend& backend_of(const Tensor& t);

// True when this thread flushes denormal floats to zero (set for the whole process at start-up; see
// core/cpu_backend.cpp for why).
bool denormals_flushed();

// TF32 tensor-core math for the CUDA backend's convolutions and matrix products (inputs rounded to 10
// mantissa bits, FP32 accumulation; about 1e-3 relative error, several times the speed). On by default,
// as in PyTorch's cuDNN convolutions; train_mdff --precision fp32 turns it off. The CPU ignores it.
void set_tf32_allowed(bool allowed);
bool tf32_allowed();

// True when CUDA tensors can be created here; `why_not` says why not (no build support, no GPU, ...).
bool cuda_available(std::string* why_not = nullptr);

}  // namespace mdff
