// The CUDA backend: mdff::Backend on the GPU. Memory comes from the caching allocator, copies and
// kernels are queued on the one stream of device.h, matrix products go to cuBLAS, convolutions to cuDNN
// (conv.h), and the hand-written kernels live in the .cu files (kernels.h). This class only forwards.
//
// core/backend.cpp reaches this file only through mdff::cuda::get_backend().
#include <cublas_v2.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>

#include "core/backend.h"
#include "core/error.h"
#include "cuda/allocator.h"
#include "cuda/check.h"
#include "cuda/conv.h"
#include "cuda/device.h"
#include "cuda/kernels.h"

namespace mdff::cuda {

namespace {

// Row-major C (M,N) = alpha * op(A) op(B) + beta * C through cuBLAS, which is column-major. A row-major
// matrix read as column-major is its transpose, so cuBLAS computes the transposed problem
//   C^T (N,M) = alpha * op(B)^T op(A)^T + beta * C^T
// on the same memory: B is passed first, A second, and each keeps its own transpose flag.
void cublas_gemm(bool trans_a, bool trans_b, double alpha, const Tensor& a, const Tensor& b, double beta,
                 const Tensor& c) {
  MDFF_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2, "cuda gemm: needs 2-D tensors, got ",
             shape_str(a.shape()), ", ", shape_str(b.shape()), ", ", shape_str(c.shape()));
  MDFF_CHECK(is_floating(c.dtype()) && a.dtype() == c.dtype() && b.dtype() == c.dtype(),
             "cuda gemm: needs one float dtype, got ", dtype_name(a.dtype()), ", ", dtype_name(b.dtype()), ", ",
             dtype_name(c.dtype()));
  const int64_t m = trans_a ? a.size(1) : a.size(0);  // rows of op(A) and C
  const int64_t k = trans_a ? a.size(0) : a.size(1);  // cols of op(A), rows of op(B)
  const int64_t n = trans_b ? b.size(0) : b.size(1);  // cols of op(B) and C
  MDFF_CHECK((trans_b ? b.size(1) : b.size(0)) == k && c.size(0) == m && c.size(1) == n, "cuda gemm: op(A) ",
             m, "x", k, " times op(B) ", (trans_b ? b.size(1) : b.size(0)), "x", n, " into C ",
             shape_str(c.shape()));
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum: C = beta * C (and beta = 0 overwrites whatever C held, as BLAS does)
    if (beta == 0.0) fill(c, 0.0);
    else scale(c, beta, c);
    return;
  }
  MDFF_CHECK(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX, "cuda gemm: dimensions ", m, ", ", n, ", ", k,
             " exceed cuBLAS's 32-bit sizes");
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  const int lda = static_cast<int>(a.size(1)), ldb = static_cast<int>(b.size(1)), ldc = ni;  // row lengths
  const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  cublasHandle_t handle = cublas_handle();
  // TF32 applies to F32 products only; cuBLAS reads the mode at each call, so setting it here follows
  // set_tf32_allowed() at once.
  MDFF_CUBLAS_CHECK(cublasSetMathMode(handle, tf32_allowed() ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
  if (c.dtype() == DType::F32) {
    const float alpha_f = static_cast<float>(alpha), beta_f = static_cast<float>(beta);
    MDFF_CUBLAS_CHECK(cublasSgemm(handle, op_b, op_a, ni, mi, ki, &alpha_f, b.data<float>(), ldb, a.data<float>(),
                                  lda, &beta_f, c.data<float>(), ldc));
  } else {
    MDFF_CUBLAS_CHECK(cublasDgemm(handle, op_b, op_a, ni, mi, ki, &alpha, b.data<double>(), ldb, a.data<double>(),
                                  lda, &beta, c.data<double>(), ldc));
  }
}

// Host-to-device copies without a device synchronisation. A copy from pageable memory may make the driver
// wait for the stream (CUDA's "API synchronization behavior"); a copy from pinned memory does not. So
// each upload is copied by the host into one of kSlots pinned buffers, and the DMA from there is queued
// on the stream with an event after it. A slot is reused only after its event has completed, so the host
// can run kSlots uploads ahead of the GPU (a training step uploads 3 tensors, encoding 1 per batch).
class StagingBuffers {
 public:
  // Up to a batch of 256 images at 224x224 in F32 (154 MB). Each slot grows to the largest upload it has
  // carried: at most kSlots x the image batch of pinned host memory (616 MB at 128 x 224 x 224).
  static constexpr size_t kMaxBytes = size_t(256) << 20;
  void upload(void* dst, const void* host_src, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    Slot& slot = slots_[next_];
    next_ = (next_ + 1) % kSlots;
    if (slot.event) MDFF_CUDA_CHECK(cudaEventSynchronize(slot.event));
    else MDFF_CUDA_CHECK(cudaEventCreateWithFlags(&slot.event, cudaEventDisableTiming));
    if (slot.capacity < bytes) {
      if (slot.host) MDFF_CUDA_CHECK(cudaFreeHost(slot.host));
      slot.host = nullptr;
      slot.capacity = 0;
      MDFF_CUDA_CHECK(cudaMallocHost(&slot.host, bytes));
      slot.capacity = bytes;
    }
    std::memcpy(slot.host, host_src, bytes);
    MDFF_CUDA_CHECK(cudaMemcpyAsync(dst, slot.host, bytes, cudaMemcpyHostToDevice, stream()));
    MDFF_CUDA_CHECK(cudaEventRecord(slot.event, stream()));
  }

 private:
  static constexpr int kSlots = 8;
  struct Slot {
    void* host = nullptr;  // pinned, `capacity` bytes; grown on demand, kept for the process's life
    size_t capacity = 0;
    cudaEvent_t event = nullptr;  // recorded after the slot's last copy
  };
  std::mutex mutex_;
  Slot slots_[kSlots];
  int next_ = 0;
};

class CudaBackend : public Backend {
 public:
  const char* name() const override { return "cuda"; }

  // ---- memory ----
  void* allocate(size_t bytes) override { return cuda::allocate(bytes); }
  void deallocate(void* ptr, size_t bytes) override { cuda::deallocate(ptr, bytes); }

  // Uploads go through pinned staging buffers (below), so they never wait for the device: the host
  // can queue the next training step while the GPU still runs the last one. Downloads wait for the
  // stream, since the host reads the result as soon as they return.
  void copy_from_host(void* dst, const void* host_src, size_t bytes) override {
    if (bytes == 0) return;
    if (bytes <= StagingBuffers::kMaxBytes) return staging_.upload(dst, host_src, bytes);
    // Large one-off copies (a model's parameters, a whole dataset) are not worth pinned memory.
    MDFF_CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, stream()));
    wait_for_stream();
  }
  void copy_to_host(void* host_dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
    MDFF_CUDA_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, stream()));
    wait_for_stream();
    check_device_errors();
  }
  void copy_on_device(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
    MDFF_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream()));
  }
  void synchronize() override {
    wait_for_stream();
    check_device_errors();
  }
  int64_t host_waits() const override { return host_waits_.load(); }
  MemoryStats memory_stats() const override {
    const AllocatorStats a = allocator_stats();
    MemoryStats m;
    m.bytes_in_use = a.bytes_in_use;
    m.peak_bytes_in_use = a.peak_bytes_in_use;
    m.bytes_cached = a.bytes_cached();
    m.peak_bytes_reserved = a.peak_bytes_reserved;
    m.device_malloc_calls = a.segment_allocations;
    return m;
  }
  void reset_peak_memory() override { reset_peak_bytes(); }
  void release_cached_memory() override { empty_cache(); }

  // ---- elementwise and reductions (elementwise.cu) ----
  void fill(const Tensor& out, double value) override { cuda::fill(out, value); }
  void cast(const Tensor& src, const Tensor& dst) override { cuda::cast(src, dst); }
  void binary(BinaryOp op, const Tensor& a, const Tensor& b, const Tensor& out) override {
    cuda::binary(op, a, b, out);
  }
  void scale(const Tensor& x, double alpha, const Tensor& out) override { cuda::scale(x, alpha, out); }
  void unary(UnaryOp op, const Tensor& x, const Tensor& out) override { cuda::unary(op, x, out); }
  void unary_backward(UnaryOp op, const Tensor& x, const Tensor& y, const Tensor& grad_y,
                      const Tensor& grad_x) override {
    cuda::unary_backward(op, x, y, grad_y, grad_x);
  }
  void sum_to(const Tensor& src, const Tensor& out) override { cuda::sum_to(src, out); }

  // ---- matrix products (cuBLAS) ----
  void gemm(bool trans_a, bool trans_b, double alpha, const Tensor& a, const Tensor& b, double beta,
            const Tensor& c) override {
    cublas_gemm(trans_a, trans_b, alpha, a, b, beta, c);
  }
  void count_non_finite(const std::vector<Tensor>& tensors, const Tensor& count) override {
    cuda::count_non_finite(tensors, count);
  }

  // ---- convolution (cuDNN) ----
  void conv2d_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, const Conv2dParams& p,
                      const Tensor& y) override {
    cuda::conv2d_forward(x, weight, bias, p, y);
  }
  void conv2d_backward(const Tensor& x, const Tensor& weight, const Tensor& grad_y, const Conv2dParams& p,
                       const Tensor& grad_x, const Tensor& grad_weight, const Tensor& grad_bias) override {
    cuda::conv2d_backward(x, weight, grad_y, p, grad_x, grad_weight, grad_bias);
  }

  // ---- layers, rows and optimizers (layers.cu) ----
  void batch_norm_forward(const Tensor& x, const Tensor& gamma, const Tensor& beta, const Tensor& running_mean,
                          const Tensor& running_var, bool training, double momentum, double eps, const Tensor& y,
                          const Tensor& save_mean, const Tensor& save_invstd, bool relu) override {
    cuda::batch_norm_forward(x, gamma, beta, running_mean, running_var, training, momentum, eps, y, save_mean,
                             save_invstd, relu);
  }
  void batch_norm_backward(const Tensor& x, const Tensor& gamma, const Tensor& mean, const Tensor& invstd,
                           const Tensor& grad_y, bool training, const Tensor& grad_x, const Tensor& grad_gamma,
                           const Tensor& grad_beta) override {
    cuda::batch_norm_backward(x, gamma, mean, invstd, grad_y, training, grad_x, grad_gamma, grad_beta);
  }
  void max_pool2d_forward(const Tensor& x, const Pool2dParams& p, const Tensor& y, const Tensor& argmax) override {
    cuda::max_pool2d_forward(x, p, y, argmax);
  }
  void max_pool2d_backward(const Tensor& grad_y, const Tensor& argmax, const Tensor& grad_x) override {
    cuda::max_pool2d_backward(grad_y, argmax, grad_x);
  }
  void global_avg_pool_forward(const Tensor& x, const Tensor& y) override { cuda::global_avg_pool_forward(x, y); }
  void global_avg_pool_backward(const Tensor& grad_y, const Tensor& grad_x) override {
    cuda::global_avg_pool_backward(grad_y, grad_x);
  }
  void upsample_nearest_forward(const Tensor& x, const Tensor& y) override { cuda::upsample_nearest_forward(x, y); }
  void upsample_nearest_backward(const Tensor& grad_y, const Tensor& grad_x) override {
    cuda::upsample_nearest_backward(grad_y, grad_x);
  }
  void resize_bilinear(const Tensor& x, const Tensor& y) override { cuda::resize_bilinear(x, y); }
  void copy_block(const Tensor& part, const Tensor& whole, int64_t outer, int64_t part_inner, int64_t whole_inner,
                  int64_t offset, bool into_whole) override {
    cuda::copy_block(part, whole, outer, part_inner, whole_inner, offset, into_whole);
  }
  void log_softmax_forward(const Tensor& x, const Tensor& y) override { cuda::log_softmax_forward(x, y); }
  void log_softmax_backward(const Tensor& y, const Tensor& grad_y, const Tensor& grad_x) override {
    cuda::log_softmax_backward(y, grad_y, grad_x);
  }
  void gather_rows(const Tensor& src, const Tensor& index, const Tensor& out) override {
    cuda::gather_rows(src, index, out);
  }
  void scatter_rows(const Tensor& src, const Tensor& index, const Tensor& dst, bool accumulate) override {
    cuda::scatter_rows(src, index, dst, accumulate);
  }
  void rmsprop_step(const Tensor& params, const std::vector<GradientSlice>& grads, const Tensor& square_avg,
                    double lr, double alpha, double eps, double weight_decay) override {
    cuda::rmsprop_step(params, grads, square_avg, lr, alpha, eps, weight_decay);
  }
  void sgd_step(const Tensor& params, const std::vector<GradientSlice>& grads, const Tensor& buffer, double lr,
                double momentum, double weight_decay, bool first_step) override {
    cuda::sgd_step(params, grads, buffer, lr, momentum, weight_decay, first_step);
  }

  // ---- losses (losses.cu) ----
  void pairwise_logistic_forward(const Tensor& theta, const Tensor& s, const Tensor& out) override {
    cuda::pairwise_logistic_forward(theta, s, out);
  }
  void pairwise_logistic_backward(const Tensor& theta, const Tensor& s, const Tensor& grad_out,
                                  const Tensor& grad_theta) override {
    cuda::pairwise_logistic_backward(theta, s, grad_out, grad_theta);
  }
  void quantization_forward(const Tensor& u, const Tensor& out) override { cuda::quantization_forward(u, out); }
  void quantization_backward(const Tensor& u, const Tensor& grad_out, const Tensor& grad_u) override {
    cuda::quantization_backward(u, grad_out, grad_u);
  }
  void cross_entropy_forward(const Tensor& logits, const Tensor& target, const Tensor& out,
                             const Tensor& log_sum_exp) override {
    cuda::cross_entropy_forward(logits, target, out, log_sum_exp);
  }
  void cross_entropy_backward(const Tensor& logits, const Tensor& target, const Tensor& log_sum_exp,
                              const Tensor& grad_out, const Tensor& grad_logits) override {
    cuda::cross_entropy_backward(logits, target, log_sum_exp, grad_out, grad_logits);
  }

  // ---- binary codes (codes.cu) ----
  void pack_signs(const Tensor& x, const Tensor& codes) override { cuda::pack_signs(x, codes); }
  void hamming_distances(const Tensor& queries, const Tensor& database, const Tensor& distances) override {
    cuda::hamming_distances(queries, database, distances);
  }
  void hamming_top_k(const Tensor& queries, const Tensor& database, int64_t k, const Tensor& indices,
                     const Tensor& distances) override {
    cuda::hamming_top_k(queries, database, k, indices, distances);
  }

 private:
  // The host waits for everything queued on the stream (counted: host_waits()).
  void wait_for_stream() {
    ++host_waits_;
    MDFF_CUDA_CHECK(cudaStreamSynchronize(stream()));
  }
  StagingBuffers staging_;
  std::atomic<int64_t> host_waits_{0};
};

}  // namespace

// The entry point core/backend.cpp calls: the process's CUDA backend, or nullptr with the reason in
// why_not when no usable GPU is present. Never throws.
Backend* get_backend(std::string* why_not) {
  const DeviceInfo& info = device_info();  // detection itself never throws
  if (!info.usable) {
    if (why_not) *why_not = info.why_not;
    return nullptr;
  }
  static CudaBackend* backend = new CudaBackend();  // never destroyed, for the same reason as device_info
  return backend;
}

}  // namespace mdff::cuda
