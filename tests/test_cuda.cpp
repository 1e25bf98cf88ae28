// CPU-vs-CUDA parity: the same random inputs go through each op on both devices, forward and backward
// (autograd), and the CUDA results must match the CPU reference within a stated bound. Also the caching
// allocator (no cudaMalloc in the steady state) and the CUDA error macros (messages carry file:line).
//
// Without a usable GPU (or in a build without CUDA) the executable prints why and exits with 77, which
// CTest reports as skipped.
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "core/backend.h"
#include "core/error.h"
#include "core/ops.h"
#include "core/rng.h"
#include "core/tensor.h"

#ifdef MDFF_WITH_CUDA
#include <cublas_v2.h>

#include "cuda/allocator.h"
#include "cuda/check.h"
#include "cuda/device.h"
#endif

using namespace mdff;

// Read by test_main.cpp: non-empty means "skip this executable, for this reason".
std::string mdff_test_skip_reason() {
  std::string why_not;
  return cuda_available(&why_not) ? std::string() : why_not;
}

namespace {

using UnaryFn = std::function<Tensor(const Tensor&)>;
using BinaryFn = std::function<Tensor(const Tensor&, const Tensor&)>;

const DType kFloatTypes[] = {DType::F32, DType::F64};

// Bounds on the error measure below. Elementwise kernels differ from the CPU only by the last bits of
// the math library (tanh, exp, log1p); sums and products by rounding order.
double elementwise_bound(DType dtype) { return dtype == DType::F32 ? 1e-5 : 1e-12; }
double product_bound(DType dtype) { return dtype == DType::F32 ? 1e-4 : 1e-10; }

// max_i |cpu_i - cuda_i| / max(|cpu_i|, 1): relative for large values, absolute near zero (where a
// relative error means nothing). A NaN on one side only counts as an infinite error.
double max_rel_err(const Tensor& cpu, const Tensor& cuda) {
  const std::vector<double> a = cpu.to_vector(), b = cuda.to_vector();
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) {
      if (std::isnan(a[i]) != std::isnan(b[i])) return std::numeric_limits<double>::infinity();
      continue;
    }
    worst = std::max(worst, std::abs(a[i] - b[i]) / std::max(std::abs(a[i]), 1.0));
  }
  return worst;
}

void check_close(const Tensor& cpu, const Tensor& cuda, double bound, const std::string& what) {
  INFO(what);
  REQUIRE(cpu.defined());
  REQUIRE(cuda.defined());
  CHECK(cpu.device() == Device::CPU);
  CHECK(cuda.device() == Device::CUDA);
  REQUIRE(cpu.shape() == cuda.shape());
  REQUIRE(cpu.dtype() == cuda.dtype());
  const double err = max_rel_err(cpu, cuda);
  INFO("max relative error ", err, ", bound ", bound);
  CHECK(err <= bound);
}

// A CPU leaf that wants .grad, and its twin on the GPU (same values, its own leaf).
Tensor cpu_leaf(const Shape& shape, Rng& rng, DType dtype, double std = 1.0) {
  Tensor t = Tensor::randn(shape, rng, std, dtype);
  t.set_requires_grad(true);
  return t;
}
Tensor cuda_twin(const Tensor& cpu) {
  Tensor t = cpu.to(Device::CUDA);
  t.set_requires_grad(true);
  return t;
}

// Runs `op` on x on both devices, backpropagates the same random upstream gradient and compares the
// outputs and the input gradients.
void check_unary_parity(const UnaryFn& op, const Shape& shape, DType dtype, const std::string& name) {
  Rng rng(1);
  const Tensor x = cpu_leaf(shape, rng, dtype, 3.0);
  const Tensor xc = cuda_twin(x);
  const Tensor y = op(x), yc = op(xc);
  const std::string what = name + " " + dtype_name(dtype) + " " + shape_str(shape);
  check_close(y, yc, elementwise_bound(dtype), what + " forward");
  const Tensor gy = Tensor::randn(y.shape(), rng, 1.0, dtype);
  y.backward(gy);
  yc.backward(gy.to(Device::CUDA));
  check_close(x.grad(), xc.grad(), elementwise_bound(dtype), what + " grad x");
}

void check_binary_parity(const BinaryFn& op, const Shape& sa, const Shape& sb, DType dtype, const std::string& name) {
  Rng rng(2);
  const Tensor a = cpu_leaf(sa, rng, dtype), b = cpu_leaf(sb, rng, dtype);
  const Tensor ac = cuda_twin(a), bc = cuda_twin(b);
  const Tensor y = op(a, b), yc = op(ac, bc);
  const std::string what = name + " " + dtype_name(dtype) + " " + shape_str(sa) + " " + shape_str(sb);
  check_close(y, yc, elementwise_bound(dtype), what + " forward");
  const Tensor gy = Tensor::randn(y.shape(), rng, 1.0, dtype);
  y.backward(gy);
  yc.backward(gy.to(Device::CUDA));
  // The gradient of a broadcast input is a sum (sum_to) over the repeated dimensions.
  check_close(a.grad(), ac.grad(), product_bound(dtype), what + " grad a");
  check_close(b.grad(), bc.grad(), product_bound(dtype), what + " grad b");
}

}  // namespace

TEST_CASE("cuda device is detected and named") {
#ifdef MDFF_WITH_CUDA
  const cuda::DeviceInfo& info = cuda::device_info();
  CHECK(info.usable);
  CHECK(info.why_not.empty());
  CHECK(!info.name.empty());
  CHECK(info.major >= 9);
  CHECK(info.multiprocessors > 0);
  MESSAGE("running on ", info.name, " (compute capability ", info.major, ".", info.minor, ")");
#endif
  CHECK(std::string(backend(Device::CUDA).name()) == "cuda");
}

TEST_CASE("fill writes the value in every dtype") {
  for (DType dtype : {DType::F32, DType::F64, DType::I32}) {
    const Tensor t = Tensor::full({7, 300}, -3.25, dtype, Device::CUDA);
    const Tensor expected = Tensor::full({7, 300}, -3.25, dtype);
    CHECK(t.device() == Device::CUDA);
    CHECK(t.to_vector() == expected.to_vector());  // exact: no arithmetic involved
  }
  CHECK(Tensor::zeros({0, 4}, DType::F32, Device::CUDA).numel() == 0);  // empty: no launch, no error
}

TEST_CASE("cast between float32 and float64, and same-type copies") {
  Rng rng(3);
  for (DType from : kFloatTypes) {
    for (DType to : kFloatTypes) {
      const Tensor x = Tensor::randn({5, 33}, rng, 10.0, from);
      const Tensor on_cpu = Tensor::empty(x.shape(), to);
      backend(Device::CPU).cast(x, on_cpu);
      const Tensor on_gpu = Tensor::empty(x.shape(), to, Device::CUDA);
      backend(Device::CUDA).cast(x.to(Device::CUDA), on_gpu);
      INFO(dtype_name(from), " -> ", dtype_name(to));
      CHECK(on_gpu.to_vector() == on_cpu.to_vector());  // conversions are exactly rounded on both
    }
  }
  const Tensor x = Tensor::randn({1000}, rng, 1.0, DType::F32, Device::CUDA);
  CHECK(x.to(DType::F64).to(DType::F32).to_vector() == x.to_vector());
  CHECK(x.clone().to_vector() == x.to_vector());  // copy_on_device
}

TEST_CASE("unary ops match the CPU forward and backward") {
  for (DType dtype : kFloatTypes) {
    for (const Shape& shape : {Shape{1000}, Shape{4, 3, 5, 5}, Shape{}}) {
      check_unary_parity([](const Tensor& x) { return ops::relu(x); }, shape, dtype, "relu");
      check_unary_parity([](const Tensor& x) { return ops::tanh(x); }, shape, dtype, "tanh");
      check_unary_parity([](const Tensor& x) { return ops::softplus(x); }, shape, dtype, "softplus");
      check_unary_parity([](const Tensor& x) { return ops::scale(x, -2.5); }, shape, dtype, "scale");
    }
    // Large blocks exercise the grid-stride loop (more items than threads).
    check_unary_parity([](const Tensor& x) { return ops::tanh(x); }, Shape{3, 1 << 20}, dtype, "tanh large");
  }
}

TEST_CASE("softplus is stable at large |x|") {
  const std::vector<double> values = {-1000, -80, -30, -1e-3, 0, 1e-3, 30, 80, 1000};
  for (DType dtype : kFloatTypes) {
    const Tensor x = Tensor::from_vector(values, {9}, dtype);
    const Tensor yc = ops::softplus(x.to(Device::CUDA));
    for (double v : yc.to_vector()) CHECK(std::isfinite(v));
    check_close(ops::softplus(x), yc, elementwise_bound(dtype), std::string("softplus extremes ") + dtype_name(dtype));
    const Tensor gx = Tensor::empty({9}, dtype, Device::CUDA), gx_cpu = Tensor::empty({9}, dtype);
    const Tensor ones = Tensor::full({9}, 1.0, dtype);
    backend(Device::CUDA).unary_backward(UnaryOp::Softplus, x.to(Device::CUDA), Tensor(), ones.to(Device::CUDA), gx);
    backend(Device::CPU).unary_backward(UnaryOp::Softplus, x, Tensor(), ones, gx_cpu);
    check_close(gx_cpu, gx, elementwise_bound(dtype), std::string("sigmoid extremes ") + dtype_name(dtype));
  }
}

TEST_CASE("sign is +1 at zero and has a zero gradient") {
  for (DType dtype : kFloatTypes) {
    const Tensor x = Tensor::from_vector(std::vector<double>{-2, -1e-30, 0, 1e-30, 3}, {5}, dtype);
    CHECK(ops::sign(x.to(Device::CUDA)).to_vector() == std::vector<double>{-1, -1, 1, 1, 1});
    Rng rng(4);
    const Tensor r = Tensor::randn({4, 3, 5, 5}, rng, 1.0, dtype);
    CHECK(ops::sign(r.to(Device::CUDA)).to_vector() == ops::sign(r).to_vector());
    // ops::sign records no graph; its backward kernel still exists and writes zeros.
    const Tensor gy = Tensor::full({5}, 7.0, dtype, Device::CUDA), gx = Tensor::full({5}, 9.0, dtype, Device::CUDA);
    backend(Device::CUDA).unary_backward(UnaryOp::Sign, x.to(Device::CUDA), Tensor(), gy, gx);
    CHECK(gx.to_vector() == std::vector<double>(5, 0.0));
  }
}

TEST_CASE("binary ops with broadcasting match the CPU forward and backward") {
  const BinaryFn add = [](const Tensor& a, const Tensor& b) { return ops::add(a, b); };
  const BinaryFn sub = [](const Tensor& a, const Tensor& b) { return ops::sub(a, b); };
  const BinaryFn mul = [](const Tensor& a, const Tensor& b) { return ops::mul(a, b); };
  const std::vector<std::pair<Shape, Shape>> shapes = {
      {{4, 3, 5, 5}, {4, 3, 5, 5}},    // same shape: the fast path
      {{4, 3, 5, 5}, {1, 3, 1, 1}},    // per-channel bias
      {{1, 3, 1, 1}, {4, 3, 5, 5}},    // ... on the left
      {{8, 16}, {16}},                 // fewer dims: aligned to the right
      {{3, 1, 5}, {1, 4, 1}},          // both inputs broadcast
      {{6, 7}, {}},                    // a 0-dim scalar
      {{2, 3, 4, 5, 6}, {2, 1, 4, 1, 6}},
      {{64, 32, 16, 16}, {1, 32, 1, 1}},  // sum_to over long contiguous runs: a block per output
      {{512, 300}, {300}},               // sum_to down columns: a thread per output
  };
  for (DType dtype : kFloatTypes) {
    for (const auto& [sa, sb] : shapes) {
      check_binary_parity(add, sa, sb, dtype, "add");
      check_binary_parity(sub, sa, sb, dtype, "sub");
      check_binary_parity(mul, sa, sb, dtype, "mul");
    }
  }
}

TEST_CASE("broadcasting that needs more than 8 dimensions is a clear error on the GPU") {
  // Every other dimension repeats b, so no two neighbours merge: 9 dimensions remain.
  const Tensor a = Tensor::zeros({2, 2, 2, 2, 2, 2, 2, 2, 2}, DType::F32, Device::CUDA);
  const Tensor b = Tensor::zeros({2, 1, 2, 1, 2, 1, 2, 1, 2}, DType::F32, Device::CUDA);
  CHECK_THROWS_WITH_AS(ops::add(a, b), doctest::Contains("needs more than 8 dimensions"), Error);
  // Dimensions that merge are fine however many there are.
  const Tensor c = Tensor::full({2, 2, 2, 2, 2, 2, 2, 2, 2, 2}, 1.0, DType::F32, Device::CUDA);
  const Tensor d = Tensor::full({1, 1, 1, 1, 1, 2, 2, 2, 2, 2}, 2.0, DType::F32, Device::CUDA);
  CHECK(ops::sum(ops::add(c, d)).item() == 3.0 * 1024);
}

TEST_CASE("binary writes in place when out is an input") {
  Rng rng(5);
  for (DType dtype : kFloatTypes) {
    const Tensor y = Tensor::randn({8, 16}, rng, 1.0, dtype), bias = Tensor::randn({16}, rng, 1.0, dtype);
    const Tensor yc = y.to(Device::CUDA);
    backend(Device::CPU).binary(BinaryOp::Add, y, bias, y);  // what ops::linear does with its bias
    backend(Device::CUDA).binary(BinaryOp::Add, yc, bias.to(Device::CUDA), yc);
    check_close(y, yc, elementwise_bound(dtype), "in-place add");
  }
}

TEST_CASE("sum (a full reduction through sum_to) matches the CPU forward and backward") {
  for (DType dtype : kFloatTypes) {
    for (const Shape& shape : {Shape{1}, Shape{37}, Shape{4, 3, 5, 5}, Shape{3, 1 << 18}}) {
      check_unary_parity([](const Tensor& x) { return ops::sum(x); }, shape, dtype, "sum");
      check_unary_parity([](const Tensor& x) { return ops::mean(x); }, shape, dtype, "mean");
    }
  }
}

TEST_CASE("sum_to with size-1 dims kept in the output") {
  Rng rng(6);
  const std::vector<std::pair<Shape, Shape>> cases = {
      {{4, 3, 5, 5}, {1, 3, 1, 1}}, {{4, 3, 5, 5}, {3, 1, 1}}, {{4, 3, 5, 5}, {4, 1, 5, 1}},
      {{4, 3, 5, 5}, {5}},          {{2, 1, 3}, {1, 1, 3}},    {{6, 9}, {6, 9}},
      {{0, 4}, {4}},  // nothing to sum: zeros
  };
  for (DType dtype : kFloatTypes) {
    for (const auto& [from, to] : cases) {
      const Tensor src = Tensor::randn(from, rng, 1.0, dtype);
      const Tensor out = Tensor::empty(to, dtype), out_c = Tensor::full(to, 123.0, dtype, Device::CUDA);
      backend(Device::CPU).sum_to(src, out);
      backend(Device::CUDA).sum_to(src.to(Device::CUDA), out_c);
      check_close(out, out_c, product_bound(dtype), "sum_to " + shape_str(from) + " -> " + shape_str(to));
    }
  }
}

TEST_CASE("matmul and linear (cuBLAS gemm) match the CPU forward and backward") {
  for (DType dtype : kFloatTypes) {
    for (bool trans_a : {false, true}) {
      for (bool trans_b : {false, true}) {
        Rng rng(7);
        const int64_t m = 13, k = 37, n = 21;
        const Tensor a = cpu_leaf(trans_a ? Shape{k, m} : Shape{m, k}, rng, dtype);
        const Tensor b = cpu_leaf(trans_b ? Shape{n, k} : Shape{k, n}, rng, dtype);
        const Tensor ac = cuda_twin(a), bc = cuda_twin(b);
        const Tensor c = ops::matmul(a, b, trans_a, trans_b), cc = ops::matmul(ac, bc, trans_a, trans_b);
        const std::string what = std::string("matmul ") + dtype_name(dtype) + (trans_a ? " A^T" : " A") +
                                 (trans_b ? " B^T" : " B");
        check_close(c, cc, product_bound(dtype), what + " forward");
        const Tensor gc = Tensor::randn(c.shape(), rng, 1.0, dtype);
        c.backward(gc);
        cc.backward(gc.to(Device::CUDA));
        check_close(a.grad(), ac.grad(), product_bound(dtype), what + " grad a");
        check_close(b.grad(), bc.grad(), product_bound(dtype), what + " grad b");
      }
    }
    Rng rng(8);
    const Tensor x = cpu_leaf({32, 50}, rng, dtype), w = cpu_leaf({10, 50}, rng, dtype), bias = cpu_leaf({10}, rng, dtype);
    const Tensor xc = cuda_twin(x), wc = cuda_twin(w), biasc = cuda_twin(bias);
    const Tensor y = ops::linear(x, w, bias), yc = ops::linear(xc, wc, biasc);
    check_close(y, yc, product_bound(dtype), std::string("linear forward ") + dtype_name(dtype));
    ops::sum(ops::tanh(y)).backward();
    ops::sum(ops::tanh(yc)).backward();
    check_close(x.grad(), xc.grad(), product_bound(dtype), "linear grad x");
    check_close(w.grad(), wc.grad(), product_bound(dtype), "linear grad weight");
    check_close(bias.grad(), biasc.grad(), product_bound(dtype), "linear grad bias");
  }
}

TEST_CASE("gemm accumulates with beta and handles k = 0") {
  Rng rng(9);
  for (DType dtype : kFloatTypes) {
    const Tensor a = Tensor::randn({6, 4}, rng, 1.0, dtype), b = Tensor::randn({4, 5}, rng, 1.0, dtype);
    const Tensor c = Tensor::randn({6, 5}, rng, 1.0, dtype), cc = c.to(Device::CUDA);
    backend(Device::CPU).gemm(false, false, 0.5, a, b, 2.0, c);  // C = 0.5 AB + 2 C
    backend(Device::CUDA).gemm(false, false, 0.5, a.to(Device::CUDA), b.to(Device::CUDA), 2.0, cc);
    check_close(c, cc, product_bound(dtype), "gemm beta = 2");
    // An empty inner dimension: C = beta C.
    const Tensor e = Tensor::full({3, 2}, 4.0, dtype, Device::CUDA);
    backend(Device::CUDA).gemm(false, false, 1.0, Tensor::empty({3, 0}, dtype, Device::CUDA),
                               Tensor::empty({0, 2}, dtype, Device::CUDA), 0.5, e);
    CHECK(e.to_vector() == std::vector<double>(6, 2.0));
  }
}

TEST_CASE("a chain of ops on the GPU matches the CPU end to end") {
  for (DType dtype : kFloatTypes) {
    Rng rng(10);
    const Tensor x = cpu_leaf({4, 3, 5, 5}, rng, dtype), b = cpu_leaf({1, 3, 1, 1}, rng, dtype);
    const Tensor z = cpu_leaf({3, 5, 5}, rng, dtype);
    const Tensor xc = cuda_twin(x), bc = cuda_twin(b), zc = cuda_twin(z);
    auto loss = [](const Tensor& x, const Tensor& b, const Tensor& z) {
      const Tensor h = ops::tanh(ops::add(x, b));                        // (4,3,5,5)
      const Tensor s = ops::mul(h, ops::softplus(z));                    // (4,3,5,5) * (3,5,5)
      return ops::mean(ops::sub(ops::relu(s), ops::scale(h, 0.25)));  // ()
    };
    const Tensor l = loss(x, b, z), lc = loss(xc, bc, zc);
    check_close(l, lc, product_bound(dtype), std::string("chain loss ") + dtype_name(dtype));
    l.backward();
    lc.backward();
    check_close(x.grad(), xc.grad(), product_bound(dtype), "chain grad x");
    check_close(b.grad(), bc.grad(), product_bound(dtype), "chain grad b");
    check_close(z.grad(), zc.grad(), product_bound(dtype), "chain grad z");
    // Backward accumulates: a second pass doubles the gradient on both devices.
    loss(x, b, z).backward();
    loss(xc, bc, zc).backward();
    check_close(b.grad(), bc.grad(), product_bound(dtype), "chain grad b after two passes");
  }
}

TEST_CASE("kernels the cuda backend lacks say so") {
  const Tensor x = Tensor::zeros({2, 3}, DType::F32, Device::CUDA), y = Tensor::zeros({2, 3}, DType::F32, Device::CUDA);
  CHECK_THROWS_WITH_AS(backend(Device::CUDA).log_softmax_forward(x, y),
                       doctest::Contains("is not implemented on the cuda backend"), Error);
}

#ifdef MDFF_WITH_CUDA

TEST_CASE("allocator rounds sizes into buckets") {
  constexpr size_t MiB = size_t(1) << 20;
  CHECK(cuda::round_allocation_size(0) == 0);
  CHECK(cuda::round_allocation_size(1) == 512);
  CHECK(cuda::round_allocation_size(512) == 512);
  CHECK(cuda::round_allocation_size(513) == 1024);
  CHECK(cuda::round_allocation_size(MiB) == MiB);
  CHECK(cuda::round_allocation_size(MiB + 1) == 2 * MiB);
  CHECK(cuda::round_allocation_size(3 * MiB) == 4 * MiB);
  CHECK(cuda::round_allocation_size(4 * MiB + 1) == 6 * MiB);
}

TEST_CASE("allocator reuses freed blocks and counts bytes") {
  cuda::empty_cache();
  const cuda::AllocatorStats start = cuda::allocator_stats();
  CHECK(start.bytes_cached == 0);

  void* p = cuda::allocate(3000);  // a 3072-byte block
  cuda::AllocatorStats s = cuda::allocator_stats();
  CHECK(s.cuda_malloc_calls == start.cuda_malloc_calls + 1);
  CHECK(s.bytes_in_use == start.bytes_in_use + 3072);
  CHECK(s.peak_bytes_in_use >= s.bytes_in_use);
  cuda::deallocate(p, 3000);
  s = cuda::allocator_stats();
  CHECK(s.bytes_in_use == start.bytes_in_use);
  CHECK(s.bytes_cached == 3072);

  void* q = cuda::allocate(2900);  // same bucket: the cached block, no cudaMalloc
  CHECK(q == p);
  CHECK(cuda::allocator_stats().cuda_malloc_calls == start.cuda_malloc_calls + 1);
  CHECK(cuda::allocator_stats().bytes_cached == 0);
  cuda::deallocate(q, 2900);

  const int64_t frees_before = cuda::allocator_stats().cuda_free_calls;
  cuda::empty_cache();
  s = cuda::allocator_stats();
  CHECK(s.bytes_cached == 0);
  CHECK(s.cuda_free_calls == frees_before + 1);
  CHECK(cuda::allocate(0) == nullptr);
}

TEST_CASE("a training-like loop performs no cudaMalloc after warm-up") {
  Rng rng(11);
  Tensor w = Tensor::randn({256, 300}, rng, 0.1, DType::F32, Device::CUDA).set_requires_grad(true);
  auto step = [&] {
    const Tensor x = Tensor::randn({64, 300}, rng, 1.0, DType::F32, Device::CUDA);
    const Tensor loss = ops::mean(ops::softplus(ops::matmul(x, w, false, true)));  // (64,256) -> ()
    loss.backward();
    w.zero_grad();
  };
  for (int i = 0; i < 3; ++i) step();  // warm-up fills the cache
  const cuda::AllocatorStats before = cuda::allocator_stats();
  for (int i = 0; i < 20; ++i) step();
  const cuda::AllocatorStats after = cuda::allocator_stats();
  CHECK(after.cuda_malloc_calls == before.cuda_malloc_calls);
  CHECK(after.bytes_in_use == before.bytes_in_use);

  // The same with raw same-size allocate/free pairs, large blocks included.
  for (size_t bytes : {size_t(100), size_t(70000), size_t(5) << 20}) {
    cuda::deallocate(cuda::allocate(bytes), bytes);  // warm-up
    const int64_t mallocs = cuda::allocator_stats().cuda_malloc_calls;
    for (int i = 0; i < 100; ++i) cuda::deallocate(cuda::allocate(bytes), bytes);
    CHECK(cuda::allocator_stats().cuda_malloc_calls == mallocs);
  }
}

TEST_CASE("allocator is thread-safe") {
  const size_t in_use = cuda::allocator_stats().bytes_in_use;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([t] {
      for (int i = 0; i < 200; ++i) {
        const size_t bytes = 512 * size_t(1 + (i + t) % 7);
        void* p = cuda::allocate(bytes);
        cuda::deallocate(p, bytes);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  CHECK(cuda::allocator_stats().bytes_in_use == in_use);
}

TEST_CASE("running out of GPU memory is a clear error, and the device stays usable") {
  CHECK_THROWS_WITH_AS(cuda::allocate(size_t(1) << 50), doctest::Contains("out of GPU memory: requested"), Error);
  const Tensor x = Tensor::full({10}, 2.0, DType::F32, Device::CUDA);
  CHECK(ops::sum(x).item() == 20.0);
}

TEST_CASE("CUDA and cuBLAS errors carry the call, the library's message and file:line") {
  int line = 0;
  try {
    line = __LINE__; MDFF_CUDA_CHECK(cudaSetDevice(-1));
    FAIL("MDFF_CUDA_CHECK did not throw");
  } catch (const Error& e) {
    const std::string message = e.what();
    INFO(message);
    CHECK(message.find("test_cuda.cpp:" + std::to_string(line)) != std::string::npos);
    CHECK(message.find("cudaSetDevice(-1)") != std::string::npos);
    CHECK(message.find("cudaErrorInvalidDevice") != std::string::npos);
  }
  try {
    const float one = 1.0f;
    line = __LINE__; MDFF_CUBLAS_CHECK(cublasSgemm(cuda::cublas_handle(), CUBLAS_OP_N, CUBLAS_OP_N, -1, 1, 1, &one,
                                                   nullptr, 1, nullptr, 1, &one, nullptr, 1));
    FAIL("MDFF_CUBLAS_CHECK did not throw");
  } catch (const Error& e) {
    const std::string message = e.what();
    INFO(message);
    CHECK(message.find("test_cuda.cpp:" + std::to_string(line)) != std::string::npos);
    CHECK(message.find("CUBLAS_STATUS_INVALID_VALUE") != std::string::npos);
  }
  // The failed calls left no error behind for the next launch check.
  CHECK(ops::sum(Tensor::full({3}, 1.0, DType::F32, Device::CUDA)).item() == 3.0);
}

#endif  // MDFF_WITH_CUDA
