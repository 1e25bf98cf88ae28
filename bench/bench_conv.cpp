// Convolution speed: forward and backward GFLOP/s for every distinct convolution of ResNet50 at a given
// input size and batch.
//   On the CPU (the default): forward and backward (data + filter) next to this machine's measured SGEMM
//   peak and, with --torch, PyTorch's time for the same shapes measured in the same run.
//   On the GPU (--device cuda): cuDNN's forward, backward-data and backward-filter times (each plan's
//   fastest algorithm), and for every 1x1 convolution of stride 1 the same three products through cuBLAS
//   (strided-batched GEMMs over the images; the filter gradient one GEMM per image, summed), checked against
//   cuDNN's results: whether routing 1x1 convolutions to cuBLAS would be faster, and by how much per pass.
//
//   bench_conv [--device cpu|cuda] [--input 32] [--batch 32] [--precision tf32|fp32] [--torch] [--json FILE]
#include <nlohmann/json.hpp>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "bench/resnet50_convs.h"
#include "bench/timing.h"
#include "apps/cli.h"
#include "core/autograd.h"
#include "core/backend.h"
#include "core/blas.h"
#include "core/ops.h"
#include "core/rng.h"

#ifdef MDFF_WITH_CUDA
#include <cublas_v2.h>

#include "cuda/check.h"
#include "cuda/conv.h"
#include "cuda/device.h"
#endif

using namespace mdff;
using json = nlohmann::json;

namespace {

// PyTorch's median forward and backward seconds per shape, from tools/torch_conv_bench.py.
json torch_times(const json& shapes, int batch) {
  const std::string tmp = "/tmp/mdff_bench_conv_shapes.json";
  std::ofstream(tmp) << json{{"batch", batch}, {"shapes", shapes}}.dump();
  const std::string cmd = "/usr/bin/python3 " MDFF_SOURCE_DIR "/tools/torch_conv_bench.py < " + tmp;
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(cmd.c_str(), "r"), pclose);
  if (!pipe) return json();
  std::string out;
  char buffer[4096];
  while (size_t n = fread(buffer, 1, sizeof buffer, pipe.get())) out.append(buffer, n);
  try {
    return json::parse(out);
  } catch (const json::exception&) {
    std::cerr << "bench_conv: PyTorch reference failed (is python3-torch installed?): " << out << "\n";
    return json();
  }
}

// The CPU table: every distinct convolution, forward and backward, against the SGEMM peak (and PyTorch).
int run_cpu(int input, int batch, bool with_torch, const std::string& json_path) {
  const double peak = bench::sgemm_peak_gflops();
  std::printf("SGEMM peak on this machine: %.1f GFLOP/s (%s, %d threads)\n", peak, blas::describe().c_str(),
              omp_get_max_threads());
  std::printf("ResNet50 convolutions at %dx%d, batch %d, float32 (backward = data + filter gradients)\n\n", input,
              input, batch);

  const auto shapes = bench::resnet50_convs(input);
  json shapes_json = json::array();
  for (const auto& s : shapes)
    shapes_json.push_back({{"cin", s.cin}, {"cout", s.cout}, {"kernel", s.kernel}, {"stride", s.stride},
                           {"padding", s.padding}, {"size", s.size}});
  const json torch = with_torch ? torch_times(shapes_json, batch) : json();

  std::printf("%-28s %3s %9s %9s %9s %9s", "convolution", "n", "fwd ms", "fwd GF/s", "bwd ms", "bwd GF/s");
  if (!torch.is_null()) std::printf(" %9s %9s", "torch fwd", "torch bwd");
  std::printf("\n");
  Rng rng(2);
  NoGradGuard no_grad;
  json rows = json::array();
  double total[4] = {0, 0, 0, 0}, total_flops = 0;  // engine fwd, engine bwd, torch fwd, torch bwd (s/pass)
  for (size_t i = 0; i < shapes.size(); ++i) {
    const auto& s = shapes[i];
    Tensor x = Tensor::randn({batch, s.cin, s.size, s.size}, rng);
    Tensor w = Tensor::randn({s.cout, s.cin, s.kernel, s.kernel}, rng, 0.05);
    Tensor y = ops::conv2d(x, w, Tensor(), s.stride, s.padding);
    Tensor gy = Tensor::randn(y.shape(), rng), gx = Tensor::empty(x.shape()), gw = Tensor::empty(w.shape());
    const Conv2dParams p{s.stride, s.padding};
    const double fwd = bench::median_seconds([&] { ops::conv2d(x, w, Tensor(), s.stride, s.padding); });
    const double bwd =
        bench::median_seconds([&] { backend(Device::CPU).conv2d_backward(x, w, gy, p, gx, gw, Tensor()); });
    const double flops = s.flops(batch);
    std::printf("%-28s %3d %9.3f %9.1f %9.3f %9.1f", s.name.c_str(), s.count, fwd * 1e3, flops / fwd / 1e9, bwd * 1e3,
                2 * flops / bwd / 1e9);
    json row{{"name", s.name}, {"count", s.count}, {"gflop_forward", flops / 1e9}, {"forward_s", fwd},
             {"backward_s", bwd}};
    total[0] += s.count * fwd;
    total[1] += s.count * bwd;
    total_flops += s.count * flops;
    if (!torch.is_null()) {
      const double tf = torch[i]["forward_s"], tb = torch[i]["backward_s"];
      std::printf(" %9.3f %9.3f", tf * 1e3, tb * 1e3);
      row["torch_forward_s"] = tf;
      row["torch_backward_s"] = tb;
      total[2] += s.count * tf;
      total[3] += s.count * tb;
    }
    std::printf("\n");
    rows.push_back(row);
  }
  std::printf("\nall %zu convolutions of one ResNet50 pass (%.2f GFLOP forward):\n", shapes.size(), total_flops / 1e9);
  std::printf("  forward  %8.1f ms  %6.1f GFLOP/s  (%.0f%% of the SGEMM peak)\n", total[0] * 1e3,
              total_flops / total[0] / 1e9, 100 * total_flops / total[0] / 1e9 / peak);
  std::printf("  backward %8.1f ms  %6.1f GFLOP/s  (%.0f%% of the SGEMM peak)\n", total[1] * 1e3,
              2 * total_flops / total[1] / 1e9, 100 * 2 * total_flops / total[1] / 1e9 / peak);
  json result{{"input", input}, {"batch", batch}, {"sgemm_peak_gflops", peak}, {"convolutions", rows},
              {"forward_s", total[0]}, {"backward_s", total[1]}};
  if (!torch.is_null()) {
    std::printf("  PyTorch  forward %.1f ms, backward %.1f ms: engine/PyTorch time ratio %.2f (forward), %.2f "
                "(backward); above 1 means the engine is slower\n",
                total[2] * 1e3, total[3] * 1e3, total[0] / total[2], total[1] / total[3]);
    result["torch_forward_s"] = total[2];
    result["torch_backward_s"] = total[3];
  }
  if (!json_path.empty()) std::ofstream(json_path) << result.dump(2) << "\n";
  return 0;
}

#ifdef MDFF_WITH_CUDA
// The largest |a - b| over the largest |b| (NaN when either holds a NaN): how far cuBLAS's result is from
// cuDNN's.
double relative_difference(const Tensor& a, const Tensor& b) {
  const std::vector<double> va = a.to_vector(), vb = b.to_vector();
  double difference = 0, scale = 0;
  for (size_t i = 0; i < va.size(); ++i) {
    const double d = std::fabs(va[i] - vb[i]);
    if (std::isnan(d)) return d;
    difference = std::max(difference, d);
    scale = std::max(scale, std::fabs(vb[i]));
  }
  return scale > 0 ? difference / scale : difference;
}

// A 1x1 convolution of stride 1 without padding through cuBLAS: per image a matrix product,
// y[n] (Cout,HW) = w (Cout,Cin) x[n] (Cin,HW), all images in one strided-batched call. cuBLAS is
// column-major, where a row-major (R,C) matrix reads as its (C,R) transpose, so each call computes the
// transposed product on the same memory (the run checks every result against cuDNN's).
class Conv1x1Gemm {
 public:
  Conv1x1Gemm(int batch, int cin, int cout, int hw, bool tf32)
      : batch_(batch), cin_(cin), cout_(cout), hw_(hw), tf32_(tf32) {}

  // y^T[n] (HW,Cout) = x^T[n] (HW,Cin) w^T (Cin,Cout)
  void forward(const Tensor& x, const Tensor& w, const Tensor& y) const {
    MDFF_CUBLAS_CHECK(cublasSgemmStridedBatched(handle(), CUBLAS_OP_N, CUBLAS_OP_N, hw_, cout_, cin_, &kOne,
                                                x.data<float>(), hw_, int64_t(cin_) * hw_, w.data<float>(), cin_, 0,
                                                &kZero, y.data<float>(), hw_, int64_t(cout_) * hw_, batch_));
  }
  // grad_x^T[n] (HW,Cin) = grad_y^T[n] (HW,Cout) w (Cout,Cin)
  void backward_data(const Tensor& grad_y, const Tensor& w, const Tensor& grad_x) const {
    MDFF_CUBLAS_CHECK(cublasSgemmStridedBatched(handle(), CUBLAS_OP_N, CUBLAS_OP_T, hw_, cin_, cout_, &kOne,
                                                grad_y.data<float>(), hw_, int64_t(cout_) * hw_, w.data<float>(), cin_,
                                                0, &kZero, grad_x.data<float>(), hw_, int64_t(cin_) * hw_, batch_));
  }
  // grad_w^T (Cin,Cout) = sum over the images of x[n] (Cin,HW) grad_y^T[n] (HW,Cout): in NCHW the images'
  // pixels are not one stride apart, so one GEMM per image, each adding to the last.
  void backward_filter(const Tensor& x, const Tensor& grad_y, const Tensor& grad_w) const {
    for (int n = 0; n < batch_; ++n)
      MDFF_CUBLAS_CHECK(cublasSgemm(handle(), CUBLAS_OP_T, CUBLAS_OP_N, cin_, cout_, hw_, &kOne,
                                    x.data<float>() + int64_t(n) * cin_ * hw_, hw_,
                                    grad_y.data<float>() + int64_t(n) * cout_ * hw_, hw_, n == 0 ? &kZero : &kOne,
                                    grad_w.data<float>(), cin_));
  }

 private:
  static constexpr float kOne = 1.0f, kZero = 0.0f;
  cublasHandle_t handle() const {  // the engine's handle (its workspace, its stream), in this run's math mode
    cublasHandle_t h = cuda::cublas_handle();
    MDFF_CUBLAS_CHECK(cublasSetMathMode(h, tf32_ ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
    return h;
  }
  int batch_, cin_, cout_, hw_;
  bool tf32_;
};

// The GPU table: cuDNN's three products for every distinct convolution, and cuBLAS's next to them for the
// 1x1 convolutions of stride 1. Returns 1 when a cuBLAS result is not cuDNN's.
int run_gpu(int input, int batch, bool tf32, const std::string& json_path) {
  std::string why_not;
  MDFF_CHECK(cuda_available(&why_not), "--device cuda: ", why_not);
  // Every call on its plan's fastest algorithm (cuda/conv.cpp): in a loop over one shape the memory mark of
  // core/workspace_policy.h would send calls to the lean algorithm, which a training step takes at its peak only.
  setenv("MDFF_CONV_LEAN", "0", 1);
  set_tf32_allowed(tf32);
  Backend& gpu = backend(Device::CUDA);
  auto seconds = [](const std::function<void()>& call) {
    return bench::device_median_seconds(Device::CUDA, call, 3, 0.1);
  };
  // A wrong formulation is off by O(1); the two libraries differ by their rounding (TF32: 10-bit mantissas).
  const double tolerance = tf32 ? 2e-2 : 1e-3;
  std::printf("%s: ResNet50 convolutions at %dx%d, batch %d, %s; ms per call, cuDNN's fastest algorithm; "
              "cuBLAS for the 1x1 convolutions of stride 1 (its difference from cuDNN's result, relative to the "
              "largest value, must stay under %.0e)\n\n",
              bench::device_name(Device::CUDA).c_str(), input, input, batch, tf32 ? "TF32" : "FP32", tolerance);
  std::printf("%-28s %3s | %8s %8s %8s | %8s %8s %8s | %8s\n", "convolution", "n", "fwd", "bwd-data", "bwd-filt",
              "cuBLAS f", "cuBLAS d", "cuBLAS w", "max diff");

  const bench::RandomOperands random(Device::CUDA);
  Rng rng(2);
  NoGradGuard no_grad;
  json rows = json::array();
  double cudnn_total = 0, best_total = 0, gemm_candidates_total = 0;  // seconds per pass, counts applied
  int faster = 0, compared = 0;
  bool all_agree = true;
  for (const bench::ConvShape& s : bench::resnet50_convs(input)) {
    const Tensor x = random({batch, s.cin, s.size, s.size}, rng);
    const Tensor w = random({s.cout, s.cin, s.kernel, s.kernel}, rng, 0.05);
    const Tensor y = Tensor::empty({batch, s.cout, s.out_size(), s.out_size()}, DType::F32, Device::CUDA);
    const Tensor grad_y = random(y.shape(), rng);
    const Tensor grad_x = Tensor::empty(x.shape(), DType::F32, Device::CUDA);
    const Tensor grad_w = Tensor::empty(w.shape(), DType::F32, Device::CUDA);
    const Conv2dParams p{s.stride, s.padding};
    const double cudnn[3] = {
        seconds([&] { gpu.conv2d_forward(x, w, Tensor(), p, y); }),
        seconds([&] { gpu.conv2d_backward(x, w, grad_y, p, grad_x, Tensor(), Tensor()); }),
        seconds([&] { gpu.conv2d_backward(x, w, grad_y, p, Tensor(), grad_w, Tensor()); })};
    std::printf("%-28s %3d | %8.3f %8.3f %8.3f |", s.name.c_str(), s.count, cudnn[0] * 1e3, cudnn[1] * 1e3,
                cudnn[2] * 1e3);
    json row{{"name", s.name}, {"count", s.count}, {"gflop_forward", s.flops(batch) / 1e9},
             {"cudnn_s", {cudnn[0], cudnn[1], cudnn[2]}}};
    double row_best = cudnn[0] + cudnn[1] + cudnn[2];
    if (s.kernel == 1 && s.stride == 1 && s.padding == 0) {
      const Conv1x1Gemm gemm(batch, s.cin, s.cout, s.size * s.size, tf32);
      const Tensor y2 = Tensor::empty(y.shape(), DType::F32, Device::CUDA);
      const Tensor grad_x2 = Tensor::empty(x.shape(), DType::F32, Device::CUDA);
      const Tensor grad_w2 = Tensor::empty(w.shape(), DType::F32, Device::CUDA);
      const double cublas[3] = {seconds([&] { gemm.forward(x, w, y2); }),
                                seconds([&] { gemm.backward_data(grad_y, w, grad_x2); }),
                                seconds([&] { gemm.backward_filter(x, grad_y, grad_w2); })};
      const double difference = std::max({relative_difference(y2, y), relative_difference(grad_x2, grad_x),
                                          relative_difference(grad_w2, grad_w)});
      const bool agrees = difference <= tolerance;
      all_agree = all_agree && agrees;
      std::printf(" %8.3f %8.3f %8.3f | %8.1e%s\n", cublas[0] * 1e3, cublas[1] * 1e3, cublas[2] * 1e3, difference,
                  agrees ? "" : "  DIFFERS");
      row_best = 0;
      for (int d = 0; d < 3; ++d) {
        faster += cublas[d] < cudnn[d];
        row_best += std::min(cudnn[d], cublas[d]);
      }
      compared += 3;
      gemm_candidates_total += s.count * (cudnn[0] + cudnn[1] + cudnn[2]);
      row["cublas_s"] = {cublas[0], cublas[1], cublas[2]};
      row["max_relative_difference"] = difference;
    } else {
      std::printf(" %8s %8s %8s |\n", "-", "-", "-");
    }
    cudnn_total += s.count * (cudnn[0] + cudnn[1] + cudnn[2]);
    best_total += s.count * row_best;
    rows.push_back(row);
  }
  std::printf("\ncuBLAS was faster than cuDNN in %d of the %d products of 1x1 convolutions of stride 1 (batch %d).\n"
              "(cuBLAS's filter gradient here is one GEMM per image, launch-bound on small maps: where it loses, a "
              "better GEMM formulation might not.)\n",
              faster, compared, batch);
  std::printf("One pass's convolutions at batch %d (forward, backward-data, backward-filter, each counted as often as "
              "ResNet50 has it): cuDNN %.2f ms, of which %.2f ms the 1x1 convolutions of stride 1; with the faster of "
              "cuDNN and cuBLAS for each of their products %.2f ms (%.1f%% less)\n",
              batch, cudnn_total * 1e3, gemm_candidates_total * 1e3, best_total * 1e3,
              100 * (cudnn_total - best_total) / cudnn_total);
  if (!all_agree) std::printf("A cuBLAS result is not cuDNN's (DIFFERS above): the GEMM formulation is wrong.\n");
  const json result{{"device", bench::device_name(Device::CUDA)}, {"input", input}, {"batch", batch},
                    {"precision", tf32 ? "tf32" : "fp32"}, {"convolutions", rows}, {"cudnn_s", cudnn_total},
                    {"cudnn_1x1_stride1_s", gemm_candidates_total}, {"best_of_both_s", best_total},
                    {"cublas_faster_products", faster}, {"compared_products", compared}};
  if (!json_path.empty()) std::ofstream(json_path) << result.dump(2) << "\n";
  return all_agree ? 0 : 1;
}
#else
int run_gpu(int, int, bool, const std::string&) {
  std::fprintf(stderr, "bench_conv: --device cuda: this build has no CUDA backend (configure with -DMDFF_CUDA=ON)\n");
  return 1;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Times ResNet50's convolutions (forward, backward) on the CPU against the SGEMM peak, or on the GPU "
               "through cuDNN and, for the 1x1 convolutions, through cuBLAS"};
  std::string device = "cpu", precision = "tf32";
  int input = 32, batch = 32;
  bool with_torch = false;
  std::string json_path;
  app.add_option("--device", device, "cpu, or cuda: cuDNN's times, and cuBLAS's for the 1x1 convolutions")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--input", input, "input image size (square)")->capture_default_str()->check(CLI::Range(8, 1024));
  app.add_option("--batch", batch, "batch size")->capture_default_str()->check(CLI::Range(1, 4096));
  app.add_option("--precision", precision, "GPU math: tf32 (tensor cores, the engine's default) or fp32")
      ->capture_default_str()
      ->check(CLI::IsMember({"tf32", "fp32"}));
  app.add_flag("--torch", with_torch, "CPU: also time PyTorch (Debian's python3-torch) on the same shapes");
  app.add_option("--json", json_path, "write the results to this JSON file");
  if (auto exit_code = cli::parse(app, argc, argv)) return *exit_code;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each row as it is measured, also into a log a timeout may cut short
  try {
    if (device == "cpu") return run_cpu(input, batch, with_torch, json_path);
    return run_gpu(input, batch, precision == "tf32", json_path);
  } catch (const Error& e) {
    std::fprintf(stderr, "bench_conv: %s\n", e.what());
    return 1;
  }
}
