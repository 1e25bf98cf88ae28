// Convolution speed on the CPU: forward and backward (data + filter) GFLOP/s for every distinct
// convolution of ResNet50 at a given input size and batch, next to this machine's measured SGEMM peak
// and, with --torch, PyTorch's time for the same shapes measured in the same run.
//
//   bench_conv [--input 32] [--batch 32] [--torch] [--json FILE]
#include <nlohmann/json.hpp>
#include <omp.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>

#include "bench/resnet50_convs.h"
#include "bench/timing.h"
#include "apps/cli.h"
#include "core/autograd.h"
#include "core/backend.h"
#include "core/blas.h"
#include "core/ops.h"
#include "core/rng.h"

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

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Times the CPU convolutions of ResNet50 (forward, backward) against the SGEMM peak"};
  int input = 32, batch = 32;
  bool with_torch = false;
  std::string json_path;
  app.add_option("--input", input, "input image size (square)")->check(CLI::Range(8, 1024));
  app.add_option("--batch", batch, "batch size")->check(CLI::Range(1, 4096));
  app.add_flag("--torch", with_torch, "also time PyTorch (Debian's python3-torch) on the same shapes");
  app.add_option("--json", json_path, "write the results to this JSON file");
  if (auto exit_code = cli::parse(app, argc, argv)) return *exit_code;

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
