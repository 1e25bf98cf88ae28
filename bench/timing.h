// Timing and this machine's roofline, shared by the benchmarks: medians, the median time of a call, the SGEMM
// peak (OpenBLAS through core/blas.h) and the memory bandwidth (a STREAM-like triad on every OpenMP
// thread).
#pragma once
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "core/blas.h"
#include "core/rng.h"
#include "core/tensor.h"

namespace mdff::bench {

// The median of `values` (of an even count, the upper of the middle two); values must not be empty.
inline double median(std::vector<double> values) {
  std::nth_element(values.begin(), values.begin() + values.size() / 2, values.end());
  return values[values.size() / 2];
}

// Median seconds of fn, after one warm-up call, over at least `min_runs` calls and, while fewer than
// 50, until `budget` seconds have passed.
inline double median_seconds(const std::function<void()>& fn, int min_runs = 3, double budget = 0.3) {
  using clock = std::chrono::steady_clock;
  fn();
  std::vector<double> times;
  const auto start = clock::now();
  while (static_cast<int>(times.size()) < min_runs ||
         (std::chrono::duration<double>(clock::now() - start).count() < budget && times.size() < 50)) {
    const auto t0 = clock::now();
    fn();
    times.push_back(std::chrono::duration<double>(clock::now() - t0).count());
  }
  return median(std::move(times));
}

// The best single-precision GEMM rate in GFLOP/s over square products of 512, 1024 and 2048.
inline double sgemm_peak_gflops() {
  Rng rng(1);
  double best = 0;
  for (int n : {512, 1024, 2048}) {
    const Tensor a = Tensor::randn({n, n}, rng), b = Tensor::randn({n, n}, rng), c = Tensor::zeros({n, n});
    const double s = median_seconds([&] {
      blas::gemm(false, false, n, n, n, 1.0f, a.data<float>(), n, b.data<float>(), n, 0.0f, c.data<float>(), n);
    });
    best = std::max(best, 2.0 * n * n * n / s / 1e9);
  }
  return best;
}

// Memory bandwidth in GB/s: a = b + s c over three float arrays of 64 MiB each (far beyond the caches),
// counting 12 bytes per element (two reads and one write, as STREAM does).
inline double memory_bandwidth_gbs() {
  const int64_t n = int64_t(1) << 24;
  std::vector<float> a(n), b(n, 1.0f), c(n, 2.0f);
  const double s = median_seconds([&] {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) a[i] = b[i] + 3.0f * c[i];
  });
  return 12.0 * static_cast<double>(n) / s / 1e9;
}

}  // namespace mdff::bench
