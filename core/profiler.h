// Per-kernel profiler: where the time of a training step goes, kernel by kernel and shape by shape.
//
// ProfilingBackend is a Backend decorator: it wraps a device's real backend, forwards every call to
// it, and times each kernel with std::chrono::steady_clock. backend(device) (core/backend.h) returns
// the wrapper instead of the real backend while profiling is enabled, so every op is seen without
// touching the ops; disabled, the cost is one bool check per dispatch. Memory calls (allocate,
// deallocate, copies, synchronize) are forwarded untimed.
//
// On the GPU a kernel has only been queued when its call returns, so the wrapper calls the wrapped
// backend's synchronize() before starting the clock (earlier queued work is not charged to this
// kernel) and before stopping it: GPU times are honest, at the price of serialising host and device
// while profiling. On the CPU synchronize() does nothing.
//
// Each record is keyed by the kernel (the Backend method's name) and a short signature of its
// shapes, e.g. "conv2d_forward" "x(32,64,8,8) w(64,64,3,3) s1p1", "gemm" "m=32 n=1024 k=2048 NT",
// "batch_norm_forward" "(32,256,8,8) train" (float64 calls are marked "float64"), and accumulates
// calls, seconds, FLOPs for the compute kernels (2 x multiply-adds of convolutions and matrix
// products; bias additions not counted) and, for every other kernel, bytes: the sizes of its input
// tensors plus those of its output tensors (a tensor updated in place counts as both).
//
// MDFF_PROFILE=1 in the environment turns profiling on at start-up and prints table() to stderr
// when the process exits.
#pragma once
#include <nlohmann/json_fwd.hpp>

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "core/backend.h"

namespace mdff {

class ProfilingBackend final : public Backend {
 public:
  explicit ProfilingBackend(Backend& wrapped) : wrapped_(wrapped) {}
  const char* name() const override { return wrapped_.name(); }

  void* allocate(size_t bytes) override { return wrapped_.allocate(bytes); }
  void deallocate(void* ptr, size_t bytes) override { wrapped_.deallocate(ptr, bytes); }
  void copy_from_host(void* dst, const void* host_src, size_t bytes) override {
    wrapped_.copy_from_host(dst, host_src, bytes);
  }
  void copy_to_host(void* host_dst, const void* src, size_t bytes) override {
    wrapped_.copy_to_host(host_dst, src, bytes);
  }
  void copy_on_device(void* dst, const void* src, size_t bytes) override { wrapped_.copy_on_device(dst, src, bytes); }
  void synchronize() override { wrapped_.synchronize(); }
  int64_t host_waits() const override { return wrapped_.host_waits(); }
  MemoryStats memory_stats() const override { return wrapped_.memory_stats(); }
  void reset_peak_memory() override { wrapped_.reset_peak_memory(); }
  void release_cached_memory() override { wrapped_.release_cached_memory(); }

  void fill(const Tensor& out, double value) override;
  void cast(const Tensor& src, const Tensor& dst) override;
  void binary(BinaryOp op, const Tensor& a, const Tensor& b, const Tensor& out) override;
  void scale(const Tensor& x, double alpha, const Tensor& out) override;
  void unary(UnaryOp op, const Tensor& x, const Tensor& out) override;
  void unary_backward(UnaryOp op, const Tensor& x, const Tensor& y, const Tensor& grad_y,
                      const Tensor& grad_x) override;
  void sum_to(const Tensor& src, const Tensor& out) override;
  void count_non_finite(const std::vector<Tensor>& tensors, const Tensor& count) override;
  void gemm(bool trans_a, bool trans_b, double alpha, const Tensor& a, const Tensor& b, double beta,
            const Tensor& c) override;
  void conv2d_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, const Conv2dParams& p,
                      const Tensor& y) override;
  void conv2d_bn_forward(const Tensor& x, const Tensor& weight, const Conv2dParams& p, const BatchNormEval& bn,
                         const Tensor& residual, bool relu, const Tensor& y) override;
  void conv2d_backward(const Tensor& x, const Tensor& weight, const Tensor& grad_y, const Conv2dParams& p,
                       const Tensor& grad_x, const Tensor& grad_weight, const Tensor& grad_bias) override;
  void batch_norm_forward(const Tensor& x, const Tensor& gamma, const Tensor& beta, const Tensor& running_mean,
                          const Tensor& running_var, bool training, double momentum, double eps, const Tensor& y,
                          const Tensor& save_mean, const Tensor& save_invstd, bool relu) override;
  void batch_norm_backward(const Tensor& x, const Tensor& gamma, const Tensor& mean, const Tensor& invstd,
                           const Tensor& grad_y, bool training, const Tensor& grad_x, const Tensor& grad_gamma,
                           const Tensor& grad_beta) override;
  void max_pool2d_forward(const Tensor& x, const Pool2dParams& p, const Tensor& y, const Tensor& argmax) override;
  void max_pool2d_backward(const Tensor& grad_y, const Tensor& argmax, const Tensor& grad_x) override;
  void global_avg_pool_forward(const Tensor& x, const Tensor& y) override;
  void global_avg_pool_backward(const Tensor& grad_y, const Tensor& grad_x) override;
  void upsample_nearest_forward(const Tensor& x, const Tensor& y) override;
  void upsample_nearest_backward(const Tensor& grad_y, const Tensor& grad_x) override;
  void resize_bilinear(const Tensor& x, const Tensor& y) override;
  void copy_block(const Tensor& part, const Tensor& whole, int64_t outer, int64_t part_inner, int64_t whole_inner,
                  int64_t offset, bool into_whole) override;
  void pairwise_logistic_forward(const Tensor& theta, const Tensor& s, const Tensor& out) override;
  void pairwise_logistic_backward(const Tensor& theta, const Tensor& s, const Tensor& grad_out,
                                  const Tensor& grad_theta) override;
  void quantization_forward(const Tensor& u, const Tensor& out) override;
  void quantization_backward(const Tensor& u, const Tensor& grad_out, const Tensor& grad_u) override;
  void cross_entropy_forward(const Tensor& logits, const Tensor& target, const Tensor& out,
                             const Tensor& log_sum_exp) override;
  void cross_entropy_backward(const Tensor& logits, const Tensor& target, const Tensor& log_sum_exp,
                              const Tensor& grad_out, const Tensor& grad_logits) override;
  void log_softmax_forward(const Tensor& x, const Tensor& y) override;
  void log_softmax_backward(const Tensor& y, const Tensor& grad_y, const Tensor& grad_x) override;
  void gather_rows(const Tensor& src, const Tensor& index, const Tensor& out) override;
  void scatter_rows(const Tensor& src, const Tensor& index, const Tensor& dst, bool accumulate) override;
  void rmsprop_step(const Tensor& params, const std::vector<GradientSlice>& grads, const Tensor& square_avg,
                    double lr, double alpha, double eps, double weight_decay) override;
  void sgd_step(const Tensor& params, const std::vector<GradientSlice>& grads, const Tensor& buffer, double lr,
                double momentum, double weight_decay, bool first_step) override;
  void pack_signs(const Tensor& x, const Tensor& codes) override;
  void hamming_distances(const Tensor& queries, const Tensor& database, const Tensor& distances) override;
  void hamming_top_k(const Tensor& queries, const Tensor& database, int64_t k, const Tensor& indices,
                     const Tensor& distances) override;

 private:
  Backend& wrapped_;
};

namespace profiler {

namespace detail {
extern std::atomic<bool> enabled_flag;  // read on every dispatch: keep it a plain load
}

// Turns recording on or off (records are kept; reset() clears them). Thread-safe.
void enable(bool on);
inline bool enabled() { return detail::enabled_flag.load(std::memory_order_relaxed); }
void reset();

struct Entry {
  std::string kernel, signature;
  int64_t calls = 0;
  double seconds = 0, flops = 0, bytes = 0;  // totals over the calls; flops or bytes 0 where not counted
};

// Every record, the slowest (most total seconds) first.
std::vector<Entry> entries();

// A fixed-width table of the slowest max_rows entries: kernel, signature, calls, total ms, share of
// total_seconds (of the recorded kernel time when 0), GFLOP/s and GB/s where counted.
std::string table(double total_seconds = 0, size_t max_rows = 40);

// {"total_seconds": ..., "entries": [{"kernel", "signature", "calls", "seconds", "flops", "bytes"}, ...]}
nlohmann::json to_json();

}  // namespace profiler
}  // namespace mdff
