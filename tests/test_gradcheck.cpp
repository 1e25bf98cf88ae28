// Gradient checks (float64, central differences) for every op, each also shown to fail when its
// backward is perturbed; and each op's float32 forward against its float64 forward.
#include "tests/gradcheck.h"

#include "core/backend.h"

using namespace mdff;
using mdff::test::check_op;
using mdff::test::f32_vs_f64;
using mdff::test::param;
using Ts = std::vector<Tensor>;

namespace {
constexpr double kF32Tolerance = 1e-5;  // relative to the largest output value
}

TEST_CASE("elementwise ops with broadcasting") {
  Rng rng(1);
  const std::vector<std::pair<Shape, Shape>> shapes = {
      {{4, 3, 5, 5}, {1, 3, 1, 1}}, {{8, 16}, {16}}, {{2, 3}, {2, 3}}, {{3, 1}, {1, 4}},
      // the CPU backend's fast paths: a scalar on either side, a repeating row on the left
      {{5, 4}, {}}, {{}, {5, 4}}, {{1, 16}, {8, 16}}};
  for (const auto& operands : shapes) {
    // CAPTURE captures in a lambda, which in C++17 cannot name a structured binding.
    const Shape& sa = operands.first;
    const Shape& sb = operands.second;
    CAPTURE(shape_str(sa));
    CAPTURE(shape_str(sb));
    const Ts in{param(sa, rng), param(sb, rng)};
    check_op("add", [](const Ts& t) { return ops::add(t[0], t[1]); }, in);
    check_op("sub", [](const Ts& t) { return ops::sub(t[0], t[1]); }, in);
    check_op("mul", [](const Ts& t) { return ops::mul(t[0], t[1]); }, in);
    const Ts away{in[0], test::away_from_zero(sb, rng, 0.5)};  // a divisor away from 0
    check_op("div", [](const Ts& t) { return ops::div(t[0], t[1]); }, away);
    CHECK(f32_vs_f64([](const Ts& t) { return ops::div(t[0], t[1]); }, away) < kF32Tolerance);
    CHECK(f32_vs_f64([](const Ts& t) { return ops::mul(t[0], t[1]); }, in) < kF32Tolerance);
  }
}

TEST_CASE("a tensor used twice by mul gets both gradients") {
  Rng rng(2);
  check_op("mul", [](const Ts& t) { return ops::mul(t[0], t[0]); }, {param({3, 4}, rng)});
}

TEST_CASE("unary ops") {
  Rng rng(3);
  const Ts kinkless{test::away_from_zero({2, 3, 4, 5}, rng)};
  check_op("relu", [](const Ts& t) { return ops::relu(t[0]); }, kinkless);
  check_op("scale", [](const Ts& t) { return ops::scale(t[0], -2.5); }, {param({7}, rng)});
  check_op("tanh", [](const Ts& t) { return ops::tanh(t[0]); }, {param({4, 6}, rng, 1.5)});
  // softplus at ordinary and at large |x| (the stable form must keep its gradient exact there)
  check_op("softplus", [](const Ts& t) { return ops::softplus(t[0]); }, {param({4, 6}, rng, 3.0)});
  check_op("softplus", [](const Ts& t) { return ops::softplus(t[0]); },
           {Tensor::from_vector(std::vector<double>{-40, -25, 25, 40}, {4}, DType::F64).set_requires_grad()});
  for (auto fn : {+[](const Ts& t) { return ops::relu(t[0]); }, +[](const Ts& t) { return ops::tanh(t[0]); },
                  +[](const Ts& t) { return ops::softplus(t[0]); }, +[](const Ts& t) { return ops::sign(t[0]); }})
    CHECK(f32_vs_f64(fn, {param({50}, rng, 4.0)}) < kF32Tolerance);
}

TEST_CASE("reductions") {
  Rng rng(4);
  check_op("sum", [](const Ts& t) { return ops::sum(t[0]); }, {param({3, 4, 5}, rng)});
  check_op("scale", [](const Ts& t) { return ops::mean(t[0]); }, {param({3, 4, 5}, rng)});
  CHECK(f32_vs_f64([](const Ts& t) { return ops::mean(t[0]); }, {param({1000}, rng)}) < kF32Tolerance);
}

TEST_CASE("the fused pairwise logistic loss, at ordinary and at large |theta|") {
  Rng rng(14);
  std::vector<double> pattern(35);
  for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = i % 3 == 0 ? 1.0 : 0.0;
  const Tensor s = Tensor::from_vector(pattern, {5, 7}, DType::F64);  // constant similarities: no gradient
  const auto loss = [](const Ts& t) { return ops::pairwise_logistic_loss(t[0], t[1]); };
  const Ts in{param({5, 7}, rng, 3.0), s};
  check_op("pairwise_logistic_loss", loss, in);
  CHECK(f32_vs_f64(loss, in) < kF32Tolerance);
  // saturated sigmoids, each way, with and without a shared label: gradients near 0 and near +-1/4
  check_op("pairwise_logistic_loss", loss,
           {Tensor::from_vector(std::vector<double>{-40, -25, 25, 40}, {2, 2}, DType::F64).set_requires_grad(),
            Tensor::from_vector(std::vector<double>{0, 1, 0, 1}, {2, 2}, DType::F64)});
}

TEST_CASE("the fused quantization loss") {
  Rng rng(15);
  const auto loss = [](const Ts& t) { return ops::quantization_loss(t[0]); };
  // away from 0, where sign(u) jumps and a finite difference across the jump would see it
  const Ts in{test::away_from_zero({4, 6}, rng)};
  check_op("quantization_loss", loss, in);
  CHECK(f32_vs_f64(loss, in) < kF32Tolerance);
}

TEST_CASE("matmul with every transpose combination") {
  Rng rng(5);
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      CAPTURE(ta);
      CAPTURE(tb);
      const Shape sa = ta ? Shape{4, 3} : Shape{3, 4}, sb = tb ? Shape{5, 4} : Shape{4, 5};
      const Ts in{param(sa, rng), param(sb, rng)};
      check_op("matmul", [=](const Ts& t) { return ops::matmul(t[0], t[1], ta, tb); }, in);
      check_op("matmul", [=](const Ts& t) { return ops::matmul(t[0], t[1], ta, tb, -0.75); }, in);
      CHECK(f32_vs_f64([=](const Ts& t) { return ops::matmul(t[0], t[1], ta, tb); }, in) < kF32Tolerance);
    }
  // U-matrix shape of the pairwise loss: theta = 0.5 * u U^T (alpha inside the GEMM), batch against all rows
  check_op("matmul", [](const Ts& t) { return ops::matmul(t[0], t[1], false, true, 0.5); },
           {param({4, 12}, rng), param({9, 12}, rng)});
  check_op("matmul", [](const Ts& t) { return ops::matmul(t[0], t[1], true, false, -1.5); },
           {param({12, 4}, rng), param({12, 9}, rng)});
}

TEST_CASE("linear") {
  Rng rng(6);
  const Ts in{param({5, 7}, rng), param({3, 7}, rng), param({3}, rng)};
  check_op("linear", [](const Ts& t) { return ops::linear(t[0], t[1], t[2]); }, in);
  check_op("linear", [](const Ts& t) { return ops::linear(t[0], t[1], Tensor()); }, {in[0], in[1]});
  CHECK(f32_vs_f64([](const Ts& t) { return ops::linear(t[0], t[1], t[2]); }, in) < kF32Tolerance);
}

TEST_CASE("conv2d in ResNet50's configurations") {
  struct Case {
    const char* what;
    Shape x, w;
    int stride, padding;
    bool bias;
  };
  const Case cases[] = {
      {"7x7 stride 2 (stem)", {2, 3, 11, 9}, {4, 3, 7, 7}, 2, 3, false},
      {"3x3 stride 1", {2, 4, 6, 5}, {3, 4, 3, 3}, 1, 1, false},
      {"3x3 stride 2 (v1.5 downsampling)", {3, 3, 7, 8}, {5, 3, 3, 3}, 2, 1, false},
      {"1x1 stride 1 with bias (lateral)", {2, 6, 4, 3}, {5, 6, 1, 1}, 1, 0, true},
      {"1x1 stride 2 (shortcut)", {2, 4, 7, 6}, {6, 4, 1, 1}, 2, 0, false},
      {"3x3 on a 1x1 map", {4, 3, 1, 1}, {2, 3, 3, 3}, 1, 1, true},
      // taps that only meet padding are dropped by the CPU backend: these keep 2x2, 1x1 and 3x1 of 3x3
      {"3x3 stride 2 on a 2x2 map", {2, 3, 2, 2}, {4, 3, 3, 3}, 2, 1, false},
      {"3x3 stride 2 on a 1x1 map", {2, 3, 1, 1}, {4, 3, 3, 3}, 2, 1, false},
      {"3x3 on a 2x1 map", {2, 3, 2, 1}, {4, 3, 3, 3}, 1, 1, true},
  };
  Rng rng(7);
  for (const Case& c : cases) {
    CAPTURE(c.what);
    Ts in{param(c.x, rng), param(c.w, rng, 0.5)};
    if (c.bias) in.push_back(param({c.w[0]}, rng));
    const int s = c.stride, p = c.padding;
    auto f = [s, p](const Ts& t) { return ops::conv2d(t[0], t[1], t.size() > 2 ? t[2] : Tensor(), s, p); };
    check_op("conv2d", f, in);
    CHECK(f32_vs_f64(f, in) < kF32Tolerance);
  }
}

TEST_CASE("conv2d over a batch larger than one im2col group") {
  // 80 samples of a 3x3 conv at 24x24 exceed the 32 MiB im2col buffer in float64: several groups.
  Rng rng(8);
  Tensor x = Tensor::randn({80, 16, 24, 24}, rng, 1.0, DType::F64), w = Tensor::randn({8, 16, 3, 3}, rng, 0.2, DType::F64);
  const Tensor all = ops::conv2d(x, w, Tensor(), 1, 1);
  Tensor last = Tensor::empty({1, 16, 24, 24}, DType::F64);
  std::copy(x.data<double>() + 79 * 16 * 576, x.data<double>() + 80 * 16 * 576, last.data<double>());
  const std::vector<double> a = all.to_vector(), b = ops::conv2d(last, w, Tensor(), 1, 1).to_vector();
  for (size_t i = 0; i < b.size(); ++i) REQUIRE(a[79 * b.size() + i] == doctest::Approx(b[i]).epsilon(1e-12));
}

TEST_CASE("batch_norm2d in training and in evaluation") {
  Rng rng(9);
  Tensor rm = Tensor::zeros({3}, DType::F64), rv = Tensor::full({3}, 1.0, DType::F64);
  const Ts in{param({4, 3, 3, 2}, rng, 2.0), param({3}, rng), param({3}, rng)};
  check_op("batch_norm2d", [&](const Ts& t) { return ops::batch_norm2d(t[0], t[1], t[2], rm, rv, true); }, in);
  CHECK(f32_vs_f64([](const Ts& t) { return ops::batch_norm2d(t[0], t[1], t[2], t[3], t[4], true); },
                   {in[0], in[1], in[2], rm, rv}) < kF32Tolerance);
  Tensor rm_eval = Tensor::randn({3}, rng, 1.0, DType::F64), rv_eval = Tensor::uniform({3}, rng, 0.5, 2.0, DType::F64);
  check_op("batch_norm2d",
           [&](const Ts& t) { return ops::batch_norm2d(t[0], t[1], t[2], rm_eval, rv_eval, false); }, in);
}

TEST_CASE("the fused batch_norm2d_relu and add_relu") {
  Rng rng(10);
  Tensor rm = Tensor::zeros({3}, DType::F64), rv = Tensor::full({3}, 1.0, DType::F64);
  const Ts in{param({4, 3, 3, 2}, rng, 2.0), param({3}, rng), param({3}, rng)};
  for (bool training : {true, false})
    check_op("batch_norm2d_relu",
             [&](const Ts& t) { return ops::batch_norm2d_relu(t[0], t[1], t[2], rm, rv, training); }, in);
  check_op("add_relu", [](const Ts& t) { return ops::add_relu(t[0], t[1]); },
           {param({2, 3, 4}, rng), param({2, 3, 4}, rng)});
}

TEST_CASE("pooling and resizing") {
  Rng rng(10);
  check_op("max_pool2d", [](const Ts& t) { return ops::max_pool2d(t[0], 3, 2, 1); }, {test::distinct({2, 3, 7, 6}, rng)});
  check_op("global_avg_pool", [](const Ts& t) { return ops::global_avg_pool(t[0]); }, {param({3, 4, 5, 2}, rng)});
  for (const auto& size : {std::pair<int64_t, int64_t>{6, 4}, {5, 7}, {3, 2}}) {  // 2x, not a multiple, identity
    const int64_t h = size.first, w = size.second;
    CAPTURE(h);
    check_op("upsample_nearest", [h, w](const Ts& t) { return ops::upsample_nearest(t[0], h, w); },
             {param({2, 3, 3, 2}, rng)});
  }
  const Ts in{test::distinct({2, 3, 9, 9}, rng)};
  CHECK(f32_vs_f64([](const Ts& t) { return ops::max_pool2d(t[0], 3, 2, 1); }, in) < kF32Tolerance);
  CHECK(f32_vs_f64([](const Ts& t) { return ops::global_avg_pool(t[0]); }, in) < kF32Tolerance);
  CHECK(f32_vs_f64([](const Ts& t) { return ops::upsample_nearest(t[0], 13, 17); }, in) < kF32Tolerance);
  CHECK(f32_vs_f64([](const Ts& t) { return ops::resize_bilinear(t[0].detach(), 5, 14); }, in) < kF32Tolerance);
}

TEST_CASE("concat along channels, features and rows") {
  Rng rng(11);
  check_op("concat", [](const Ts& t) { return ops::concat(t, 1); },
           {param({2, 3, 2, 2}, rng), param({2, 1, 2, 2}, rng), param({2, 4, 2, 2}, rng)});
  check_op("concat", [](const Ts& t) { return ops::concat(t, 1); }, {param({3, 4}, rng), param({3, 2}, rng)});
  check_op("concat", [](const Ts& t) { return ops::concat(t, 0); }, {param({3, 4}, rng), param({1, 4}, rng)});
  check_op("concat", [](const Ts& t) { return ops::concat(t, -1); }, {param({2, 2, 3}, rng), param({2, 2, 1}, rng)});
}

TEST_CASE("log_softmax and cross-entropy with soft targets") {
  Rng rng(12);
  check_op("log_softmax", [](const Ts& t) { return ops::log_softmax(t[0]); }, {param({4, 5}, rng, 3.0)});
  // a normalised multi-hot target (multi-label J3) and a one-hot one
  Tensor target = Tensor::from_vector(std::vector<double>{0.5, 0, 0.5, 0, 0, 0, 1, 0, 1.0 / 3, 1.0 / 3, 1.0 / 3, 0},
                                      {3, 4}, DType::F64);
  check_op("cross_entropy", [&](const Ts& t) { return ops::cross_entropy(t[0], target); }, {param({3, 4}, rng, 2.0)});
  // rows whose target does not sum to 1 (raw multi-hot labels): the gradient's softmax term scales with it
  const Tensor multi_hot = Tensor::from_vector(std::vector<double>{1, 0, 1, 0, 0, 0, 1, 0, 1, 1, 1, 0}, {3, 4}, DType::F64);
  check_op("cross_entropy", [&](const Ts& t) { return ops::cross_entropy(t[0], multi_hot); }, {param({3, 4}, rng, 2.0)});
  CHECK(f32_vs_f64([](const Ts& t) { return ops::cross_entropy(t[0], t[1]); }, {param({3, 4}, rng), target}) <
        kF32Tolerance);
}

TEST_CASE("gather_rows with repeated rows, and reshape") {
  Rng rng(13);
  const Tensor index = Tensor::from_vector(std::vector<int32_t>{3, 0, 3, 1}, {4});
  check_op("gather_rows", [&](const Ts& t) { return ops::gather_rows(t[0], index); }, {param({5, 3}, rng)});
  check_op("reshape", [](const Ts& t) { return ops::mul(t[0].reshape({3, -1}), t[1]); },
           {param({2, 3, 2}, rng), param({3, 4}, rng)});
}

TEST_CASE("a small network end to end: conv, bn, relu, pool, FPN-style reuse, heads") {
  // Every op of the MDFF-SH data flow in one graph, with a tensor (the coarse map) feeding two consumers.
  Rng rng(14);
  Tensor rm = Tensor::zeros({4}, DType::F64), rv = Tensor::full({4}, 1.0, DType::F64);
  auto net = [&](const Ts& t) {
    Tensor h = ops::relu(ops::batch_norm2d(ops::conv2d(t[0], t[1], Tensor(), 2, 1), t[2], t[3], rm, rv, true));
    Tensor coarse = ops::max_pool2d(h, 3, 2, 1);                                      // (2,4,2,2)
    Tensor fused = ops::add(h, ops::upsample_nearest(coarse, h.size(2), h.size(3)));  // top-down path
    Tensor g = ops::concat({ops::global_avg_pool(fused), ops::global_avg_pool(coarse)}, 1);  // (2,8)
    return ops::tanh(ops::linear(g, t[4], t[5]));
  };
  check_op("conv2d", net,
           {param({2, 3, 7, 7}, rng), param({4, 3, 3, 3}, rng, 0.5), param({4}, rng), param({4}, rng),
            param({5, 8}, rng), param({5}, rng)});
}
