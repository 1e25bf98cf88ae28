// The MDFF-SH losses (see hash_losses.h), composed from core ops so that they run on any device and
// get their gradients from autograd; each loss's pass over its (N, ...) matrix is one fused op:
// ops::pairwise_logistic_loss (J1), ops::quantization_loss (J2), ops::cross_entropy (J3).
#include "losses/hash_losses.h"

#include "core/autograd.h"
#include "core/error.h"
#include "core/ops.h"

namespace mdff {

Pairs parse_pairs(const std::string& text) {
  if (text == "dataset") return Pairs::Dataset;
  if (text == "batch") return Pairs::Batch;
  MDFF_FAIL("unknown pairs '", text, "': use dataset or batch");
}

const char* pairs_name(Pairs pairs) { return pairs == Pairs::Dataset ? "dataset" : "batch"; }

PairMemory::PairMemory(const Tensor& train_labels, int bits)
    : u_(Tensor::zeros({train_labels.size(0), bits}, train_labels.dtype(), train_labels.device())),
      labels_(train_labels) {
  MDFF_CHECK(train_labels.dim() == 2, "PairMemory: labels must be (n,K), got ", shape_str(train_labels.shape()));
}

void PairMemory::write(const Tensor& index, const Tensor& u) {
  MDFF_CHECK(u.dim() == 2 && u.size(1) == u_.size(1), "PairMemory: codes of shape ", shape_str(u.shape()),
             " for a U matrix of shape ", shape_str(u_.shape()));
  ops::scatter_rows_(u_, index, u.detach());
}

namespace {
void check_codes(const Tensor& u, const Tensor& labels, const char* loss) {
  MDFF_CHECK(u.dim() == 2 && labels.dim() == 2 && u.size(0) == labels.size(0), loss, ": codes ",
             shape_str(u.shape()), " and labels ", shape_str(labels.shape()), " must be (N,L) and (N,K)");
}
}  // namespace

Tensor similarity(const Tensor& labels_a, const Tensor& labels_b) {
  NoGradGuard no_grad;
  // counts of shared labels (N,M): 1 where at least one is shared
  return ops::heaviside(ops::matmul(labels_a, labels_b, false, true));
}

Tensor pairwise_loss(const Tensor& u, const Tensor& labels, const Tensor& codes, const Tensor& code_labels) {
  check_codes(u, labels, "pairwise_loss");
  MDFF_CHECK(!codes.requires_grad(), "pairwise_loss: the codes paired with u are constants (detach them)");
  const Tensor theta = ops::matmul(u, codes, false, true, 0.5);  // (N,M)
  return ops::pairwise_logistic_loss(theta, similarity(labels, code_labels));
}

Tensor pairwise_loss_dataset(const Tensor& u, const Tensor& labels, const Tensor& index, PairMemory& memory) {
  memory.write(index, u);  // the batch's own rows first (so each image also pairs with its current code)
  return pairwise_loss(u, labels, memory.codes(), memory.labels());
}

Tensor pairwise_loss_batch(const Tensor& u, const Tensor& labels) {
  check_codes(u, labels, "pairwise_loss_batch");
  const Tensor theta = ops::matmul(u, u, false, true, 0.5);  // (N,N), both sides differentiable
  return ops::pairwise_logistic_loss(theta, similarity(labels, labels));
}

Tensor quantization_loss(const Tensor& u) { return ops::quantization_loss(u); }

Tensor classification_loss(const Tensor& logits, const Tensor& labels) {
  MDFF_CHECK(logits.shape() == labels.shape(), "classification_loss: logits ", shape_str(logits.shape()),
             " and labels ", shape_str(labels.shape()), " must have the same shape (N,K)");
  Tensor target;
  {
    NoGradGuard no_grad;
    const Tensor ones = Tensor::full({labels.size(1), 1}, 1.0, labels.dtype(), labels.device());
    target = ops::div(labels, ops::matmul(labels, ones));  // each row divided by its number of labels
  }
  return ops::cross_entropy(logits, target);
}

LossTerms mdff_loss(const Tensor& u, const Tensor& logits, const Tensor& labels, const Tensor& index,
                    PairMemory* memory, const LossConfig& config) {
  LossTerms terms;
  if (config.pairs == Pairs::Dataset) {
    MDFF_CHECK(memory, "mdff_loss: pairs = dataset needs the U matrix (PairMemory)");
    terms.j1 = pairwise_loss_dataset(u, labels, index, *memory);
  } else {
    terms.j1 = pairwise_loss_batch(u, labels);
  }
  terms.j2 = quantization_loss(u);
  terms.j3 = classification_loss(logits, labels);
  terms.total = ops::add(ops::add(terms.j1, ops::scale(terms.j2, config.beta)), ops::scale(terms.j3, config.gamma));
  return terms;
}

}  // namespace mdff
