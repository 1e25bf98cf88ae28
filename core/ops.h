// The functional ops: each defines its shape rules, its checks, and its forward and backward once, and
// runs on whatever device its inputs are on (through backend(), core/backend.h). Every op returns a
// new tensor and records the autograd graph when an input requires grad; ops ending in `_` change a
// tensor in place and never record.
#pragma once
#include <utility>
#include <vector>

#include "core/backend.h"
#include "core/tensor.h"

namespace mdff::ops {

// ---- elementwise (NumPy broadcasting: (N,C,H,W) + (1,C,1,1), (N,D) + (D), ...) ----
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
Tensor scale(const Tensor& x, double alpha);  // alpha * x
Tensor relu(const Tensor& x);
Tensor tanh(const Tensor& x);
Tensor sign(const Tensor& x);      // +1 for x >= 0 (sign(0) = +1), -1 otherwise; no gradient (constant)
Tensor softplus(const Tensor& x);  // log(1 + e^x) in the stable form max(x,0) + log1p(e^-|x|)
Tensor heaviside(const Tensor& x); // 1 for x > 0, 0 otherwise (heaviside(0) = 0); no gradient (constant)

// ---- reductions (to a 0-dim tensor) ----
Tensor sum(const Tensor& x);
Tensor mean(const Tensor& x);

// ---- matrix products ----
// alpha (M,K) x (K,N) -> (M,N), with either operand transposed first; alpha rides in the GEMM (no
// extra pass over the product, forward or backward).
Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a = false, bool trans_b = false, double alpha = 1.0);
// x (N,in), weight (out,in), bias (out) or undefined -> (N,out): x weight^T + bias.
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias);

// ---- images (N,C,H,W) ----
// weight (Cout,Cin,kh,kw), bias (Cout) or undefined -> (N,Cout,Ho,Wo), Ho = (H + 2 padding - kh) / stride + 1.
Tensor conv2d(const Tensor& x, const Tensor& weight, const Tensor& bias, int stride = 1, int padding = 0);
// Inference: relu?(batch_norm2d(conv2d(x, weight), bn in evaluation mode) + residual) in one kernel, equal
// bit for bit to those ops. Forward only: an Error while gradients are being recorded (grad_enabled()).
// residual (N,Cout,Ho,Wo) or undefined.
Tensor conv2d_bn_eval(const Tensor& x, const Tensor& weight, const BatchNormEval& bn, int stride, int padding,
                      const Tensor& residual, bool relu);
// Per-channel normalisation. training: batch statistics, and running_mean / running_var (C) updated in
// place (momentum 0.1, unbiased variance, as PyTorch); evaluation: running statistics.
Tensor batch_norm2d(const Tensor& x, const Tensor& gamma, const Tensor& beta, const Tensor& running_mean,
                    const Tensor& running_var, bool training, double momentum = 0.1, double eps = 1e-5);
// Fusions that save an activation each: relu(batch_norm2d(...)) and relu(a + b) (a, b of one shape), with
// ReLU applied to the op's own output (batch norm's kernel applies it as it writes, saving a pass too) and
// its gradient taken from that output, so the pre-ReLU tensor is never kept for backward. Equal bit for
// bit to the separate ops.
Tensor batch_norm2d_relu(const Tensor& x, const Tensor& gamma, const Tensor& beta, const Tensor& running_mean,
                         const Tensor& running_var, bool training, double momentum = 0.1, double eps = 1e-5);
Tensor add_relu(const Tensor& a, const Tensor& b);
Tensor max_pool2d(const Tensor& x, int kernel = 3, int stride = 2, int padding = 1);
Tensor global_avg_pool(const Tensor& x);                        // (N,C,H,W) -> (N,C)
Tensor upsample_nearest(const Tensor& x, int64_t height, int64_t width);  // to an exact size
Tensor resize_bilinear(const Tensor& x, int64_t height, int64_t width);   // forward only (resizes inputs)

// ---- layout ----
Tensor concat(const std::vector<Tensor>& parts, int64_t dim);  // float, or int32 parts (no gradient)

// ---- classification ----
Tensor log_softmax(const Tensor& x);  // over the last dim of (N,K)
// Mean over rows of -sum_k target[n,k] log_softmax(logits)[n,k]; targets are probabilities (soft or one-hot)
// and constants (target must not require grad). One fused op (J3 of MDFF-SH): it keeps each row's
// log-sum-exp, not the (N,K) log-probabilities. Gradient: (softmax(logits) sum_k target - target) / N.
Tensor cross_entropy(const Tensor& logits, const Tensor& target);

// ---- losses ----
// The pairwise likelihood of MDFF-SH (losses/hash_losses.h) as one op: the 0-dim mean over all elements
// of softplus(theta) - s * theta, equal to mean(sub(softplus(theta), mul(s, theta))) within rounding but
// without their (N,M) temporaries, forward or backward. s (theta's shape, dtype and device) holds the
// constant similarities: it must not require grad. Gradient: (sigmoid(theta) - s) / numel per element.
Tensor pairwise_logistic_loss(const Tensor& theta, const Tensor& s);
// The quantization loss of MDFF-SH (J2) as one op: the 0-dim sum over u (N,L) of (sign(u) - u)^2 divided
// by N, with sign(u) a constant (sign(0) = +1); equal within rounding to
// scale(sum(mul(d, d)), 1/N), d = sub(sign(u), u). Gradient: 2 (u - sign(u)) / N.
Tensor quantization_loss(const Tensor& u);

// ---- rows (the U matrix of the pairwise loss) ----
Tensor gather_rows(const Tensor& src, const Tensor& index);  // (R,D...), I32 (M) -> (M,D...)
void scatter_rows_(Tensor& dst, const Tensor& index, const Tensor& src);  // dst[index[i]] = src[i]; no grad

// ---- binary codes and checks (no gradients) ----
// (N,D) float -> (N, ceil(D/32)) I32: bit d of row n set where x[n,d] >= 0 (sign(0) = +1).
Tensor pack_signs(const Tensor& x);
// (Q,W), (N,W) I32 codes of pack_signs -> (Q,N) I32 Hamming distances.
Tensor hamming_distances(const Tensor& queries, const Tensor& database);
// The first k (clipped to N) of each query's ranking by Hamming distance, ties by database index:
// {indices, distances}, each (Q,k) I32. On the GPU one warp ranks each query.
std::pair<Tensor, Tensor> hamming_top_k(const Tensor& queries, const Tensor& database, int64_t k);
// count (an I32 scalar on their device) += the number of NaN and infinite elements of `tensors` (floating
// point, one dtype); nothing waits, and on the GPU one launch covers up to 1,000 chunks of 2^16 elements.
void count_non_finite_(const std::vector<Tensor>& tensors, Tensor& count);

}  // namespace mdff::ops
