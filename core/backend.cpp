// Device dispatch (the only place that chooses a backend, and where the profiler wraps it) and the
// base-class defaults, which name the kernel a backend lacks instead of failing silently.
#include "core/backend.h"

#include <atomic>
#include <string>

#include "core/error.h"
#include "core/profiler.h"

namespace mdff {

Backend& cpu_backend();  // core/cpu_backend.cpp

#ifdef MDFF_WITH_CUDA
namespace cuda {
Backend* get_backend(std::string* why_not);  // cuda/cuda_backend.cpp; nullptr when no GPU is usable
}
#endif

bool cuda_available(std::string* why_not) {
#ifdef MDFF_WITH_CUDA
  return cuda::get_backend(why_not) != nullptr;
#else
  if (why_not) *why_not = "mdff was built without CUDA (configure with -DMDFF_CUDA=ON on a machine with nvcc and cuDNN)";
  return false;
#endif
}

namespace {
Backend& device_backend(Device device) {
  if (device == Device::CPU) return cpu_backend();
  std::string why_not;
#ifdef MDFF_WITH_CUDA
  if (Backend* cuda_backend = cuda::get_backend(&why_not)) return *cuda_backend;
#else
  cuda_available(&why_not);
#endif
  MDFF_FAIL("a CUDA tensor was requested but CUDA is not usable: ", why_not, ". Use --device cpu");
}
}  // namespace

Backend& backend(Device device) {
  Backend& real = device_backend(device);
  if (!profiler::enabled()) return real;
  // One wrapper per device, made on first use and never destroyed: tensors freed while the process
  // exits still deallocate through it.
  if (device == Device::CPU) {
    static ProfilingBackend* cpu = new ProfilingBackend(real);
    return *cpu;
  }
  static ProfilingBackend* cuda = new ProfilingBackend(real);
  return *cuda;
}

Backend& backend_of(const Tensor& t) { return backend(t.device()); }

void check_gradient_slices(const Tensor& params, const std::vector<GradientSlice>& grads, const Tensor& state,
                           const char* kernel) {
  MDFF_CHECK(params.defined() && is_floating(params.dtype()), kernel, ": the parameters must be a float tensor");
  MDFF_CHECK(state.defined() && state.dtype() == params.dtype() && state.device() == params.device() &&
                 state.numel() == params.numel(),
             kernel, ": the optimizer's state must be ", dtype_name(params.dtype()), " on ",
             device_name(params.device()), " with ", params.numel(), " elements, like the parameters");
  for (const GradientSlice& slice : grads) {
    MDFF_CHECK(slice.grad.defined() && slice.grad.dtype() == params.dtype() &&
                   slice.grad.device() == params.device() && slice.offset >= 0 &&
                   slice.offset <= params.numel() - slice.grad.numel(),
               kernel, ": a gradient (", slice.grad.defined() ? dtype_name(slice.grad.dtype()) : "undefined", ", ",
               slice.grad.defined() ? slice.grad.numel() : 0, " elements at offset ", slice.offset,
               ") does not fit the ", params.numel(), " ", dtype_name(params.dtype()), " parameters on ",
               device_name(params.device()));
  }
}

void Backend::missing(const char* kernel) const {
  MDFF_FAIL("kernel '", kernel, "' is not implemented on the ", name(), " backend");
}

void Backend::copy_from_host(void*, const void*, size_t) { missing("copy_from_host"); }
void Backend::copy_to_host(void*, const void*, size_t) { missing("copy_to_host"); }
void Backend::copy_on_device(void*, const void*, size_t) { missing("copy_on_device"); }
void Backend::fill(const Tensor&, double) { missing("fill"); }
void Backend::cast(const Tensor&, const Tensor&) { missing("cast"); }
void Backend::binary(BinaryOp, const Tensor&, const Tensor&, const Tensor&) { missing("binary"); }
void Backend::scale(const Tensor&, double, const Tensor&) { missing("scale"); }
void Backend::unary(UnaryOp, const Tensor&, const Tensor&) { missing("unary"); }
void Backend::unary_backward(UnaryOp, const Tensor&, const Tensor&, const Tensor&, const Tensor&) {
  missing("unary_backward");
}
void Backend::sum_to(const Tensor&, const Tensor&) { missing("sum_to"); }
void Backend::count_non_finite(const std::vector<Tensor>&, const Tensor&) { missing("count_non_finite"); }
void Backend::gemm(bool, bool, double, const Tensor&, const Tensor&, double, const Tensor&) { missing("gemm"); }
void Backend::conv2d_forward(const Tensor&, const Tensor&, const Tensor&, const Conv2dParams&, const Tensor&) {
  missing("conv2d_forward");
}
// The separate kernels, in the order the ops call them.
void Backend::conv2d_bn_forward(const Tensor& x, const Tensor& weight, const Conv2dParams& p, const BatchNormEval& bn,
                                const Tensor& residual, bool relu, const Tensor& y) {
  // All in y, no temporary of y's size: the convolution writes y, batch norm (evaluation: running
  // statistics, an elementwise pass) and the residual add run in place on it.
  conv2d_forward(x, weight, Tensor(), p, y);
  const Shape channels{y.size(1)};
  const Tensor mean = Tensor::empty(channels, y.dtype(), y.device()), invstd = Tensor::empty(channels, y.dtype(), y.device());
  const bool relu_in_batch_norm = relu && !residual.defined();
  batch_norm_forward(y, bn.gamma, bn.beta, bn.running_mean, bn.running_var, false, 0.0, bn.eps, y, mean, invstd,
                     relu_in_batch_norm);
  if (residual.defined()) binary(relu ? BinaryOp::AddRelu : BinaryOp::Add, y, residual, y);
}
void Backend::conv2d_backward(const Tensor&, const Tensor&, const Tensor&, const Conv2dParams&, const Tensor&,
                              const Tensor&, const Tensor&) {
  missing("conv2d_backward");
}
void Backend::batch_norm_forward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool,
                                 double, double, const Tensor&, const Tensor&, const Tensor&, bool) {
  missing("batch_norm_forward");
}
void Backend::batch_norm_backward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool,
                                  const Tensor&, const Tensor&, const Tensor&) {
  missing("batch_norm_backward");
}
void Backend::max_pool2d_forward(const Tensor&, const Pool2dParams&, const Tensor&, const Tensor&) {
  missing("max_pool2d_forward");
}
void Backend::max_pool2d_backward(const Tensor&, const Tensor&, const Tensor&) { missing("max_pool2d_backward"); }
void Backend::global_avg_pool_forward(const Tensor&, const Tensor&) { missing("global_avg_pool_forward"); }
void Backend::global_avg_pool_backward(const Tensor&, const Tensor&) { missing("global_avg_pool_backward"); }
void Backend::upsample_nearest_forward(const Tensor&, const Tensor&) { missing("upsample_nearest_forward"); }
void Backend::upsample_nearest_backward(const Tensor&, const Tensor&) { missing("upsample_nearest_backward"); }
void Backend::resize_bilinear(const Tensor&, const Tensor&) { missing("resize_bilinear"); }
void Backend::copy_block(const Tensor&, const Tensor&, int64_t, int64_t, int64_t, int64_t, bool) {
  missing("copy_block");
}
void Backend::pairwise_logistic_forward(const Tensor&, const Tensor&, const Tensor&) {
  missing("pairwise_logistic_forward");
}
void Backend::pairwise_logistic_backward(const Tensor&, const Tensor&, const Tensor&, const Tensor&) {
  missing("pairwise_logistic_backward");
}
void Backend::quantization_forward(const Tensor&, const Tensor&) { missing("quantization_forward"); }
void Backend::quantization_backward(const Tensor&, const Tensor&, const Tensor&) { missing("quantization_backward"); }
void Backend::cross_entropy_forward(const Tensor&, const Tensor&, const Tensor&, const Tensor&) {
  missing("cross_entropy_forward");
}
void Backend::cross_entropy_backward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&) {
  missing("cross_entropy_backward");
}
void Backend::log_softmax_forward(const Tensor&, const Tensor&) { missing("log_softmax_forward"); }
void Backend::log_softmax_backward(const Tensor&, const Tensor&, const Tensor&) { missing("log_softmax_backward"); }
void Backend::gather_rows(const Tensor&, const Tensor&, const Tensor&) { missing("gather_rows"); }
void Backend::scatter_rows(const Tensor&, const Tensor&, const Tensor&, bool) { missing("scatter_rows"); }
void Backend::rmsprop_step(const Tensor&, const std::vector<GradientSlice>&, const Tensor&, double, double, double,
                           double) {
  missing("rmsprop_step");
}
void Backend::sgd_step(const Tensor&, const std::vector<GradientSlice>&, const Tensor&, double, double, double, bool) {
  missing("sgd_step");
}
void Backend::pack_signs(const Tensor&, const Tensor&) { missing("pack_signs"); }
void Backend::hamming_distances(const Tensor&, const Tensor&, const Tensor&) { missing("hamming_distances"); }
void Backend::hamming_top_k(const Tensor&, const Tensor&, int64_t, const Tensor&, const Tensor&) {
  missing("hamming_top_k");
}

namespace {
std::atomic<bool> tf32{true};
}
void set_tf32_allowed(bool allowed) { tf32 = allowed; }
bool tf32_allowed() { return tf32; }

}  // namespace mdff
