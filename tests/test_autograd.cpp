// Autograd semantics: accumulation into .grad (a leaf's first gradient kept without a copy when it can be),
// summed gradients for reused tensors, no-grad mode, graph release, and the errors a user can run into.
#include <doctest/doctest.h>
#include "tests/doctest_text.h"

#include <cmath>

#include "core/autograd.h"
#include "core/backend.h"
#include "core/error.h"
#include "core/ops.h"

using namespace mdff;

namespace {
Tensor leaf(std::vector<double> v) {
  const int64_t n = static_cast<int64_t>(v.size());
  return Tensor::from_vector(v, {n}, DType::F64).set_requires_grad();
}
}  // namespace

TEST_CASE("backward twice accumulates twice the gradient") {
  Tensor x = leaf({1, 2, 3});
  Tensor y = ops::sum(ops::mul(x, x));  // dy/dx = 2x
  y.backward(Tensor(), /*retain_graph=*/true);
  CHECK(x.grad().to_vector() == std::vector<double>{2, 4, 6});
  y.backward();
  CHECK(x.grad().to_vector() == std::vector<double>{4, 8, 12});
  x.zero_grad();
  CHECK(x.grad().to_vector() == std::vector<double>{0, 0, 0});  // zeroed in place, still allocated
}

TEST_CASE("a released graph refuses a second backward with a clear message") {
  Tensor x = leaf({1, 2});
  Tensor y = ops::sum(ops::tanh(x));
  y.backward();
  CHECK_THROWS_WITH_AS(y.backward(), doctest::Contains("retain_graph=true"), Error);
}

TEST_CASE("a tensor consumed several times receives the sum of the gradients") {
  // FPN-style reuse: p feeds three consumers.
  Tensor x = leaf({0.5, -1.0});
  Tensor p = ops::scale(x, 3.0);
  Tensor y = ops::sum(ops::add(ops::add(p, ops::mul(p, p)), ops::tanh(p)));
  y.backward();
  const std::vector<double> g = x.grad().to_vector(), xs{0.5, -1.0};
  for (int i = 0; i < 2; ++i) {
    const double pv = 3 * xs[i], t = std::tanh(pv);
    CHECK(g[i] == doctest::Approx(3 * (1 + 2 * pv + (1 - t * t))).epsilon(1e-12));
  }
}

TEST_CASE("a gradient that an op hands to two edges stays intact while another gradient is summed into one of them") {
  // add_relu gives p and q the same gradient tensor, which waits for both; then mul's gradients are summed
  // into p's and q's. Summing into the shared tensor in place for p would change the one waiting for q.
  // (Backward visits add_relu first here: the graph's traversal takes the root's inputs from the last.)
  Tensor x = leaf({0.5, -0.25, 2.0});
  Tensor p = ops::scale(x, 2.0), q = ops::scale(x, 3.0);
  Tensor y = ops::add(ops::sum(ops::mul(p, q)), ops::sum(ops::add_relu(p, q)));
  y.backward();
  const std::vector<double> g = x.grad().to_vector(), xs{0.5, -0.25, 2.0};
  for (int i = 0; i < 3; ++i) {
    const double pass = 5 * xs[i] > 0 ? 1 : 0;  // relu'(p + q)
    CAPTURE(i);
    CHECK(g[i] == doctest::Approx(12 * xs[i] + 5 * pass).epsilon(1e-12));  // 2 (q + pass) + 3 (p + pass)
  }
}

TEST_CASE("no-grad mode records nothing") {
  Tensor x = leaf({1, 2});
  {
    NoGradGuard guard;
    Tensor y = ops::mul(x, x);
    CHECK(!y.requires_grad());
    CHECK(!grad_enabled());
  }
  CHECK(grad_enabled());
  CHECK(ops::mul(x, x).requires_grad());
  CHECK_THROWS_WITH_AS(ops::sum(Tensor::zeros({2})).backward(), doctest::Contains("does not require grad"), Error);
}

TEST_CASE("gradients stop at constants and at detach") {
  Tensor x = leaf({1, 2});
  Tensor c = Tensor::from_vector(std::vector<double>{5, 7}, {2}, DType::F64);
  ops::sum(ops::add(ops::mul(x, c), ops::mul(x.detach(), x.detach()))).backward();
  CHECK(x.grad().to_vector() == std::vector<double>{5, 7});
  CHECK(!c.grad().defined());
  CHECK(!ops::sign(x).requires_grad());
}

TEST_CASE("backward of a non-scalar needs grad_output of its shape") {
  Tensor x = leaf({1, 2, 3});
  Tensor y = ops::scale(x, 2.0);
  CHECK_THROWS_WITH_AS(y.backward(), doctest::Contains("explicit grad_output"), Error);
  CHECK_THROWS_WITH_AS(y.backward(Tensor::zeros({2}, DType::F64)), doctest::Contains("grad_output of shape"), Error);
  y.backward(Tensor::from_vector(std::vector<double>{1, 10, 100}, {3}, DType::F64));
  CHECK(x.grad().to_vector() == std::vector<double>{2, 20, 200});
}

TEST_CASE("a leaf's first gradient becomes its .grad without a copy when nothing else holds it") {
  // A copy would be a third tensor of x's size next to the two that backward holds at once (sum's
  // gradient while mul's is made, or sum's zeros while its gradient is made).
  const int64_t n = int64_t(1) << 20;
  Tensor x = Tensor::zeros({n}).set_requires_grad();
  const Tensor c = Tensor::full({n}, 2.0);
  const Tensor y = ops::sum(ops::mul(x, c));
  Backend& cpu = backend(Device::CPU);
  const size_t before = cpu.memory_stats().bytes_in_use;
  cpu.reset_peak_memory();
  y.backward();
  const size_t peak = cpu.memory_stats().peak_bytes_in_use - before;
  INFO("backward's peak above what the graph held: ", peak, " bytes; x: ", x.nbytes());
  CHECK(peak < 3 * x.nbytes());
  CHECK(x.grad().to_vector() == std::vector<double>(n, 2.0));
}

TEST_CASE("leaves handed one gradient tensor by an op get .grad tensors of their own") {
  // add gives a and b the same gradient: if both kept it, the second backward would add into it twice.
  Tensor a = leaf({1, 2}), b = leaf({3, 4});
  const Tensor y = ops::sum(ops::add(a, b));
  y.backward(Tensor(), /*retain_graph=*/true);
  y.backward();
  CHECK(a.grad().to_vector() == std::vector<double>{2, 2});
  CHECK(b.grad().to_vector() == std::vector<double>{2, 2});
  CHECK(a.grad().raw() != b.grad().raw());
}

TEST_CASE("saved activations are released by backward") {
  Tensor x = leaf({1, 2, 3});
  std::weak_ptr<Storage> activation;
  Tensor y;
  {
    Tensor h = ops::tanh(x);  // tanh saves its output for backward
    activation = h.impl()->storage;
    y = ops::sum(ops::relu(h));  // relu saves its input h
  }
  CHECK(!activation.expired());  // alive: the graph still needs it
  y.backward();
  CHECK(activation.expired());  // freed as soon as backward no longer needs it
}

TEST_CASE("only leaves can be marked, and only float ones") {
  Tensor x = leaf({1});
  CHECK_THROWS_WITH_AS(ops::scale(x, 2).set_requires_grad(), doctest::Contains("only leaf tensors"), Error);
  CHECK_THROWS_WITH_AS(Tensor::zeros({2}, DType::I32).set_requires_grad(), doctest::Contains("cannot have gradients"),
                       Error);
}
