// The MDFF-SH losses: gradient checks in float64 for J1 (both pair modes), J2 and J3 (single- and
// multi-label), the U-matrix semantics of pairs = dataset, hand-computed values, and stability at 64 bits.
#include "tests/gradcheck.h"

#include <cmath>

#include "core/error.h"
#include "losses/hash_losses.h"

using namespace mdff;
using Ts = std::vector<Tensor>;

namespace {
Tensor t64(std::vector<double> v, const Shape& shape) { return Tensor::from_vector(v, shape, DType::F64); }
const Tensor kLabels = t64({1, 0, 0, 0, 1, 0, 1, 1, 0, 0, 0, 1}, {4, 3});  // row 2 is multi-label
}  // namespace

TEST_CASE("J1, J2 and J3 gradients") {
  Rng rng(1);
  const Tensor u = Tensor::uniform({4, 8}, rng, -0.9, 0.9, DType::F64).set_requires_grad();
  const Tensor codes = Tensor::uniform({6, 8}, rng, -1, 1, DType::F64);
  const Tensor code_labels = t64({1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0, 1}, {6, 3});
  test::check_op("pairwise_logistic_loss", [&](const Ts& t) { return pairwise_loss(t[0], kLabels, codes, code_labels); },
                 {u});
  test::check_op("matmul", [&](const Ts& t) { return pairwise_loss_batch(t[0], kLabels); }, {u});
  test::check_op("quantization_loss", [](const Ts& t) { return quantization_loss(t[0]); }, {u});
  const Tensor logits = Tensor::randn({4, 3}, rng, 2.0, DType::F64).set_requires_grad();
  test::check_op("cross_entropy", [](const Ts& t) { return classification_loss(t[0], kLabels); }, {logits});
}

TEST_CASE("hand-computed values") {
  // J2: u = (0.5, -0.25) -> b = (1, -1): ||b - u||^2 = 0.25 + 0.5625, one row
  CHECK(quantization_loss(t64({0.5, -0.25}, {1, 2})).item() == doctest::Approx(0.8125));
  CHECK(quantization_loss(t64({0.0}, {1, 1})).item() == doctest::Approx(1.0));  // sign(0) = +1
  // J1 on one pair: theta = 1/2 (0.5*1 + 0.5*1) = 0.5, similar: softplus(0.5) - 0.5
  const double j1 = pairwise_loss(t64({0.5, 0.5}, {1, 2}), t64({1, 0}, {1, 2}), t64({1, 1}, {1, 2}), t64({1, 1}, {1, 2})).item();
  CHECK(j1 == doctest::Approx(std::log1p(std::exp(0.5)) - 0.5));
  // similarity: shares at least one label
  CHECK(similarity(kLabels, kLabels).to_vector() ==
        std::vector<double>{1, 0, 1, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0, 1});
  // J3 with a multi-label row: the target is the labels divided by their number
  const Tensor logits = t64({0, 0, 0}, {1, 3});
  CHECK(classification_loss(logits, t64({1, 1, 0}, {1, 3})).item() == doctest::Approx(std::log(3.0)));
}

TEST_CASE("pairs = dataset writes the batch's rows of U first and differentiates the batch side only") {
  Rng rng(2);
  const Tensor train_labels = t64({1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0, 1}, {6, 3});
  PairMemory memory(train_labels, 8);
  memory.codes().copy_(Tensor::uniform({6, 8}, rng, -1, 1, DType::F64));
  Tensor u = Tensor::uniform({2, 8}, rng, -0.9, 0.9, DType::F64).set_requires_grad();
  const Tensor index = Tensor::from_vector(std::vector<int32_t>{4, 1}, {2});
  const Tensor labels = t64({0, 1, 1, 0, 1, 0}, {2, 3});
  const Tensor loss = pairwise_loss_dataset(u, labels, index, memory);
  const std::vector<double> rows = ops::gather_rows(memory.codes(), index).to_vector();
  CHECK(rows == u.to_vector());  // written first
  loss.backward();
  const std::vector<double> g = u.grad().to_vector();
  u.zero_grad();
  pairwise_loss(u, labels, memory.codes().detach(), train_labels).backward();  // U held constant
  CHECK(u.grad().to_vector() == g);
  CHECK(!memory.codes().requires_grad());
}

TEST_CASE("J1 is finite at 64 bits with theta = 32") {
  // u = v = all ones at L = 64: theta = 32; dissimilar pairs cost softplus(32) ~ 32, similar ones ~ 1e-14
  const Tensor ones = Tensor::full({1, 64}, 1.0, DType::F64);
  const double similar = pairwise_loss(ones, t64({1, 0}, {1, 2}), ones, t64({1, 0}, {1, 2})).item();
  const double dissimilar = pairwise_loss(ones, t64({1, 0}, {1, 2}), ones, t64({0, 1}, {1, 2})).item();
  CHECK(std::isfinite(similar));
  CHECK(similar == doctest::Approx(std::log1p(std::exp(-32.0))).epsilon(1e-6));
  CHECK(dissimilar == doctest::Approx(32.0));
  const Tensor opposite = ops::scale(ones, -1.0);  // theta = -32
  CHECK(pairwise_loss(opposite, t64({1, 0}, {1, 2}), ones, t64({1, 0}, {1, 2})).item() == doctest::Approx(32.0));
  // float32 too, with gradients
  const Tensor u32 = Tensor::full({2, 64}, 0.999).set_requires_grad();
  const Tensor l32 = Tensor::from_vector(std::vector<float>{1, 0, 0, 1}, {2, 2});
  const Tensor loss = pairwise_loss_batch(u32, l32);
  loss.backward();
  CHECK(std::isfinite(loss.item()));
  for (double g : u32.grad().to_vector()) CHECK(std::isfinite(g));
}

TEST_CASE("the weighted sum J = J1 + beta J2 + gamma J3") {
  Rng rng(3);
  const Tensor u = Tensor::uniform({4, 8}, rng, -0.9, 0.9, DType::F64);
  const Tensor logits = Tensor::randn({4, 3}, rng, 1.0, DType::F64);
  const LossTerms t = mdff_loss(u, logits, kLabels, Tensor(), nullptr, {Pairs::Batch, 0.1, 0.01});
  CHECK(t.total.item() == doctest::Approx(t.j1.item() + 0.1 * t.j2.item() + 0.01 * t.j3.item()));
  const LossTerms no_j3 = mdff_loss(u, logits, kLabels, Tensor(), nullptr, {Pairs::Batch, 0.1, 0.0});
  CHECK(no_j3.total.item() == doctest::Approx(t.j1.item() + 0.1 * t.j2.item()));
  CHECK_THROWS_WITH_AS(mdff_loss(u, logits, kLabels, Tensor(), nullptr, {Pairs::Dataset, 0.1, 0.01}),
                       doctest::Contains("needs the U matrix"), Error);
  CHECK_THROWS_WITH_AS(parse_pairs("all"), doctest::Contains("use dataset or batch"), Error);
}
