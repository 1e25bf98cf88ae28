// Op values on hand-computed cases (PyTorch's conventions where they matter: batch-norm running
// statistics, nearest and bilinear indexing, max-pool padding), fused ops against the ops they replace,
// and the clear errors for bad shapes.
#include <doctest/doctest.h>
#include "tests/doctest_text.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "core/autograd.h"
#include "core/error.h"
#include "core/ops.h"
#include "core/rng.h"

using namespace mdff;

namespace {
Tensor t64(std::vector<double> v, const Shape& shape) { return Tensor::from_vector(v, shape, DType::F64); }
Tensor iota(const Shape& shape) {
  std::vector<double> v(static_cast<size_t>(numel(shape)));
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<double>(i);
  return t64(v, shape);
}
void check_close(const Tensor& t, const std::vector<double>& expected, double eps = 1e-12) {
  const std::vector<double> got = t.to_vector();
  REQUIRE(got.size() == expected.size());
  for (size_t i = 0; i < got.size(); ++i) CHECK(got[i] == doctest::Approx(expected[i]).epsilon(eps));
}
// Pair similarities in {0,1}, about a quarter of them 1, as similarity() makes them (no gradient).
Tensor similarities(const Shape& shape, Rng& rng, DType dtype) {
  std::vector<double> v = Tensor::uniform(shape, rng, 0.0, 1.0, DType::F64).to_vector();
  for (double& x : v) x = x < 0.25 ? 1.0 : 0.0;
  return Tensor::from_vector(v, shape, dtype);
}
}  // namespace

TEST_CASE("conv2d values") {
  const Tensor x = t64({1, 2, 3, 4, 5, 6, 7, 8, 9}, {1, 1, 3, 3});
  check_close(ops::conv2d(x, Tensor::full({1, 1, 2, 2}, 1.0, DType::F64), Tensor()), {12, 16, 24, 28});
  // padding 1 with a 3x3 box: each output is the sum of its neighbourhood; bias added once
  check_close(ops::conv2d(x, Tensor::full({1, 1, 3, 3}, 1.0, DType::F64), t64({0.5}, {1}), 1, 1),
              {12.5, 21.5, 16.5, 27.5, 45.5, 33.5, 24.5, 39.5, 28.5});
  // stride 2 picks every other window
  check_close(ops::conv2d(x, Tensor::full({1, 1, 1, 1}, 2.0, DType::F64), Tensor(), 2, 0), {2, 6, 14, 18});
}

TEST_CASE("conv2d equals a direct convolution, also where some taps meet only padding") {
  // The CPU backend drops the taps that only ever read padding (3x3 on 1x1 and 2x1 maps, stride 2 on
  // 2x2): the result must still be the convolution by its definition.
  struct Case {
    Shape x, w;
    int stride, padding;
  };
  Rng rng(11);
  for (const Case& c : {Case{{2, 3, 1, 1}, {4, 3, 3, 3}, 1, 1}, Case{{2, 3, 2, 2}, {4, 3, 3, 3}, 2, 1},
                        Case{{2, 3, 2, 1}, {4, 3, 3, 3}, 1, 1}, Case{{1, 2, 5, 4}, {3, 2, 3, 3}, 2, 1}}) {
    CAPTURE(shape_str(c.x));
    const Tensor x = Tensor::randn(c.x, rng).to(DType::F64), w = Tensor::randn(c.w, rng).to(DType::F64);
    const Tensor y = ops::conv2d(x, w, Tensor(), c.stride, c.padding);
    const std::vector<double> xv = x.to_vector(), wv = w.to_vector();
    const int64_t n = c.x[0], ci = c.x[1], h = c.x[2], wd = c.x[3], co = c.w[0], k = c.w[2];
    const int64_t ho = y.size(2), wo = y.size(3);
    std::vector<double> expected;
    for (int64_t b = 0; b < n; ++b)
      for (int64_t o = 0; o < co; ++o)
        for (int64_t oh = 0; oh < ho; ++oh)
          for (int64_t ow = 0; ow < wo; ++ow) {
            double sum = 0;
            for (int64_t i = 0; i < ci; ++i)
              for (int64_t ki = 0; ki < k; ++ki)
                for (int64_t kj = 0; kj < k; ++kj) {
                  const int64_t ih = oh * c.stride - c.padding + ki, iw = ow * c.stride - c.padding + kj;
                  if (ih >= 0 && ih < h && iw >= 0 && iw < wd)
                    sum += xv[((b * ci + i) * h + ih) * wd + iw] * wv[((o * ci + i) * k + ki) * k + kj];
                }
            expected.push_back(sum);
          }
    check_close(y, expected);
  }
}

TEST_CASE("batch_norm2d: batch statistics, PyTorch's running-statistics update, evaluation") {
  // channel 0 holds 1..4, channel 1 holds 10, 10, 30, 30 (N=2, H=1, W=2)
  const Tensor x = t64({1, 2, 10, 10, 3, 4, 30, 30}, {2, 2, 1, 2});
  Tensor gamma = t64({1, 2}, {2}), beta = t64({0, 1}, {2});
  Tensor rm = t64({0, 0}, {2}), rv = t64({1, 1}, {2});
  const Tensor y = ops::batch_norm2d(x, gamma, beta, rm, rv, true, 0.1, 0.0);
  const double s0 = std::sqrt(1.25);  // biased std of 1..4
  check_close(y, {-1.5 / s0, -0.5 / s0, -1, -1, 0.5 / s0, 1.5 / s0, 3, 3});
  check_close(rm, {0.1 * 2.5, 0.1 * 20});
  check_close(rv, {0.9 + 0.1 * (5.0 / 3.0), 0.9 + 0.1 * (400.0 / 3.0)});  // unbiased variance
  const Tensor e = ops::batch_norm2d(x, gamma, beta, rm, rv, false, 0.1, 1e-5);
  const std::vector<double> ev = e.to_vector(), m = rm.to_vector(), v = rv.to_vector();
  CHECK(ev[0] == doctest::Approx((1 - m[0]) / std::sqrt(v[0] + 1e-5)));
  CHECK(rm.to_vector() == m);  // evaluation leaves the running statistics alone
}

TEST_CASE("conv2d_bn_eval equals conv2d, batch_norm2d (evaluation), add and relu bit for bit") {
  // Geometries of ResNet at 32x32: 7x7/2, 3x3 on 1x1 and 2x2 maps (taps dropped), 1x1/2, 1x1.
  struct Case {
    Shape x, w;
    int stride, padding;
  };
  const Case cases[] = {{{3, 3, 12, 12}, {5, 3, 7, 7}, 2, 3}, {{2, 6, 1, 1}, {4, 6, 3, 3}, 1, 1},
                        {{2, 4, 2, 2}, {6, 4, 3, 3}, 2, 1}, {{3, 8, 4, 4}, {16, 8, 1, 1}, 2, 0},
                        {{4, 16, 3, 3}, {8, 16, 1, 1}, 1, 0}};
  for (DType dtype : {DType::F32, DType::F64}) {
    for (const Case& c : cases) {
      Rng rng(11);
      const Tensor x = Tensor::randn(c.x, rng).to(dtype), w = Tensor::randn(c.w, rng).to(dtype);
      const int64_t cout = c.w[0];
      const Tensor r = Tensor::randn({cout}, rng);
      const BatchNormEval bn{Tensor::randn({cout}, rng).to(dtype), Tensor::randn({cout}, rng).to(dtype),
                             Tensor::randn({cout}, rng).to(dtype),
                             ops::add(ops::mul(r, r), Tensor::full({cout}, 0.1)).to(dtype),  // variances > 0
                             1e-5};
      const Tensor separate_bn = ops::batch_norm2d(ops::conv2d(x, w, Tensor(), c.stride, c.padding), bn.gamma, bn.beta,
                                                   bn.running_mean, bn.running_var, false, 0.1, bn.eps);
      const Tensor residual = Tensor::randn(separate_bn.shape(), rng).to(dtype);
      NoGradGuard no_grad;
      for (bool with_residual : {false, true})
        for (bool relu : {false, true}) {
          CAPTURE(shape_str(c.x));
          CAPTURE(shape_str(c.w));
          CAPTURE(with_residual);
          CAPTURE(relu);
          Tensor expected = with_residual ? ops::add(separate_bn, residual) : separate_bn;
          if (relu) expected = ops::relu(expected);
          const Tensor fused =
              ops::conv2d_bn_eval(x, w, bn, c.stride, c.padding, with_residual ? residual : Tensor(), relu);
          CHECK(fused.to_vector() == expected.to_vector());
          // The backend's default composition (what the CUDA backend runs), in place on y, with the CPU's kernels.
          Tensor composed = Tensor::empty(expected.shape(), dtype);
          backend(Device::CPU).Backend::conv2d_bn_forward(x, w, Conv2dParams{c.stride, c.padding}, bn,
                                                          with_residual ? residual : Tensor(), relu, composed);
          CHECK(composed.to_vector() == expected.to_vector());
        }
    }
  }
}

TEST_CASE("conv2d_bn_eval refuses to run while gradients are recorded, and checks its operands") {
  Rng rng(12);
  const Tensor x = Tensor::randn({1, 2, 4, 4}, rng), w = Tensor::randn({3, 2, 3, 3}, rng);
  const BatchNormEval bn{Tensor::full({3}, 1.0), Tensor::zeros({3}), Tensor::zeros({3}), Tensor::full({3}, 1.0), 1e-5};
  CHECK_THROWS_WITH_AS(ops::conv2d_bn_eval(x, w, bn, 1, 1, Tensor(), true),
                       doctest::Contains("runs only without gradients"), Error);
  NoGradGuard no_grad;
  CHECK_THROWS_WITH_AS(ops::conv2d_bn_eval(x, w, bn, 1, 1, Tensor::zeros({1, 3, 2, 2}), true),
                       doctest::Contains("residual of shape (1,3,2,2) for an output of shape (1,3,4,4)"), Error);
  const BatchNormEval short_bn{Tensor::full({2}, 1.0), Tensor::zeros({2}), Tensor::zeros({2}), Tensor::full({2}, 1.0), 1e-5};
  CHECK_THROWS_WITH_AS(ops::conv2d_bn_eval(x, w, short_bn, 1, 1, Tensor(), true), doctest::Contains("shape (3)"),
                       Error);
}

TEST_CASE("max_pool2d 3x3 stride 2 padding 1") {
  check_close(ops::max_pool2d(iota({1, 1, 4, 4}), 3, 2, 1), {5, 7, 13, 15});
  // all-negative input: padding never wins
  check_close(ops::max_pool2d(ops::scale(ops::add(iota({1, 1, 2, 2}), t64({1}, {1})), -1.0), 3, 2, 1), {-1});
}

TEST_CASE("max_pool2d: a tie goes to the window's first maximum, the last NaN propagates (PyTorch's rules)") {
  for (DType dtype : {DType::F32, DType::F64}) {
    CAPTURE(dtype_name(dtype));
    // 3x3 of equal values, 3x3 windows of stride 2 and padding 1: the four windows' first taps inside the
    // input, in row-major order, are (0,0), (0,1), (1,0) and (1,1); each gets its window's gradient.
    const Tensor ties = Tensor::full({1, 1, 3, 3}, 2.0, dtype).set_requires_grad();
    const Tensor y = ops::max_pool2d(ties, 3, 2, 1);
    check_close(y, {2, 2, 2, 2});
    ops::sum(y).backward();
    check_close(ties.grad(), {1, 1, 0, 1, 1, 0, 0, 0, 0});
    // NaN at (0,0) and (1,1): every window holding one is NaN, and its gradient goes to its last NaN: (1,1)
    // for all four windows (the window of (0,0) holds both).
    const double nan = std::nan("");
    const Tensor with_nan = Tensor::from_vector({nan, 1, 2, 3, nan, 5, 6, 7, 8}, {1, 1, 3, 3}, dtype)
                                .set_requires_grad();
    const Tensor z = ops::max_pool2d(with_nan, 3, 2, 1);
    for (double v : z.to_vector()) CHECK(std::isnan(v));
    ops::sum(z).backward();
    check_close(with_nan.grad(), {0, 0, 0, 0, 4, 0, 0, 0, 0});
  }
}

TEST_CASE("global average pool, nearest upsampling and bilinear resizing") {
  check_close(ops::global_avg_pool(iota({1, 2, 2, 2})), {1.5, 5.5});
  // nearest 2x2 -> 3x3: source index floor(d * 2/3) = 0, 0, 1
  check_close(ops::upsample_nearest(t64({1, 2, 3, 4}, {1, 1, 2, 2}), 3, 3), {1, 1, 2, 1, 1, 2, 3, 3, 4});
  // bilinear, align_corners=False, 2x2 -> 4x4 (PyTorch's values)
  check_close(ops::resize_bilinear(t64({1, 2, 3, 4}, {1, 1, 2, 2}), 4, 4),
              {1, 1.25, 1.75, 2, 1.5, 1.75, 2.25, 2.5, 2.5, 2.75, 3.25, 3.5, 3, 3.25, 3.75, 4});
  // downscaling by 2 averages each 2x2 block (the 0.5x input of the dual-scale model)
  check_close(ops::resize_bilinear(iota({1, 1, 4, 4}), 2, 2), {2.5, 4.5, 10.5, 12.5});
  CHECK_THROWS_WITH_AS(ops::resize_bilinear(iota({1, 1, 2, 2}).set_requires_grad(), 4, 4),
                       doctest::Contains("no backward"), Error);
}

TEST_CASE("unary values: sign(0) = +1, heaviside(0) = 0, softplus is stable at large |x|") {
  check_close(ops::sign(t64({-2, 0, 3}, {3})), {-1, 1, 1});
  Tensor counts = t64({-2, 0, -0.0, 0.5, 3}, {5}).set_requires_grad();
  const Tensor step = ops::heaviside(counts);
  check_close(step, {0, 0, 0, 1, 1});
  CHECK_FALSE(step.requires_grad());  // a constant, as sign
  const std::vector<double> sp = ops::softplus(Tensor::from_vector(std::vector<float>{-100, 0, 50, 100}, {4})).to_vector();
  CHECK(sp[0] >= 0);  // log1p(e^-100) = 3.7e-44 is a denormal float: flushed to 0 (core/cpu_backend.cpp)
  CHECK(sp[0] < 1e-40);
  CHECK(sp[1] == doctest::Approx(std::log(2.0)));
  CHECK(sp[2] == 50);
  CHECK(sp[3] == 100);
}

TEST_CASE("matmul's alpha scales the product and both gradients") {
  const Tensor a = t64({1, 2, 3, 4}, {2, 2}).set_requires_grad(), b = t64({5, 6, 7, 8}, {2, 2}).set_requires_grad();
  const Tensor c = ops::matmul(a, b, false, true, 0.5);  // 0.5 a b^T
  check_close(c, {8.5, 11.5, 19.5, 26.5});
  ops::sum(c).backward();
  check_close(a.grad(), {6, 7, 6, 7});  // 0.5 (1 1) b: the column sums of b, halved, in every row
  check_close(b.grad(), {2, 3, 2, 3});  // 0.5 (1 1) a
}

TEST_CASE("pairwise_logistic_loss equals mean(softplus(theta) - s theta), forward and backward") {
  Rng rng(6);
  for (DType dtype : {DType::F64, DType::F32}) {
    // (64,600) is above the CPU's parallel grain: the reduction and the backward run over the threads
    for (const Shape& shape : {Shape{3, 5}, Shape{64, 600}}) {
      CAPTURE(dtype_name(dtype));
      CAPTURE(shape_str(shape));
      Tensor theta = Tensor::randn(shape, rng, 8.0, dtype).set_requires_grad();  // |theta| reaches L/2 = 24
      const Tensor s = similarities(shape, rng, dtype), upstream = Tensor::full({}, 1.7, dtype);
      // The loss and theta's gradient for an upstream gradient other than 1.
      auto run = [&](const std::function<Tensor()>& f) {
        theta.zero_grad();
        const Tensor loss = f();
        loss.backward(upstream);
        return std::make_pair(loss.item(), theta.grad().to_vector());
      };
      const auto [fused, fused_grad] = run([&] { return ops::pairwise_logistic_loss(theta, s); });
      const auto [composed, composed_grad] =
          run([&] { return ops::mean(ops::sub(ops::softplus(theta), ops::mul(s, theta))); });
      CHECK(std::abs(fused - composed) <= 1e-6 * std::abs(composed));
      // Gradients relative to the largest: where sigmoid(theta) ~ s, the composition's two rounded
      // products g sigmoid(theta) and g s cancel, and its element-wise relative error is large in float32.
      double largest = 0, worst = 0;
      for (size_t i = 0; i < composed_grad.size(); ++i) {
        largest = std::max(largest, std::abs(composed_grad[i]));
        worst = std::max(worst, std::abs(fused_grad[i] - composed_grad[i]));
      }
      CHECK(largest > 0);
      CHECK(worst <= 1e-6 * largest);
    }
  }
}

TEST_CASE("pairwise_logistic_loss is stable at large |theta| and checks its operands") {
  for (DType dtype : {DType::F64, DType::F32}) {
    CAPTURE(dtype_name(dtype));
    Tensor theta = Tensor::from_vector(std::vector<double>{1e3, 1e3, -1e3, -1e3}, {2, 2}, dtype).set_requires_grad();
    const Tensor s = Tensor::from_vector(std::vector<double>{1, 0, 1, 0}, {2, 2}, dtype);
    const Tensor loss = ops::pairwise_logistic_loss(theta, s);
    // softplus(1e3) - 1e3 = 0, softplus(1e3) = 1e3, softplus(-1e3) + 1e3 = 1e3, softplus(-1e3) = 0
    CHECK(loss.item() == 500.0);
    loss.backward();
    check_close(theta.grad(), {0, 0.25, -0.25, 0});  // (sigmoid(theta) - s) / 4
  }
  Rng rng(7);
  const Tensor theta = Tensor::randn({2, 3}, rng).set_requires_grad();
  CHECK_THROWS_WITH_AS(ops::pairwise_logistic_loss(theta, Tensor::zeros({3, 2})),
                       doctest::Contains("theta (2,3) and s (3,2) must have the same shape"), Error);
  CHECK_THROWS_WITH_AS(ops::pairwise_logistic_loss(theta, Tensor::zeros({2, 3}, DType::F64)),
                       doctest::Contains("different dtypes"), Error);
  CHECK_THROWS_WITH_AS(ops::pairwise_logistic_loss(theta, Tensor::zeros({2, 3}).set_requires_grad()),
                       doctest::Contains("must not require grad"), Error);
  CHECK_THROWS_WITH_AS(ops::pairwise_logistic_loss(Tensor::zeros({0, 3}), Tensor::zeros({0, 3})),
                       doctest::Contains("no pairs"), Error);
}

// The largest difference between two gradient vectors, relative to the largest |composed| element.
double relative_gap(const std::vector<double>& fused, const std::vector<double>& composed) {
  REQUIRE(fused.size() == composed.size());
  double largest = 0, worst = 0;
  for (size_t i = 0; i < composed.size(); ++i) {
    largest = std::max(largest, std::abs(composed[i]));
    worst = std::max(worst, std::abs(fused[i] - composed[i]));
  }
  REQUIRE(largest > 0);
  return worst / largest;
}

TEST_CASE("the fused J2 and J3 (quantization_loss, cross_entropy) equal their compositions, forward and backward") {
  Rng rng(8);
  for (DType dtype : {DType::F64, DType::F32}) {
    CAPTURE(dtype_name(dtype));
    const double bound = dtype == DType::F64 ? 1e-13 : 1e-6;  // rounding of T: a few ulps
    const Tensor upstream = Tensor::full({}, 1.7, dtype);
    // The loss and x's gradient for an upstream gradient other than 1.
    auto run = [&](Tensor& x, const std::function<Tensor()>& f) {
      x.zero_grad();
      const Tensor loss = f();
      loss.backward(upstream);
      return std::make_pair(loss.item(), x.grad().to_vector());
    };
    // (64,600) is above the CPU's parallel grain: the ordered sum runs over the threads
    for (const Shape& shape : {Shape{4, 8}, Shape{64, 600}}) {
      CAPTURE(shape_str(shape));
      Tensor u = Tensor::uniform(shape, rng, -1.0, 1.0, dtype).set_requires_grad();
      const auto [fused, fused_grad] = run(u, [&] { return ops::quantization_loss(u); });
      const auto [composed, composed_grad] = run(u, [&] {
        const Tensor d = ops::sub(ops::sign(u), u);
        return ops::scale(ops::sum(ops::mul(d, d)), 1.0 / static_cast<double>(shape[0]));
      });
      CHECK(std::abs(fused - composed) <= bound * std::abs(composed));
      CHECK(relative_gap(fused_grad, composed_grad) <= bound);
    }
    // soft targets (rows summing to about 1) and multi-hot rows of 0s and 2s: the gradient's softmax term
    // scales with each row's total
    Tensor logits = Tensor::randn({16, 10}, rng, 3.0, dtype).set_requires_grad();
    const Tensor soft = Tensor::uniform({16, 10}, rng, 0.0, 0.2, dtype);
    const Tensor multi_hot = ops::add(ops::sign(ops::add(Tensor::uniform({16, 10}, rng, 0.0, 1.0, dtype),
                                                         Tensor::full({}, -0.7, dtype))),
                                      Tensor::full({}, 1.0, dtype));  // 0 or 2
    for (const Tensor& target : {soft, multi_hot}) {
      const auto [fused, fused_grad] = run(logits, [&] { return ops::cross_entropy(logits, target); });
      const auto [composed, composed_grad] = run(logits, [&] {
        return ops::scale(ops::sum(ops::mul(target, ops::log_softmax(logits))), -1.0 / 16.0);
      });
      CHECK(std::abs(fused - composed) <= bound * std::abs(composed));
      CHECK(relative_gap(fused_grad, composed_grad) <= bound);
    }
  }
  const Tensor logits = Tensor::zeros({2, 3});
  CHECK_THROWS_WITH_AS(ops::cross_entropy(logits, Tensor::zeros({2, 3}).set_requires_grad()),
                       doctest::Contains("must not require grad"), Error);
  CHECK_THROWS_WITH_AS(ops::cross_entropy(Tensor::zeros({2, 0}), Tensor::zeros({2, 0})),
                       doctest::Contains("N, K >= 1"), Error);
  CHECK_THROWS_WITH_AS(ops::quantization_loss(Tensor::zeros({8})), doctest::Contains("u (N,L)"), Error);
  CHECK_THROWS_WITH_AS(ops::quantization_loss(Tensor::zeros({0, 8})), doctest::Contains("holds no codes"), Error);
}

TEST_CASE("log_softmax and cross-entropy") {
  const Tensor logits = t64({1, 2, 3, 1000, 1000, -1000}, {2, 3});
  const std::vector<double> ls = ops::log_softmax(logits).to_vector();
  for (double v : ls) CHECK(std::isfinite(v));
  CHECK(std::exp(ls[0]) + std::exp(ls[1]) + std::exp(ls[2]) == doctest::Approx(1.0));
  CHECK(ls[3] == doctest::Approx(-std::log(2.0)));
  // one-hot targets: the mean of -log p(label)
  const double ce = ops::cross_entropy(logits, t64({0, 0, 1, 1, 0, 0}, {2, 3})).item();
  CHECK(ce == doctest::Approx(-(ls[2] + ls[3]) / 2));
}

TEST_CASE("gather_rows and scatter_rows_ keep the U matrix") {
  Tensor u = Tensor::zeros({4, 2}, DType::F64);
  const Tensor rows = Tensor::from_vector(std::vector<int32_t>{2, 0}, {2});
  ops::scatter_rows_(u, rows, t64({1, 2, 3, 4}, {2, 2}));
  check_close(u, {3, 4, 0, 0, 1, 2, 0, 0});
  check_close(ops::gather_rows(u, rows), {1, 2, 3, 4});
  const Tensor bad = Tensor::from_vector(std::vector<int32_t>{4}, {1});
  CHECK_THROWS_WITH_AS(ops::gather_rows(u, bad), doctest::Contains("row index 4 at position 0 is outside [0, 4)"),
                       Error);
  CHECK_THROWS_WITH_AS(ops::scatter_rows_(u, rows, t64({1, 2, 3}, {1, 3})), doctest::Contains("source of shape"),
                       Error);
}

TEST_CASE("the fused ReLUs equal the separate ops bit for bit, forward and backward") {
  Rng rng(4);
  const Tensor rm = Tensor::zeros({3}), rv = Tensor::full({3}, 1.0);
  Tensor x = Tensor::randn({4, 3, 5, 5}, rng), gamma = Tensor::randn({3}, rng), beta = Tensor::randn({3}, rng);
  Tensor r = Tensor::randn({4, 3, 5, 5}, rng);
  for (Tensor* t : {&x, &gamma, &beta, &r}) t->set_requires_grad(true);
  const Tensor upstream = Tensor::randn({4, 3, 5, 5}, rng);
  // Runs f, backpropagates `upstream` and returns the output and every input gradient, flattened.
  auto run = [&](const std::function<Tensor()>& f) {
    for (Tensor* t : {&x, &gamma, &beta, &r}) t->zero_grad();
    const Tensor y = f();
    y.backward(upstream);
    std::vector<double> all = y.to_vector();
    for (Tensor* t : {&x, &gamma, &beta, &r}) {
      if (!t->grad().defined()) continue;  // r, until the second comparison uses it
      const std::vector<double> g = t->grad().to_vector();
      all.insert(all.end(), g.begin(), g.end());
    }
    return all;
  };
  CHECK(run([&] { return ops::batch_norm2d_relu(x, gamma, beta, rm, rv, true); }) ==
        run([&] { return ops::relu(ops::batch_norm2d(x, gamma, beta, rm, rv, true)); }));
  CHECK(run([&] { return ops::add_relu(ops::batch_norm2d(x, gamma, beta, rm, rv, false), r); }) ==
        run([&] { return ops::relu(ops::add(ops::batch_norm2d(x, gamma, beta, rm, rv, false), r)); }));
  CHECK_THROWS_WITH_AS(ops::add_relu(x, gamma), doctest::Contains("must have the same shape"), Error);
}

TEST_CASE("pack_signs and hamming_distances count differing signs") {
  Rng rng(3);
  // 70 bits: three words, the last one partly used; zeros count as +1, as ops::sign.
  Tensor x = Tensor::randn({5, 70}, rng);
  x.data<float>()[3] = 0.0f;
  x.data<float>()[70 + 69] = -0.0f;
  const Tensor codes = ops::pack_signs(x);
  REQUIRE(codes.shape() == Shape{5, 3});
  const Tensor signs = ops::sign(x);
  const Tensor distances = ops::hamming_distances(codes, codes);
  REQUIRE(distances.shape() == Shape{5, 5});
  for (int64_t i = 0; i < 5; ++i)
    for (int64_t j = 0; j < 5; ++j) {
      int expected = 0;
      for (int64_t b = 0; b < 70; ++b) expected += signs.data<float>()[i * 70 + b] != signs.data<float>()[j * 70 + b];
      CHECK(distances.data<int32_t>()[i * 5 + j] == expected);
    }
  const auto* words = reinterpret_cast<const uint32_t*>(codes.data<int32_t>());
  const uint32_t zero_bit = words[0] >> 3 & 1u, minus_zero_bit = words[3 + 2] >> 5 & 1u, unused = words[2] >> 6;
  CHECK(zero_bit == 1u);        // x = +0 sets its bit
  CHECK(minus_zero_bit == 1u);  // -0 too (-0 >= 0): bit 69 is bit 5 of word 2
  CHECK(unused == 0u);          // the unused high bits of the last word stay 0
  CHECK_THROWS_WITH_AS(ops::hamming_distances(codes, ops::pack_signs(Tensor::randn({2, 10}, rng))),
                       doctest::Contains("hamming_distances: needs I32 codes"), Error);
}

TEST_CASE("hamming_top_k ranks by distance with ties by index, and stops at k") {
  Rng rng(5);
  // 40-bit codes from few distinct values, so that many distances tie.
  Tensor db = Tensor::randn({300, 40}, rng), queries = Tensor::randn({4, 40}, rng);
  for (Tensor* t : {&db, &queries})
    for (int64_t i = 0; i < t->numel(); ++i) t->data<float>()[i] = (i % 40 < 34) ? 1.0f : t->data<float>()[i];
  const Tensor db_codes = ops::pack_signs(db), query_codes = ops::pack_signs(queries);
  const Tensor all = ops::hamming_distances(query_codes, db_codes);
  for (int64_t k : {1, 17, 300, 1000}) {
    const auto [indices, distances] = ops::hamming_top_k(query_codes, db_codes, k);
    const int64_t kept = std::min<int64_t>(k, 300);
    REQUIRE(indices.shape() == Shape{4, kept});
    for (int64_t q = 0; q < 4; ++q) {
      std::vector<std::pair<int32_t, int32_t>> expected;  // (distance, index), sorted: the reference ranking
      for (int32_t j = 0; j < 300; ++j) expected.emplace_back(all.data<int32_t>()[q * 300 + j], j);
      std::sort(expected.begin(), expected.end());
      for (int64_t r = 0; r < kept; ++r) {
        CAPTURE(q);
        CAPTURE(r);
        CHECK(indices.data<int32_t>()[q * kept + r] == expected[r].second);
        CHECK(distances.data<int32_t>()[q * kept + r] == expected[r].first);
      }
    }
  }
  CHECK_THROWS_WITH_AS(ops::hamming_top_k(query_codes, db_codes, 0), doctest::Contains("k must be at least 1"), Error);
}

TEST_CASE("count_non_finite_ adds the NaN and infinite elements of a list of tensors") {
  Tensor x = Tensor::zeros({100000});  // above the parallel grain
  x.data<float>()[7] = std::nanf("");
  x.data<float>()[99999] = -INFINITY;
  x.data<float>()[500] = 3e38f;  // large but finite
  Tensor y = Tensor::zeros({2, 3});
  y.data<float>()[5] = INFINITY;
  Tensor count = Tensor::zeros({}, DType::I32);
  ops::count_non_finite_({x}, count);
  CHECK(count.item() == 2);
  ops::count_non_finite_({x.to(DType::F64)}, count);
  CHECK(count.item() == 4);  // adds
  ops::count_non_finite_({y, Tensor::zeros({0}), x}, count);
  CHECK(count.item() == 7);
  ops::count_non_finite_({}, count);
  CHECK(count.item() == 7);
  CHECK_THROWS_WITH_AS(ops::count_non_finite_({x}, x), doctest::Contains("the count must be one I32"), Error);
  CHECK_THROWS_WITH_AS(ops::count_non_finite_({x, x.to(DType::F64)}, count), doctest::Contains("mix"), Error);
  CHECK_THROWS_WITH_AS(ops::count_non_finite_({count}, count), doctest::Contains("float"), Error);
}

TEST_CASE("shape errors are clear exceptions") {
  Rng rng(1);
  const Tensor x = Tensor::randn({2, 3, 8, 8}, rng);
  CHECK_THROWS_WITH_AS(ops::conv2d(x, Tensor::randn({4, 5, 3, 3}, rng), Tensor()),
                       doctest::Contains("input has 3 channels but the weight (4,5,3,3) expects 5"), Error);
  CHECK_THROWS_WITH_AS(ops::conv2d(x, Tensor::randn({4, 3, 9, 9}, rng), Tensor()),
                       doctest::Contains("does not fit"), Error);
  CHECK_THROWS_WITH_AS(ops::conv2d(x.reshape({6, 64}), Tensor::randn({4, 3, 3, 3}, rng), Tensor()),
                       doctest::Contains("must have 4 dimensions"), Error);
  CHECK_THROWS_WITH_AS(ops::concat({x, Tensor::randn({2, 3, 4, 8}, rng)}, 1),
                       doctest::Contains("part 1 has shape (2,3,4,8), incompatible"), Error);
  CHECK_THROWS_WITH_AS(ops::concat({x, Tensor::randn({2, 3, 8}, rng)}, 0), doctest::Contains("incompatible"), Error);
  // int32 parts (the trainer gathers its step counts this way), but not mixed with float ones
  const Tensor ints = Tensor::from_vector(std::vector<int32_t>{7, -2}, {2});
  CHECK(ops::concat({ints, Tensor::from_vector(std::vector<int32_t>{5}, {1})}, 0).to_vector() ==
        std::vector<double>{7, -2, 5});
  CHECK_THROWS_WITH_AS(ops::concat({ints, Tensor::zeros({1})}, 0), doctest::Contains("dtype"), Error);
  CHECK_THROWS_WITH_AS(ops::add(x, Tensor::randn({4}, rng)), doctest::Contains("do not broadcast"), Error);
  CHECK_THROWS_WITH_AS(ops::matmul(Tensor::randn({2, 3}, rng), Tensor::randn({4, 5}, rng)),
                       doctest::Contains("inner dimensions differ"), Error);
  CHECK_THROWS_WITH_AS(ops::linear(Tensor::randn({2, 3}, rng), Tensor::randn({5, 4}, rng), Tensor()),
                       doctest::Contains("input has 3 features"), Error);
  Tensor c3 = Tensor::zeros({3}), c4 = Tensor::zeros({4});
  CHECK_THROWS_WITH_AS(ops::batch_norm2d(x, c4, c4, c4, c4, true), doctest::Contains("must have shape (3)"), Error);
  CHECK_THROWS_WITH_AS(ops::batch_norm2d(Tensor::zeros({1, 3, 1, 1}), c3, c3, c3, c3, true),
                       doctest::Contains("more than one value per channel"), Error);
  CHECK_THROWS_WITH_AS(ops::add(x, x.to(DType::F64)), doctest::Contains("different dtypes"), Error);
  CHECK_THROWS_WITH_AS(ops::max_pool2d(x, 3, 2, 2), doctest::Contains("at most half the kernel"), Error);
  CHECK_THROWS_WITH_AS(ops::cross_entropy(Tensor::zeros({2, 3}), Tensor::zeros({2, 4})),
                       doctest::Contains("same shape"), Error);
  CHECK_THROWS_WITH_AS(ops::relu(Tensor::zeros({2}, DType::I32)), doctest::Contains("must be float32 or float64"),
                       Error);
}
