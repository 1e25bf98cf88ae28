// The per-kernel profiler (core/profiler.h): the calls and FLOPs it records for convolutions and
// matrix products (checked against the formulas), bytes for a memory-bound kernel, that disabling
// stops recording and reset() clears, that profiling never changes a result, and MDFF_PROFILE's
// report at exit (this executable run again as a child process).
#include <doctest/doctest.h>
#include "tests/doctest_text.h"
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "core/ops.h"
#include "core/profiler.h"
#include "core/rng.h"

using namespace mdff;

namespace {

// Profiling on with no records, for one test case; off and cleared again when it ends, even on failure.
struct Profiling {
  Profiling() {
    profiler::reset();
    profiler::enable(true);
  }
  ~Profiling() {
    profiler::enable(false);
    profiler::reset();
  }
};

// The records of one kernel.
std::vector<profiler::Entry> records_of(const std::string& kernel) {
  std::vector<profiler::Entry> out;
  for (const auto& e : profiler::entries())
    if (e.kernel == kernel) out.push_back(e);
  return out;
}

int64_t total_calls() {
  int64_t calls = 0;
  for (const auto& e : profiler::entries()) calls += e.calls;
  return calls;
}

// The workload's shapes: x (N,Cin,H,W), weight (Cout,Cin,K,K), stride 2, padding 1; a (M,Kd) x b (Kd,Nd).
constexpr int64_t N = 2, Cin = 3, H = 9, W = 9, Cout = 4, K = 3, Stride = 2, Pad = 1;
constexpr int64_t Ho = (H + 2 * Pad - K) / Stride + 1, Wo = (W + 2 * Pad - K) / Stride + 1;
constexpr int64_t M = 5, Kd = 7, Nd = 6;

struct Results {
  Tensor y, grad_x, grad_weight, product, activation;
};

// One conv2d forward + backward, one matmul and one relu, on inputs fixed by the seed.
Results run_workload() {
  Rng rng(7);
  Tensor x = Tensor::randn({N, Cin, H, W}, rng), weight = Tensor::randn({Cout, Cin, K, K}, rng);
  x.set_requires_grad();
  weight.set_requires_grad();
  const Tensor a = Tensor::randn({M, Kd}, rng), b = Tensor::randn({Kd, Nd}, rng);
  Results r;
  r.y = ops::conv2d(x, weight, Tensor(), Stride, Pad);
  r.y.backward(Tensor::randn(r.y.shape(), rng));
  r.grad_x = x.grad();
  r.grad_weight = weight.grad();
  r.product = ops::matmul(a, b);
  r.activation = ops::relu(r.y.detach());
  return r;
}

// The test case that run_child() runs.
constexpr char kChildCase[] = "profiler: workload of the child process";

// This executable's stderr when run with `environment` on kChildCase alone.
std::string run_child(const std::string& environment) {
  char exe[4096];
  const ssize_t length = readlink("/proc/self/exe", exe, sizeof exe - 1);
  REQUIRE(length > 0);
  exe[length] = '\0';
  // stderr into the pipe, stdout (doctest's summary) dropped
  const std::string command = environment + " '" + exe + "' --test-case='" + kChildCase + "' 2>&1 >/dev/null";
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(command.c_str(), "r"), pclose);
  REQUIRE(pipe);
  std::string out;
  char buffer[4096];
  while (size_t n = fread(buffer, 1, sizeof buffer, pipe.get())) out.append(buffer, n);
  return out;
}

}  // namespace

TEST_CASE("profiler: calls, FLOPs and bytes of conv2d, gemm and relu") {
  Profiling profiling;
  run_workload();
  run_workload();
  const double conv = 2.0 * N * Cout * Ho * Wo * Cin * K * K;  // one forward: 2 x multiply-adds

  const auto forward = records_of("conv2d_forward");
  REQUIRE(forward.size() == 1);
  CHECK(forward[0].signature == "x(2,3,9,9) w(4,3,3,3) s2p1");
  CHECK(forward[0].calls == 2);
  CHECK(forward[0].flops == 2 * conv);
  CHECK(forward[0].seconds > 0);

  const auto backward = records_of("conv2d_backward");
  REQUIRE(backward.size() == 1);
  CHECK(backward[0].signature == "x(2,3,9,9) w(4,3,3,3) s2p1 dx dw");
  CHECK(backward[0].calls == 2);
  CHECK(backward[0].flops == 2 * 2 * conv);  // data and weight gradients, twice

  const auto gemm = records_of("gemm");
  REQUIRE(gemm.size() == 1);
  CHECK(gemm[0].signature == "m=5 n=6 k=7 NN");
  CHECK(gemm[0].calls == 2);
  CHECK(gemm[0].flops == 2 * 2.0 * M * Nd * Kd);

  const auto unary = records_of("unary");
  REQUIRE(unary.size() == 1);
  CHECK(unary[0].signature == "relu (2,4,5,5)");
  CHECK(unary[0].flops == 0);
  CHECK(unary[0].bytes == 2 * 2.0 * (N * Cout * Ho * Wo) * sizeof(float));  // input + output, twice

  const auto all = profiler::entries();
  for (size_t i = 1; i < all.size(); ++i) CHECK(all[i - 1].seconds >= all[i].seconds);
  const nlohmann::json json = profiler::to_json();
  CHECK(json["entries"].size() == all.size());
  const std::string table = profiler::table(0, 3);
  CHECK(table.find("GFLOP/s") != std::string::npos);
  CHECK(table.find(all[0].kernel) != std::string::npos);
  CHECK(table.find(std::to_string(all.size() - 3) + " more rows") != std::string::npos);
}

TEST_CASE("profiler: backend() wraps only while enabled; disabling stops recording; reset clears") {
  CHECK(dynamic_cast<ProfilingBackend*>(&backend(Device::CPU)) == nullptr);
  Profiling profiling;
  Backend& wrapper = backend(Device::CPU);
  CHECK(dynamic_cast<ProfilingBackend*>(&wrapper) != nullptr);
  CHECK(std::string(wrapper.name()) == "cpu");
  run_workload();
  const int64_t calls = total_calls();
  CHECK(calls > 0);

  profiler::enable(false);
  CHECK(dynamic_cast<ProfilingBackend*>(&backend(Device::CPU)) == nullptr);
  run_workload();
  const Tensor a = Tensor::zeros({2, 2}), c = Tensor::zeros({2, 2});
  wrapper.gemm(false, false, 1.0, a, a, 0.0, c);  // a wrapper still held records nothing either
  CHECK(total_calls() == calls);

  profiler::reset();
  CHECK(profiler::entries().empty());
  CHECK(profiler::table() == "mdff profiler: no kernel calls recorded\n");
}

TEST_CASE("profiler: results are bit for bit the same with profiling on") {
  const Results off = run_workload();
  Profiling profiling;
  const Results on = run_workload();
  CHECK(!profiler::entries().empty());
  CHECK(on.y.to_vector() == off.y.to_vector());
  CHECK(on.grad_x.to_vector() == off.grad_x.to_vector());
  CHECK(on.grad_weight.to_vector() == off.grad_weight.to_vector());
  CHECK(on.product.to_vector() == off.product.to_vector());
  CHECK(on.activation.to_vector() == off.activation.to_vector());
}

// Run by the next test in a child process; here it only runs the workload.
TEST_CASE(kChildCase) { run_workload(); }

TEST_CASE("profiler: MDFF_PROFILE=1 prints the table to stderr at exit") {
  const std::string report = run_child("MDFF_PROFILE=1");
  CHECK(report.find("mdff profiler (MDFF_PROFILE)") != std::string::npos);
  CHECK(report.find("conv2d_forward") != std::string::npos);
  CHECK(report.find("conv2d_backward") != std::string::npos);
  CHECK(report.find("kernel calls") != std::string::npos);
  CHECK(run_child("MDFF_PROFILE=0").find("mdff profiler") == std::string::npos);
}
