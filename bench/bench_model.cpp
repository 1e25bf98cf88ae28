// One training step's forward + backward of ResNet50-MDFF-SH on the CPU (batch 32, 32x32, both
// scales, pairs = dataset against a U matrix of 5,000 rows by default), for the engine and, with
// --torch, for the PyTorch twin in a separate process in the same run: median seconds, images/s,
// the ratio, and each process's peak resident memory.
//
//   bench_model [--batch 32] [--image-size 32] [--scales 1,0.5] [--train-size 5000] [--iterations 5] [--torch]
#include <nlohmann/json.hpp>
#include <omp.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>

#include "apps/cli.h"
#include "core/blas.h"
#include "core/ops.h"
#include "losses/hash_losses.h"
#include "models/mdff.h"

using namespace mdff;
using json = nlohmann::json;

namespace {
double peak_rss_mib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss / 1024.0;  // Linux reports KiB
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Times forward + backward of ResNet50-MDFF-SH on the CPU, optionally next to PyTorch"};
  int batch = 32, image_size = 32, train_size = 5000, iterations = 5, warmup = 2;
  std::string scales_text = "1,0.5", json_path;
  bool with_torch = false;
  app.add_option("--batch", batch, "batch size")->capture_default_str()->check(CLI::Range(2, 1024));
  app.add_option("--image-size", image_size, "input height = width")->capture_default_str()->check(CLI::Range(32, 512));
  app.add_option("--scales", scales_text, "scales the backbone sees")->capture_default_str();
  app.add_option("--train-size", train_size, "rows of the U matrix (pairs = dataset)")->capture_default_str()
      ->check(CLI::Range(1, 1000000));
  app.add_option("--iterations", iterations, "timed steps (after 2 warm-up steps)")->capture_default_str()
      ->check(CLI::Range(1, 1000));
  app.add_flag("--torch", with_torch, "also time the PyTorch twin (Debian's python3-torch)");
  app.add_option("--json", json_path, "write the results to this JSON file");
  if (auto exit_code = cli::parse(app, argc, argv)) return *exit_code;

  const double baseline = peak_rss_mib();
  MdffConfig config;
  try {
    config.scales = cli::parse_list<double>(scales_text, "--scales");
  } catch (const Error& e) {
    std::fprintf(stderr, "bench_model: %s\n", e.what());
    return 2;
  }
  Rng rng(0);
  MdffSh model(config, rng);
  Tensor train_labels = Tensor::zeros({train_size, config.classes});
  for (int i = 0; i < train_size; ++i) train_labels.data<float>()[i * config.classes + i % config.classes] = 1;
  PairMemory memory(train_labels, config.bits);
  memory.codes().copy_(Tensor::uniform({train_size, config.bits}, rng, -1, 1));
  std::vector<int32_t> rows(batch);
  for (int i = 0; i < batch; ++i) rows[i] = i % train_size;
  const Tensor index = Tensor::from_vector(rows, {batch});
  const Tensor labels = ops::gather_rows(train_labels, index);
  const Tensor images = Tensor::randn({batch, 3, image_size, image_size}, rng);
  std::vector<double> times;
  for (int i = 0; i < warmup + iterations; ++i) {
    model.zero_grad();
    const auto t0 = std::chrono::steady_clock::now();
    const MdffOutput out = model.forward(images);
    mdff_loss(out.u, out.logits, labels, index, &memory, LossConfig{}).total.backward();
    if (i >= warmup) times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  const double engine_s = times[times.size() / 2], engine_peak = peak_rss_mib();
  std::printf("ResNet50-MDFF-SH forward + backward, batch %d, %dx%d, scales %s, U of %d rows; %s, %d threads\n", batch,
              image_size, image_size, scales_text.c_str(), train_size, blas::describe().c_str(), omp_get_max_threads());
  std::printf("%-8s %10s %10s %16s %18s\n", "", "median s", "img/s", "peak RSS MiB", "RSS before model");
  std::printf("%-8s %10.3f %10.1f %16.0f %18.0f\n", "engine", engine_s, batch / engine_s, engine_peak, baseline);
  json result{{"batch", batch}, {"image_size", image_size}, {"scales", config.scales}, {"train_size", train_size},
              {"engine", {{"median_s", engine_s}, {"peak_rss_mib", engine_peak}, {"baseline_rss_mib", baseline}}}};
  if (with_torch) {
    const std::string spec_path = "/tmp/mdff_bench_model_spec.json";
    json cfg{{"backbone", {{"name", "resnet50"}, {"blocks", {3, 4, 6, 3}}, {"widths", {64, 128, 256, 512}}, {"stem", 64}}},
             {"bits", config.bits}, {"classes", config.classes}, {"taps", "all"}, {"scales", config.scales},
             {"lateral_channels", 256}, {"fc1_features", 1024}, {"fusion_features", 1024}, {"pairs", "dataset"},
             {"beta", 0.1}, {"gamma", 0.01}};
    std::ofstream(spec_path) << json{{"config", cfg}, {"batch", batch}, {"image_size", image_size},
                                     {"train_size", train_size}, {"iterations", iterations}, {"warmup", warmup}}.dump();
    const std::string command = "cd " MDFF_SOURCE_DIR "/tools && /usr/bin/python3 torch_model_bench.py < " + spec_path;
    std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(command.c_str(), "r"), pclose);
    std::string text;
    char buffer[4096];
    while (pipe && fgets(buffer, sizeof buffer, pipe.get())) text += buffer;
    try {
      const json torch = json::parse(text);
      const double torch_s = torch.at("median_s");
      std::printf("%-8s %10.3f %10.1f %16.0f %18.0f   (PyTorch %s, %d threads)\n", "PyTorch", torch_s, batch / torch_s,
                  torch.at("peak_rss_mib").get<double>(), torch.at("baseline_rss_mib").get<double>(),
                  torch.at("version").get<std::string>().c_str(), torch.at("threads").get<int>());
      std::printf("engine time / PyTorch time: %.2f (below 1: the engine is faster)\n", engine_s / torch_s);
      result["torch"] = torch;
    } catch (const json::exception&) {
      std::fprintf(stderr, "bench_model: the PyTorch twin failed (is python3-torch installed?): %s\n", text.c_str());
      return 1;
    }
  }
  if (!json_path.empty()) std::ofstream(json_path) << result.dump(2) << "\n";
  return 0;
}
