// Gradient checking for the tests: analytic gradients from backward() against central differences of
// L = <f(inputs), R> (R a fixed random tensor) in float64. check_op() also re-runs the check with the
// op's backward perturbed by 1% (autograd's testing hook) and requires it to fail: a gradient check
// that cannot fail proves nothing.
#pragma once
#include "tests/doctest_text.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "core/autograd.h"
#include "core/ops.h"
#include "core/rng.h"
#include "core/tensor.h"

namespace mdff::test {

using Fn = std::function<Tensor(const std::vector<Tensor>&)>;

// How a check differentiates numerically and what error it accepts.
struct CheckOptions {
  // Relative finite-difference step. Measured on batch norm and on the small network of
  // test_gradcheck: the error is round-off dominated (grows as 1/h) below 1e-4 and truncation
  // dominated above it; at 1e-4 it is 1e-8 and 2e-7.
  double step = 1e-4;
  double tolerance = 1e-6;  // PyTorch's gradcheck allows 1e-3 relative; correct ops reach < 3e-7
  size_t sample = 0;        // > 0: differentiate only this many evenly spaced elements of each input
};

// Whole networks have thousands of ReLU and max-pool kinks, and a step of 1e-4 crosses some of them
// (errors up to 0.1 measured on the tiny MDFF-SH); at 1e-6 none are crossed and the error is
// round-off bound: 5e-5 measured, 1.3e-4 once the CPU convolution dropped the taps that only meet
// padding (another summation order; its analytic gradients equal the full computation's to 3e-12),
// growing 100x at 1e-8. The tolerance is 3e-4; a 1% error in a backward still shows as 1e-2.
constexpr CheckOptions kNetworkCheck{1e-6, 3e-4, 6};

// Largest error over all checked elements, each relative to the larger of |analytic|, |numeric| and
// 1e-3 x the largest numeric gradient of that input (so tiny gradients are not judged by noise).
inline double max_gradient_error(const Fn& f, std::vector<Tensor> inputs, const CheckOptions& options = {},
                                 uint64_t seed = 7) {
  const size_t sample = options.sample;
  for (Tensor& t : inputs)
    if (t.requires_grad()) t.zero_grad();
  Rng rng(seed);
  const Tensor y = f(inputs);
  const Tensor r = Tensor::randn(y.shape(), rng, 1.0, DType::F64);
  auto objective = [&]() {
    NoGradGuard no_grad;
    return ops::sum(ops::mul(f(inputs), r)).item();
  };
  ops::sum(ops::mul(y, r)).backward();

  double worst = 0;
  for (Tensor& x : inputs) {
    if (!x.requires_grad()) continue;
    REQUIRE_MESSAGE(x.grad().defined(), "no gradient reached an input that requires grad");
    const std::vector<double> analytic = x.grad().to_vector();
    std::vector<double> numeric(analytic.size());
    std::vector<size_t> checked;
    const size_t step = sample && numeric.size() > sample ? numeric.size() / sample : 1;
    for (size_t j = 0; j < numeric.size(); j += step) checked.push_back(j);
    double* values = x.data<double>();
    for (size_t j : checked) {
      const double saved = values[j], h = options.step * std::max(1.0, std::abs(saved));
      values[j] = saved + h;
      const double plus = objective();
      values[j] = saved - h;
      const double minus = objective();
      values[j] = saved;
      numeric[j] = (plus - minus) / (2 * h);
    }
    double scale = 0;
    for (size_t j : checked) scale = std::max(scale, std::abs(numeric[j]));
    for (size_t j : checked) {
      const double denom = std::max({std::abs(analytic[j]), std::abs(numeric[j]), 1e-3 * scale, 1e-12});
      worst = std::max(worst, std::abs(analytic[j] - numeric[j]) / denom);
    }
  }
  return worst;
}

// Checks f's gradients, then that the check fails when the Nodes named `op` return 1.01x their gradient.
inline void check_op(const std::string& op, const Fn& f, const std::vector<Tensor>& inputs,
                     const CheckOptions& options = {}) {
  const double error = max_gradient_error(f, inputs, options);
  CHECK_MESSAGE(error < options.tolerance, op, ": gradient error ", error);
  testing::set_backward_perturbation(op, 1.01);
  const double broken = max_gradient_error(f, inputs, options);
  testing::set_backward_perturbation(op, 1.0);
  CHECK_MESSAGE(broken > 1e-3, op, ": the check did not notice a 1% error in the backward (error ", broken, ")");
}

// A float64 leaf that requires grad, N(0, std^2).
inline Tensor param(const Shape& shape, Rng& rng, double std = 1.0) {
  return Tensor::randn(shape, rng, std, DType::F64).set_requires_grad();
}

// Values at least `gap` away from 0 (for ReLU's kink), random sign.
inline Tensor away_from_zero(const Shape& shape, Rng& rng, double gap = 0.05) {
  std::vector<double> v(static_cast<size_t>(numel(shape)));
  for (double& x : v) x = (rng.uniform() < 0.5 ? -1 : 1) * (gap + rng.uniform());
  return Tensor::from_vector(v, shape, DType::F64).set_requires_grad();
}

// Distinct values spaced `gap` apart in random order (no ties for max-pool).
inline Tensor distinct(const Shape& shape, Rng& rng, double gap = 0.01) {
  std::vector<double> v(static_cast<size_t>(numel(shape)));
  for (size_t i = 0; i < v.size(); ++i) v[i] = gap * static_cast<double>(i) - gap * v.size() / 2;
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[rng.below(i)]);
  return Tensor::from_vector(v, shape, DType::F64).set_requires_grad();
}

// Max relative difference of f in float32 against float64 on the same inputs.
inline double f32_vs_f64(const Fn& f, const std::vector<Tensor>& inputs64) {
  NoGradGuard no_grad;
  std::vector<Tensor> inputs32;
  for (const Tensor& t : inputs64) inputs32.push_back(is_floating(t.dtype()) ? t.to(DType::F32) : t);
  const std::vector<double> a = f(inputs64).to_vector(), b = f(inputs32).to_vector();
  double scale = 1e-30, worst = 0;
  for (double v : a) scale = std::max(scale, std::abs(v));
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]) / scale);
  return worst;
}

}  // namespace mdff::test
