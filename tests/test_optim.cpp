// Optimizers: flat parameter buffers, and one RMSProp / SGD step against hand-computed updates with
// PyTorch's formulas (weight decay added to the gradient; eps outside the square root).
#include <doctest/doctest.h>

#include <cmath>

#include "core/error.h"
#include "core/ops.h"
#include "layers/layers.h"
#include "optim/optimizers.h"

using namespace mdff;

namespace {
// A linear layer whose parameters are in one flat buffer, with gradient dL/dw = x for L = sum(w . x).
struct Fixture {
  Rng rng{1};
  Linear layer{2, 1, true, rng};
  ParameterBuffer buffer{layer.named_parameters()};
  void backward() {
    buffer.zero_grad();
    ops::sum(layer.forward(Tensor::from_vector(std::vector<float>{3, -4}, {1, 2}))).backward();
  }
};
}  // namespace

TEST_CASE("parameters and gradients live in one flat buffer each, as named views") {
  Fixture f;
  CHECK(f.buffer.numel() == 3);
  const float* base = f.buffer.values().data<float>();
  CHECK(f.layer.weight.data<float>() == base);      // weight (1,2) first
  CHECK(f.layer.bias.data<float>() == base + 2);    // then bias (1)
  f.backward();
  CHECK(f.buffer.grads().to_vector() == std::vector<double>{3, -4, 1});  // backward wrote into the flat buffer
  f.backward();  // zero_grad, then once more: not accumulated across steps
  CHECK(f.buffer.grads().to_vector() == std::vector<double>{3, -4, 1});
}

TEST_CASE("one RMSProp step matches the hand-computed update") {
  Fixture f;
  const std::vector<double> p0 = f.buffer.values().to_vector();
  RMSProp opt(f.buffer, {0.01, 0.99, 1e-8, 0.1});
  f.backward();
  opt.step();
  const std::vector<double> grads{3, -4, 1}, p1 = f.buffer.values().to_vector(), v = opt.square_avg().to_vector();
  for (int i = 0; i < 3; ++i) {
    const double g = grads[i] + 0.1 * p0[i];  // weight decay joins the gradient
    const double sq = 0.01 * g * g;           // (1 - alpha) g^2 from v = 0
    CHECK(v[i] == doctest::Approx(sq).epsilon(1e-5));
    CHECK(p1[i] == doctest::Approx(p0[i] - 0.01 * g / (std::sqrt(sq) + 1e-8)).epsilon(1e-5));
  }
  f.backward();
  opt.step();  // second step: v = 0.99 v + 0.01 g^2
  const std::vector<double> v2 = opt.square_avg().to_vector();
  const double g0 = grads[0] + 0.1 * p1[0];
  CHECK(v2[0] == doctest::Approx(0.99 * v[0] + 0.01 * g0 * g0).epsilon(1e-5));
}

TEST_CASE("SGD with momentum matches the hand-computed updates") {
  Fixture f;
  const std::vector<double> p0 = f.buffer.values().to_vector();
  Sgd opt(f.buffer, {0.1, 0.9, 0.0});
  f.backward();
  opt.step();  // buffer = g
  f.backward();
  opt.step();  // buffer = 0.9 g + g
  const std::vector<double> p2 = f.buffer.values().to_vector(), grads{3, -4, 1};
  for (int i = 0; i < 3; ++i) CHECK(p2[i] == doctest::Approx(p0[i] - 0.1 * grads[i] - 0.1 * 1.9 * grads[i]).epsilon(1e-5));
}

TEST_CASE("impossible optimizer settings are clear errors") {
  Fixture f;
  CHECK_THROWS_WITH_AS(RMSProp(f.buffer, {-1.0, 0.99, 1e-8, 0}), doctest::Contains("out of range"), Error);
  CHECK_THROWS_WITH_AS(RMSProp(f.buffer, {1e-3, 1.0, 1e-8, 0}), doctest::Contains("alpha"), Error);
  CHECK_THROWS_WITH_AS(Sgd(f.buffer, {0.1, -0.5, 0}), doctest::Contains("momentum"), Error);
}
