// Tensor basics: creation, conversion, views, copies, the RNG, the CPU backend's memory count, and clear errors for misuse.
#include <doctest/doctest.h>
#include "tests/doctest_text.h"

#include <cmath>
#include <thread>

#include "core/backend.h"
#include "core/error.h"
#include "core/rng.h"
#include "core/tensor.h"

using namespace mdff;

TEST_CASE("creation and metadata") {
  Tensor t = Tensor::zeros({2, 3, 4});
  CHECK(t.dim() == 3);
  CHECK(t.numel() == 24);
  CHECK(t.size(-1) == 4);
  CHECK(t.dtype() == DType::F32);
  CHECK(t.device() == Device::CPU);
  for (double v : t.to_vector()) CHECK(v == 0.0);
  CHECK(Tensor::full({2}, 3.5, DType::F64).to_vector() == std::vector<double>{3.5, 3.5});
  CHECK(Tensor::from_vector(std::vector<float>{1, 2, 3, 4, 5, 6}, {2, 3}).to_vector()[4] == 5.0);
  CHECK_THROWS_WITH_AS(t.size(3), doctest::Contains("out of range"), Error);
  CHECK_THROWS_WITH_AS(Tensor::from_vector(std::vector<float>{1, 2}, {3}), doctest::Contains("do not fill"), Error);
  CHECK_THROWS_WITH_AS(Tensor::empty({2, -1}), doctest::Contains("negative dimension"), Error);
  CHECK_THROWS_WITH_AS(t.data<double>(), doctest::Contains("data<float64>() on a float32 tensor"), Error);
  CHECK_THROWS_WITH_AS(t.item(), doctest::Contains("one-element"), Error);
  CHECK_THROWS_WITH_AS(Tensor().shape(), doctest::Contains("undefined tensor"), Error);
}

TEST_CASE("reshape is a view; clone and dtype conversion copy") {
  Tensor t = Tensor::from_vector(std::vector<float>{1, 2, 3, 4, 5, 6}, {2, 3});
  Tensor v = t.reshape({3, -1});
  CHECK(v.shape() == Shape{3, 2});
  v.data<float>()[0] = 42;
  CHECK(t.to_vector()[0] == 42);  // shares storage
  Tensor c = t.clone();
  c.data<float>()[1] = -1;
  CHECK(t.to_vector()[1] == 2);   // does not
  Tensor d = t.to(DType::F64);
  CHECK(d.dtype() == DType::F64);
  CHECK(d.to_vector() == t.to_vector());
  CHECK_THROWS_WITH_AS(t.reshape({4, 2}), doctest::Contains("cannot view shape (2,3) as (4,2)"), Error);
  CHECK_THROWS_WITH_AS(t.copy_(Tensor::zeros({3, 2})), doctest::Contains("source shape"), Error);
}

TEST_CASE("the RNG is deterministic and well distributed") {
  Rng a(123), b(123), c(124);
  for (int i = 0; i < 10; ++i) CHECK(a.next_u64() == b.next_u64());
  CHECK(Rng(123).next_u64() != c.next_u64());
  Rng r(5);
  const Rng::State saved = r.state();
  const double first = r.normal();
  r.set_state(saved);
  CHECK(r.normal() == first);  // state round-trips exactly (resume)
  double sum = 0, sq = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    const double x = r.normal();
    sum += x;
    sq += x * x;
  }
  CHECK(std::abs(sum / n) < 0.01);
  CHECK(std::abs(sq / n - 1.0) < 0.01);
  int counts[7] = {};
  for (int i = 0; i < 70000; ++i) ++counts[r.below(7)];
  for (int k : counts) CHECK(std::abs(k - 10000) < 500);
  Tensor u = Tensor::uniform({1000}, r, -2.0, 3.0);
  for (double x : u.to_vector()) CHECK((x >= -2.0 && x < 3.0));
}

TEST_CASE("denormal floats are flushed to zero in every thread (they made training 3x slower)") {
  CHECK(denormals_flushed());
  volatile float tiny = 1e-30f;
  CHECK(tiny * 1e-15f == 0.0f);  // 1e-45 would be a denormal
  bool in_worker = false;
  std::thread([&] { in_worker = denormals_flushed(); }).join();
  CHECK(in_worker);
}

TEST_CASE("asking for CUDA where it is unusable is a clear error") {
  std::string why;
  if (cuda_available(&why)) return;  // a GPU machine: test_cuda covers the CUDA path
  CHECK(!why.empty());
  CHECK_THROWS_WITH_AS(Tensor::zeros({2}, DType::F32, Device::CUDA), doctest::Contains("CUDA is not usable"), Error);
  CHECK_THROWS_WITH_AS(Tensor::zeros({2}).to(Device::CUDA), doctest::Contains("--device cpu"), Error);
}

TEST_CASE("the CPU backend counts the bytes its tensors hold, and their peak") {
  Backend& cpu = backend(Device::CPU);
  const MemoryStats before = cpu.memory_stats();
  size_t held = 0;
  {
    const Tensor t = Tensor::empty({1000}, DType::F32);  // 4,000 bytes: 63 blocks of 64
    held = cpu.memory_stats().bytes_in_use - before.bytes_in_use;
    CHECK(held == 4032);
    CHECK(cpu.memory_stats().peak_bytes_in_use >= before.bytes_in_use + held);
    CHECK(cpu.memory_stats().device_malloc_calls == before.device_malloc_calls + 1);
  }
  const MemoryStats after = cpu.memory_stats();
  CHECK(after.bytes_in_use == before.bytes_in_use);
  CHECK(after.peak_bytes_in_use >= before.bytes_in_use + held);  // the peak remembers it
  CHECK(after.bytes_cached == 0);
  cpu.reset_peak_memory();
  CHECK(cpu.memory_stats().peak_bytes_in_use == before.bytes_in_use);
  CHECK(cpu.memory_stats().peak_bytes_reserved == before.bytes_in_use);
}
