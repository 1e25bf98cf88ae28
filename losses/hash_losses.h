// The three losses of MDFF-SH (paper eq. 1-5, method.md §3) and their weighted sum
// J = J1 + beta J2 + gamma J3, for continuous codes u (N,L) in (-1,1) and multi-hot labels (N,K).
#pragma once
#include <string>

#include "core/tensor.h"

namespace mdff {

enum class Pairs { Dataset, Batch };
Pairs parse_pairs(const std::string& text);  // "dataset" | "batch"
const char* pairs_name(Pairs pairs);

// The U matrix of `pairs = dataset`: the latest (detached) u of every training image, with their
// labels, as DPSH keeps it. Rows start at zero and are overwritten as their images come in batches.
class PairMemory {
 public:
  // train_labels (n,K) multi-hot, float; U is created (n,L) zeros on the labels' device and dtype.
  PairMemory(const Tensor& train_labels, int bits);
  void write(const Tensor& index, const Tensor& u);  // U[index[i]] = u[i] (no gradient), index I32 (B)
  const Tensor& codes() const { return u_; }          // (n,L)
  Tensor& codes() { return u_; }
  const Tensor& labels() const { return labels_; }    // (n,K)

 private:
  Tensor u_, labels_;
};

// s_ij = 1 when rows i of a and j of b share at least one label, else 0: (N,K) x (M,K) -> (N,M).
Tensor similarity(const Tensor& labels_a, const Tensor& labels_b);

// J1 = mean over pairs of softplus(theta_ij) - s_ij theta_ij, theta = 1/2 u_i . v_j, in the stable form,
// for u (N,L) against constant codes v (M,L) with labels (N,K) and (M,K).
Tensor pairwise_loss(const Tensor& u, const Tensor& labels, const Tensor& codes, const Tensor& code_labels);
// Dataset pairs: the batch's rows of U are written first, then the batch (N) is paired with all n rows
// of U; the gradient flows into the batch side only. Batch pairs: all N x N pairs of the batch, both
// sides differentiable.
Tensor pairwise_loss_dataset(const Tensor& u, const Tensor& labels, const Tensor& index, PairMemory& memory);
Tensor pairwise_loss_batch(const Tensor& u, const Tensor& labels);
// J2 = mean over the batch of ||b_i - u_i||^2 with b = sign(u) a constant.
Tensor quantization_loss(const Tensor& u);
// J3 = mean softmax cross-entropy against the label vector divided by its sum (one-hot for
// single-label data). Every row of labels must hold at least one label.
Tensor classification_loss(const Tensor& logits, const Tensor& labels);

struct LossTerms {
  Tensor j1, j2, j3, total;  // 0-dim each; total = j1 + beta j2 + gamma j3
};

struct LossConfig {
  Pairs pairs = Pairs::Dataset;
  double beta = 0.1;   // weight of J2
  double gamma = 0.01; // weight of J3
};

// index and memory are used with Pairs::Dataset only.
LossTerms mdff_loss(const Tensor& u, const Tensor& logits, const Tensor& labels, const Tensor& index,
                    PairMemory* memory, const LossConfig& config);

}  // namespace mdff
