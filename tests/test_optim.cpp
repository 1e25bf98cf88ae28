// Optimizers: flat parameter buffers with a gradient per parameter, and one RMSProp / SGD step against
// hand-computed updates with PyTorch's formulas (weight decay added to the gradient; eps outside the
// square root; a parameter without a gradient left alone); a NaN or an infinity among the gradients or
// values is found and named by parameter.
#include <doctest/doctest.h>
#include "tests/doctest_text.h"

#include <cmath>
#include <limits>
#include <memory>

#include "core/backend.h"
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

TEST_CASE("parameters live in one flat buffer as named views; backward gives each its own gradient") {
  Fixture f;
  CHECK(f.buffer.numel() == 3);
  const float* base = f.buffer.values().data<float>();
  CHECK(f.layer.weight.data<float>() == base);      // weight (1,2) first
  CHECK(f.layer.bias.data<float>() == base + 2);    // then bias (1)
  CHECK(f.buffer.gradients().empty());              // none before backward
  auto check_gradients = [&] {
    const std::vector<GradientSlice> slices = f.buffer.gradients();
    REQUIRE(slices.size() == 2);
    CHECK(slices[0].offset == 0);
    CHECK(slices[0].grad.to_vector() == std::vector<double>{3, -4});
    CHECK(slices[1].offset == 2);
    CHECK(slices[1].grad.to_vector() == std::vector<double>{1});
    CHECK(f.buffer.grads().size() == 2);
  };
  f.backward();
  check_gradients();
  f.backward();  // zero_grad, then once more: not accumulated across steps
  check_gradients();
  f.buffer.zero_grad();  // drops them: the memory is free until the next backward
  CHECK(f.buffer.gradients().empty());
  CHECK_FALSE(f.layer.weight.grad().defined());
}

TEST_CASE("a parameter without a gradient is not updated, nor is its state (PyTorch skips it)") {
  for (const bool rmsprop : {true, false}) {
    CAPTURE(rmsprop);
    Rng rng{3};
    Linear used{2, 1, true, rng}, unused{2, 1, true, rng};
    NamedTensors named = used.named_parameters();
    for (auto& [name, p] : unused.named_parameters()) named.emplace_back("unused." + name, p);
    ParameterBuffer buffer(named);
    std::unique_ptr<Optimizer> optimizer;
    if (rmsprop) optimizer = std::make_unique<RMSProp>(buffer, RMSPropOptions{0.01, 0.99, 1e-8, 0.1});
    else optimizer = std::make_unique<Sgd>(buffer, SgdOptions{0.1, 0.9, 0.1});
    const std::vector<double> before = buffer.values().to_vector();
    for (int step = 0; step < 2; ++step) {
      buffer.zero_grad();
      ops::sum(used.forward(Tensor::from_vector(std::vector<float>{3, -4}, {1, 2}))).backward();
      optimizer->step();
    }
    const std::vector<double> after = buffer.values().to_vector();
    const std::vector<double> state = optimizer->state().front().second.to_vector();
    for (int i = 0; i < 3; ++i) CHECK(after[i] != before[i]);  // used: weight (1,2), bias (1)
    for (int i = 3; i < 6; ++i) {                                // unused: no weight decay, no state
      CHECK(after[i] == before[i]);
      CHECK(state[i] == 0);
    }
  }
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

TEST_CASE("an optimizer kernel refuses a gradient that does not fit the flat buffers, before writing") {
  Backend& cpu = backend(Device::CPU);
  const Tensor params = Tensor::zeros({10}), state = Tensor::zeros({10});
  const Tensor grad = Tensor::full({4}, 1.0);
  const std::vector<GradientSlice> past_the_end{{grad, 7}}, negative{{grad, -1}}, wrong_dtype{{grad.to(DType::F64), 0}};
  for (const auto* slices : {&past_the_end, &negative, &wrong_dtype}) {
    CHECK_THROWS_WITH_AS(cpu.rmsprop_step(params, *slices, state, 0.1, 0.99, 1e-8, 0),
                         doctest::Contains("does not fit"), Error);
    CHECK_THROWS_WITH_AS(cpu.sgd_step(params, *slices, state, 0.1, 0.9, 0, true), doctest::Contains("does not fit"),
                         Error);
  }
  CHECK_THROWS_WITH_AS(cpu.rmsprop_step(params, {{grad, 6}}, Tensor::zeros({9}), 0.1, 0.99, 1e-8, 0),
                       doctest::Contains("the optimizer's state must be"), Error);
  CHECK(params.to_vector() == std::vector<double>(10, 0.0));
  cpu.rmsprop_step(params, {{grad, 6}}, state, 0.1, 0.99, 1e-8, 0);  // the last four elements: fits exactly
  CHECK(params.to_vector()[5] == 0.0);
  CHECK(params.to_vector()[6] < 0.0);
}

TEST_CASE("the first NaN or infinity among the gradients or values is named by parameter and element") {
  Rng rng{2};
  Linear first{3, 2, true, rng}, second{2, 2, true, rng};
  NamedTensors named = first.named_parameters();
  for (auto& [name, p] : second.named_parameters()) named.emplace_back("second." + name, p);
  ParameterBuffer buffer(named);  // weight (2,3), bias (2), second.weight (2,2), second.bias (2)
  CHECK_FALSE(buffer.first_non_finite_grad());  // no gradients yet
  ops::sum(second.forward(first.forward(Tensor::full({1, 3}, 1.0)))).backward();
  CHECK_FALSE(buffer.first_non_finite_grad());
  CHECK_FALSE(buffer.first_non_finite_value());
  const double inf = std::numeric_limits<double>::infinity(), nan = std::nan("");
  second.weight.grad().data<float>()[3] = static_cast<float>(inf);
  second.bias.grad().data<float>()[1] = static_cast<float>(nan);  // later in the model's order
  std::optional<NonFinite> bad = buffer.first_non_finite_grad();
  REQUIRE(bad);
  CHECK(bad->name == "second.weight");
  CHECK(bad->index == 3);
  CHECK(bad->value == inf);
  first.bias.data<float>()[1] = static_cast<float>(-inf);
  bad = buffer.first_non_finite_value();
  REQUIRE(bad);
  CHECK(bad->name == "bias");
  CHECK(bad->index == 1);
  CHECK(bad->value == -inf);
  // tensors outside a buffer, float64 too
  Tensor stats = Tensor::zeros({4}, DType::F64);
  CHECK_FALSE(first_non_finite({{"bn.running_var", stats}}));
  stats.data<double>()[2] = nan;
  bad = first_non_finite({{"bn.running_mean", Tensor::zeros({3})}, {"bn.running_var", stats}});
  REQUIRE(bad);
  CHECK(bad->name == "bn.running_var");
  CHECK(bad->index == 2);
  CHECK(std::isnan(bad->value));
}
