// Convolution speed: forward and backward GFLOP/s for every distinct convolution of ResNet50 at a given
// input size and batch.
//   On the CPU (the default): forward and backward (data + filter) next to this machine's measured SGEMM
//   peak and, with --torch, PyTorch's time for the same shapes measured in the same run.
//   On the GPU (--device cuda): cuDNN's forward, backward-data and backward-filter times (each plan's
//   fastest algorithm), and for every 1x1 convolution of stride 1 the same three products through cuBLAS
//   (the engine's routes of cuda/conv.h: strided-batched GEMMs over the images, the filter gradient one GEMM
//   per image, summed), checked against cuDNN's results; what the engine's measured route picked for each
//   product, and what routing each to the faster library saves per pass.
//
// PyTorch's side (--torch) is tools/torch_conv_bench.py under --python (default /usr/bin/python3, Debian's
// python3-torch); when it cannot run, the benchmark stops with the reason rather than print the engine alone.
//
//   bench_conv [--device cpu|cuda] [--input 32] [--batch 32] [--precision tf32|fp32] [--torch [--python PATH]]
//              [--json FILE]
// Exit status 0; 1 when a cuBLAS result is not cuDNN's, PyTorch's timings could not be measured, the JSON could
// not be written or a kernel failed; 2 for a bad option or value (--device cuda without a usable GPU among them).
#include <nlohmann/json.hpp>
#include <omp.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "bench/resnet50_convs.h"
#include "bench/timing.h"
#include "apps/cli.h"
#include "core/autograd.h"
#include "core/backend.h"
#include "core/blas.h"
#include "core/file_io.h"
#include "core/ops.h"
#include "core/rng.h"

#ifdef MDFF_WITH_CUDA
#include "cuda/conv.h"
#endif

using namespace mdff;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

// `text` in single quotes for the shell, its own single quotes escaped.
std::string shell_quote(const std::string& text) {
  std::string quoted = "'";
  for (char c : text) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

// The program a shell would run for --python's `name` (cli::find_program, as mdff_search finds its Python).
// Throws an Error saying why when there is none.
std::string find_python(const std::string& name) {
  std::string why;
  const std::string program = cli::find_program(name, why);
  if (program.empty()) throw Error("--python " + why);
  return program;
}

// A temporary file of this run's own (mkstemp), removed when this goes out of scope: concurrent runs never
// share one, and none is left behind.
struct TempFile {
  std::string path;
  TempFile() {
    std::string pattern = (fs::temp_directory_path() / "mdff_bench_conv_shapes_XXXXXX").string();
    const int fd = ::mkstemp(pattern.data());
    if (fd < 0) throw Error("cannot make a temporary file " + pattern + ": " + std::strerror(errno));
    ::close(fd);
    path = pattern;
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  ~TempFile() { ::unlink(path.c_str()); }
};

// PyTorch's median forward and backward seconds per shape, from tools/torch_conv_bench.py under `python`.
// Throws an Error with the reason when they cannot be measured: --torch asked for them, so the run stops.
json torch_times(const std::string& python, const json& shapes, int batch) {
  const std::string program = find_python(python);
  const TempFile input;
  io::write_file_atomic(input.path, json{{"batch", batch}, {"shapes", shapes}}.dump());
  const std::string script = MDFF_SOURCE_DIR "/tools/torch_conv_bench.py";
  const std::string command = shell_quote(program) + " " + shell_quote(script) + " < " + shell_quote(input.path);
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) throw Error("--torch: cannot start " + command + ": " + std::strerror(errno));
  std::string out;
  char buffer[4096];
  while (size_t n = fread(buffer, 1, sizeof buffer, pipe)) out.append(buffer, n);
  const int status = pclose(pipe);
  const std::string failed = "--torch: PyTorch's timings could not be measured: " + program + " " + script;
  if (status == -1) throw Error(failed + ": " + std::strerror(errno));
  if (WIFSIGNALED(status)) throw Error(failed + " was killed by signal " + std::to_string(WTERMSIG(status)));
  if (WEXITSTATUS(status) != 0)
    throw Error(failed + " ended with status " + std::to_string(WEXITSTATUS(status)) +
                " (its messages, if any, are above; is PyTorch installed for " + program + "?)");
  const json times = json::parse(out, nullptr, false);
  bool complete = times.is_array() && times.size() == shapes.size();
  for (size_t i = 0; complete && i < times.size(); ++i)
    complete = times[i].is_object() && times[i].value("forward_s", json()).is_number() &&
               times[i].value("backward_s", json()).is_number();
  if (!complete) throw Error(failed + " answered no timing for each of the " + std::to_string(shapes.size()) +
                             " shapes: " + out.substr(0, 500));
  return times;
}

// The CPU table: every distinct convolution, forward and backward, against the SGEMM peak (and PyTorch, under
// `python`, with --torch).
int run_cpu(int input, int batch, bool with_torch, const std::string& python, const std::string& json_path) {
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
  const json torch = with_torch ? torch_times(python, shapes_json, batch) : json();

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
  if (!json_path.empty()) io::write_file_atomic(json_path, result.dump(2) + "\n");
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

// The GPU table: cuDNN's three products for every distinct convolution, and cuBLAS's next to them for the
// 1x1 convolutions of stride 1 (the engine's forced routes, cuda/conv.h), with the library the engine's
// measured route picked. Returns 1 when a cuBLAS result is not cuDNN's.
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
              "largest value, must stay under %.0e); \"engine\": the library the measured route picked for "
              "forward, backward-data, backward-filter (D cuDNN, B cuBLAS)\n\n",
              bench::device_name(Device::CUDA).c_str(), input, input, batch, tf32 ? "TF32" : "FP32", tolerance);
  std::printf("%-28s %3s | %8s %8s %8s | %8s %8s %8s | %8s | %6s\n", "convolution", "n", "fwd", "bwd-data",
              "bwd-filt", "cuBLAS f", "cuBLAS d", "cuBLAS w", "max diff", "engine");

  const bench::RandomOperands random(Device::CUDA);
  Rng rng(2);
  NoGradGuard no_grad;
  json rows = json::array();
  double cudnn_total = 0, best_total = 0, gemm_candidates_total = 0;  // seconds per pass, counts applied
  int faster = 0, compared = 0, engine_cublas = 0, engine_agrees = 0;
  bool all_agree = true;
  for (const bench::ConvShape& s : bench::resnet50_convs(input)) {
    const Tensor x = random({batch, s.cin, s.size, s.size}, rng);
    const Tensor w = random({s.cout, s.cin, s.kernel, s.kernel}, rng, 0.05);
    const Tensor grad_y = random({batch, s.cout, s.out_size(), s.out_size()}, rng);
    const Conv2dParams p{s.stride, s.padding};
    // The three products' results, and their times on the current route.
    struct Products {
      double seconds[3];
      Tensor y, grad_x, grad_w;
    };
    // Product d (0 forward, 1 backward-data, 2 backward-filter) into `out`.
    auto product = [&](int d, const Products& out) {
      if (d == 0) gpu.conv2d_forward(x, w, Tensor(), p, out.y);
      else if (d == 1) gpu.conv2d_backward(x, w, grad_y, p, out.grad_x, Tensor(), Tensor());
      else gpu.conv2d_backward(x, w, grad_y, p, Tensor(), out.grad_w, Tensor());
    };
    auto products = [&] {
      Products r{{}, Tensor::empty(grad_y.shape(), DType::F32, Device::CUDA),
                 Tensor::empty(x.shape(), DType::F32, Device::CUDA), Tensor::empty(w.shape(), DType::F32, Device::CUDA)};
      for (int d = 0; d < 3; ++d) r.seconds[d] = seconds([&] { product(d, r); });
      return r;
    };
    cuda::set_conv1x1_route(cuda::Conv1x1Route::Cudnn);
    const Products cudnn = products();
    const double* t = cudnn.seconds;
    std::printf("%-28s %3d | %8.3f %8.3f %8.3f |", s.name.c_str(), s.count, t[0] * 1e3, t[1] * 1e3, t[2] * 1e3);
    json row{{"name", s.name}, {"count", s.count}, {"gflop_forward", s.flops(batch) / 1e9},
             {"cudnn_s", {t[0], t[1], t[2]}}};
    double row_best = t[0] + t[1] + t[2];
    if (s.kernel == 1 && s.stride == 1 && s.padding == 0) {
      cuda::set_conv1x1_route(cuda::Conv1x1Route::Cublas);
      const Products cublas = products();
      const double* b = cublas.seconds;
      const double difference =
          std::max({relative_difference(cublas.y, cudnn.y), relative_difference(cublas.grad_x, cudnn.grad_x),
                    relative_difference(cublas.grad_w, cudnn.grad_w)});
      const bool agrees = difference <= tolerance;
      all_agree = all_agree && agrees;
      // What the measured route runs (its plans were timed by the cuBLAS route's first calls): one call of each
      // product, into cuBLAS's results, which have been compared.
      cuda::set_conv1x1_route(cuda::Conv1x1Route::Measured);
      std::string engine;
      row_best = 0;
      for (int d = 0; d < 3; ++d) {
        const int64_t before = cuda::conv_stats().cublas_calls;
        product(d, cublas);
        const bool picked_cublas = cuda::conv_stats().cublas_calls > before;
        engine += picked_cublas ? 'B' : 'D';
        engine_cublas += picked_cublas;
        engine_agrees += picked_cublas == (b[d] < t[d]);
        faster += b[d] < t[d];
        row_best += std::min(t[d], b[d]);
      }
      compared += 3;
      std::printf(" %8.3f %8.3f %8.3f | %8.1e | %6s%s\n", b[0] * 1e3, b[1] * 1e3, b[2] * 1e3, difference,
                  engine.c_str(), agrees ? "" : "  DIFFERS");
      gemm_candidates_total += s.count * (t[0] + t[1] + t[2]);
      row["cublas_s"] = {b[0], b[1], b[2]};
      row["max_relative_difference"] = difference;
      row["engine_route"] = engine;
    } else {
      std::printf(" %8s %8s %8s | %8s | %6s\n", "-", "-", "-", "-", "DDD");
    }
    cudnn_total += s.count * (t[0] + t[1] + t[2]);
    best_total += s.count * row_best;
    rows.push_back(row);
  }
  cuda::set_conv1x1_route(cuda::Conv1x1Route::Measured);
  std::printf("\ncuBLAS was faster than cuDNN in %d of the %d products of 1x1 convolutions of stride 1 (batch %d); "
              "the engine's measured route (one timing when each plan was made) picked cuBLAS for %d of them, and "
              "agreed with this table on %d of the %d.\n"
              "(cuBLAS's filter gradient is one GEMM per image, launch-bound on small maps.)\n",
              faster, compared, batch, engine_cublas, engine_agrees, compared);
  std::printf("One pass's convolutions at batch %d (forward, backward-data, backward-filter, each counted as often as "
              "ResNet50 has it): cuDNN %.2f ms, of which %.2f ms the 1x1 convolutions of stride 1; with the faster of "
              "cuDNN and cuBLAS for each of their products %.2f ms (%.1f%% less)\n",
              batch, cudnn_total * 1e3, gemm_candidates_total * 1e3, best_total * 1e3,
              100 * (cudnn_total - best_total) / cudnn_total);
  if (!all_agree) std::printf("A cuBLAS result is not cuDNN's (DIFFERS above): the GEMM formulation is wrong.\n");
  const json result{{"device", bench::device_name(Device::CUDA)}, {"input", input}, {"batch", batch},
                    {"precision", tf32 ? "tf32" : "fp32"}, {"convolutions", rows}, {"cudnn_s", cudnn_total},
                    {"cudnn_1x1_stride1_s", gemm_candidates_total}, {"best_of_both_s", best_total},
                    {"cublas_faster_products", faster}, {"compared_products", compared},
                    {"engine_cublas_products", engine_cublas}, {"engine_agrees_products", engine_agrees}};
  if (!json_path.empty()) io::write_file_atomic(json_path, result.dump(2) + "\n");
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
  std::string json_path, python = "/usr/bin/python3";
  app.add_option("--device", device, "cpu, or cuda: cuDNN's times, and cuBLAS's for the 1x1 convolutions")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--input", input, "input image size (square)")->capture_default_str()->transform(cli::whole_number(8, 1024));
  app.add_option("--batch", batch, "batch size")->capture_default_str()->transform(cli::whole_number(1, 4096));
  app.add_option("--precision", precision, "GPU math: tf32 (tensor cores, the engine's default) or fp32")
      ->capture_default_str()
      ->check(CLI::IsMember({"tf32", "fp32"}));
  CLI::Option* torch_flag =
      app.add_flag("--torch", with_torch, "CPU: also time PyTorch on the same shapes (the run stops when it cannot)");
  app.add_option("--python", python, "with --torch: the Python that runs PyTorch (a name without a '/' is looked "
                 "for on PATH)")->capture_default_str()->needs(torch_flag);
  app.add_option("--json", json_path, "write the results to this JSON file");
  if (auto exit_code = cli::parse(app, argc, argv)) return *exit_code;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each row as it is measured, also into a log a timeout may cut short

  // Option values CLI11 cannot check alone: usage errors (exit 2), like CLI11's own.
  auto usage_error = [](const std::string& reason) {
    std::fprintf(stderr, "bench_conv: %s\nRun with --help for more information.\n", reason.c_str());
    return 2;
  };
  // PyTorch's side is timed on the CPU only: on the GPU, --torch would be dropped without a word.
  if (with_torch && device == "cuda")
    return usage_error("--torch times PyTorch on the CPU only: drop it with --device cuda");
  if (std::string why_not; device == "cuda" && !cuda_available(&why_not))
    return usage_error("--device cuda: " + why_not);
  try {
    if (!json_path.empty()) io::check_writable(json_path);  // fails now, not after the timing
    if (device == "cpu") return run_cpu(input, batch, with_torch, python, json_path);
    return run_gpu(input, batch, precision == "tf32", json_path);
  } catch (const std::exception& e) {  // PyTorch's side, a kernel or the JSON's write failed
    std::fprintf(stderr, "bench_conv: error: %s\n", e.what());
    return 1;
  }
}
