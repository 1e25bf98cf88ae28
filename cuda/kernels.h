// The hand-written CUDA kernels, one function per Backend method (core/backend.h documents each
// contract; the CPU twin in core/ is the reference). Each function checks dtypes and shapes, picks the
// kernel for the dtype and queues it on stream(). The elementwise family is defined in elementwise.cu,
// the network layers, rows and optimizers in layers.cu, the binary-code kernels in codes.cu, the fused
// losses in losses.cu; the convolutions (cuDNN) have their own header, conv.h.
#pragma once
#include "core/backend.h"

namespace mdff::cuda {

void fill(const Tensor& out, double value);  // F32, F64 and I32
void cast(const Tensor& src, const Tensor& dst);  // F32 <-> F64, or a copy when the dtypes match
void binary(BinaryOp op, const Tensor& a, const Tensor& b, const Tensor& out);  // writes, broadcasting
void scale(const Tensor& x, double alpha, const Tensor& out);                   // writes out = alpha * x
void unary(UnaryOp op, const Tensor& x, const Tensor& out);                     // writes
void unary_backward(UnaryOp op, const Tensor& x, const Tensor& y, const Tensor& grad_y,
                    const Tensor& grad_x);                                       // writes grad_x
void sum_to(const Tensor& src, const Tensor& out);                              // writes

// ---- layers.cu ----
void batch_norm_forward(const Tensor& x, const Tensor& gamma, const Tensor& beta, const Tensor& running_mean,
                        const Tensor& running_var, bool training, double momentum, double eps, const Tensor& y,
                        const Tensor& save_mean, const Tensor& save_invstd, bool relu);
void batch_norm_backward(const Tensor& x, const Tensor& gamma, const Tensor& mean, const Tensor& invstd,
                         const Tensor& grad_y, bool training, const Tensor& grad_x, const Tensor& grad_gamma,
                         const Tensor& grad_beta);
void max_pool2d_forward(const Tensor& x, const Pool2dParams& p, const Tensor& y, const Tensor& argmax);
void max_pool2d_backward(const Tensor& grad_y, const Tensor& argmax, const Tensor& grad_x);
void global_avg_pool_forward(const Tensor& x, const Tensor& y);
void global_avg_pool_backward(const Tensor& grad_y, const Tensor& grad_x);
void upsample_nearest_forward(const Tensor& x, const Tensor& y);
void upsample_nearest_backward(const Tensor& grad_y, const Tensor& grad_x);  // adds
void resize_bilinear(const Tensor& x, const Tensor& y);
void copy_block(const Tensor& part, const Tensor& whole, int64_t outer, int64_t part_inner, int64_t whole_inner,
                int64_t offset, bool into_whole);
void log_softmax_forward(const Tensor& x, const Tensor& y);
void log_softmax_backward(const Tensor& y, const Tensor& grad_y, const Tensor& grad_x);
void gather_rows(const Tensor& src, const Tensor& index, const Tensor& out);
void scatter_rows(const Tensor& src, const Tensor& index, const Tensor& dst, bool accumulate);
void rmsprop_step(const Tensor& params, const std::vector<GradientSlice>& grads, const Tensor& square_avg, double lr,
                  double alpha, double eps, double weight_decay);
void sgd_step(const Tensor& params, const std::vector<GradientSlice>& grads, const Tensor& buffer, double lr,
              double momentum, double weight_decay, bool first_step);

// Kernels that meet a bad value they cannot report at once (a row index out of range in gather_rows or
// scatter_rows) skip it and record the first such event in a device-side error word instead of waiting
// for the device. This reads and clears that word and throws an mdff::Error naming the kernel and the
// value; the backend calls it at every synchronisation (copies to the host, synchronize()).
void check_device_errors();

// ---- codes.cu ----
void count_non_finite(const std::vector<Tensor>& tensors, const Tensor& count);  // adds, one launch
void pack_signs(const Tensor& x, const Tensor& codes);
void hamming_distances(const Tensor& queries, const Tensor& database, const Tensor& distances);
void hamming_top_k(const Tensor& queries, const Tensor& database, int64_t k, const Tensor& indices,
                   const Tensor& distances);

// ---- losses.cu ----
void pairwise_logistic_forward(const Tensor& theta, const Tensor& s, const Tensor& out);  // writes the 0-dim mean
void pairwise_logistic_backward(const Tensor& theta, const Tensor& s, const Tensor& grad_out,
                                const Tensor& grad_theta);  // writes grad_theta; grad_out stays on the device
void quantization_forward(const Tensor& u, const Tensor& out);  // writes the 0-dim J2; backward reads grad_out there
void quantization_backward(const Tensor& u, const Tensor& grad_out, const Tensor& grad_u);
void cross_entropy_forward(const Tensor& logits, const Tensor& target, const Tensor& out, const Tensor& log_sum_exp);
void cross_entropy_backward(const Tensor& logits, const Tensor& target, const Tensor& log_sum_exp,
                            const Tensor& grad_out, const Tensor& grad_logits);

}  // namespace mdff::cuda
