// Timing and the roofline of a device, shared by the benchmarks: medians, the median time of a call (on the
// CPU or, queued in rounds, on the GPU), the GEMM peak (OpenBLAS through core/blas.h on the CPU, cuBLAS on
// the GPU) and the memory bandwidth (a STREAM-like triad: on every OpenMP thread, or the engine's add kernel
// on the GPU).
#pragma once
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "core/backend.h"
#include "core/blas.h"
#include "core/rng.h"
#include "core/tensor.h"
#ifdef MDFF_WITH_CUDA
#include "cuda/device.h"
#endif

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

// What a device is, for the benchmarks' headers: the GPU's name (e.g. "NVIDIA H200"), or "CPU".
inline std::string device_name(Device device) {
#ifdef MDFF_WITH_CUDA
  if (device == Device::CUDA) return cuda::device_info().name;
#endif
  return device == Device::CPU ? "CPU" : backend(device).name();
}

// A benchmark's operands of N(0, std^2)-distributed values, fast at any size on any device. On the CPU,
// Tensor::randn. On a GPU, drawing each operand on the host (~40 ns an element, one thread) would take
// longer than timing it (ResNet50's 224x224 batch-128 operands hold ~2 G values), so the values are copied
// on the device from a pool drawn once: 2^24 - 3 values (a prime count, so that no tensor's strides line
// up with the repetition), starting at an offset drawn from rng. The pool (64 MiB on a GPU) lives as long as
// this object: a benchmark that measures memory afterwards must not keep one.
class RandomOperands {
 public:
  explicit RandomOperands(Device device) : device_(device) {
    if (device == Device::CPU) return;
    Rng pool_rng(12345);
    pool_ = Tensor::randn({kPool}, pool_rng, 1.0, DType::F32, device);
  }

  Tensor operator()(const Shape& shape, Rng& rng, double std = 1.0) const {
    if (device_ == Device::CPU) return Tensor::randn(shape, rng, std);
    Tensor out = Tensor::empty(shape, DType::F32, device_);
    const float* source = pool_.data<float>();
    float* target = out.data<float>();
    int64_t offset = static_cast<int64_t>(rng.below(kPool));
    for (int64_t done = 0; done < out.numel();) {
      const int64_t n = std::min(out.numel() - done, kPool - offset);
      backend(device_).copy_on_device(target + done, source + offset, static_cast<size_t>(n) * sizeof(float));
      done += n;
      offset = 0;
    }
    if (std != 1.0) backend(device_).scale(out, std, out);
    return out;
  }

 private:
  static constexpr int64_t kPool = (int64_t(1) << 24) - 3;
  Device device_;
  Tensor pool_;  // on a GPU only
};

// Median seconds of one call of fn on `device`. On the CPU, median_seconds. On a GPU a call only queues
// work, so the calls run in rounds of 5 queued back to back, each round ended by a synchronisation: the
// time is the device's, not a lone launch's round trip to the host.
inline double device_median_seconds(Device device, const std::function<void()>& fn, int min_runs = 3,
                                    double budget = 0.3) {
  if (device == Device::CPU) return median_seconds(fn, min_runs, budget);
  constexpr int kCallsPerRound = 5;
  const double round = median_seconds(
      [&] {
        for (int i = 0; i < kCallsPerRound; ++i) fn();
        backend(device).synchronize();
      },
      min_runs, budget);
  return round / kCallsPerRound;
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

// The best GEMM rate of `device` in GFLOP/s: OpenBLAS's SGEMM on the CPU (above); on the GPU, cuBLAS through
// the backend on square float32 products of 4096 and 8192, in the precision set (set_tf32_allowed).
inline double gemm_peak_gflops(Device device) {
  if (device == Device::CPU) return sgemm_peak_gflops();
  const RandomOperands random(device);  // freed on return, before the caller measures any memory
  Rng rng(1);
  double best = 0;
  for (int n : {4096, 8192}) {
    const Tensor a = random({n, n}, rng), b = random({n, n}, rng);
    const Tensor c = Tensor::zeros({n, n}, DType::F32, device);
    const double s = device_median_seconds(device, [&] { backend(device).gemm(false, false, 1.0, a, b, 0.0, c); });
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

// The same on `device`: on the GPU, the engine's add kernel a = b + c over three float tensors of 256 MiB each
// (far beyond the H200's 50 MB L2 cache), 12 bytes per element.
inline double memory_bandwidth_gbs(Device device) {
  if (device == Device::CPU) return memory_bandwidth_gbs();
  const int64_t n = int64_t(1) << 26;
  const Tensor a = Tensor::empty({n}, DType::F32, device), b = Tensor::full({n}, 1.0, DType::F32, device);
  const Tensor c = Tensor::full({n}, 2.0, DType::F32, device);
  const double s = device_median_seconds(device, [&] { backend(device).binary(BinaryOp::Add, b, c, a); });
  return 12.0 * static_cast<double>(n) / s / 1e9;
}

}  // namespace mdff::bench
