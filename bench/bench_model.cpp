// ResNet50-MDFF-SH on the CPU, the engine next to its PyTorch twin in the same run, on
//   (a) the training step: batch 32, 32x32, both scales (1, 0.5), J = J1 + beta J2 + gamma J3 with
//       pairs = dataset against a U matrix of 5,000 rows; zero_grad, forward, backward and one RMSProp
//       step over all parameters (lr 1e-5, alpha 0.99, eps 1e-8, weight decay 1e-5), as
//       optim/trainer.cpp does it (ParameterBuffer + RMSProp) and as torch.optim.RMSprop does it;
//   (b) encoding: evaluation mode, no graph (NoGradGuard / torch.no_grad()), batch 256, both scales.
// PyTorch (Debian's python3-torch, tools/torch_model_bench.py over tools/torch_twin.py) runs in ONE
// child process, spawned once: it builds its model once and then waits for commands ("train 3",
// "encode 3") on stdin, answering with its timings. The two sides take turns, round by round (engine,
// PyTorch, engine, ...), never at the same time, so that drift in the machine's speed falls on both
// alike; after warm-up, the median is over all timed iterations of a side. For each of (a) and (b):
// images/s of each side, the ratio engine/PyTorch (above 1: the engine is faster), the peak resident
// memory of each process during that phase, and the engine's GFLOP/s (the FLOPs of one step or batch
// as core/profiler.h counts them, over the median time) against the SGEMM peak measured in this run.
//
// Peak memory per phase: the training row is the high-water mark (VmHWM) from the process's start
// through training; each process then gives the memory it has freed back to the system (malloc_trim)
// and resets its mark (/proc/self/clear_refs), so the encoding row is encoding's own peak, with the
// model, gradients and optimizer state still allocated. Where the kernel refuses the reset, the
// encoding row is the cumulative peak and says so. A process's peak is the larger of its two.
//
//   bench_model [--batch 32] [--encode-batch 256] [--image-size 32] [--scales 1,0.5] [--train-size 5000]
//               [--warmup 2] [--rounds 3] [--iterations 3] [--no-torch] [--json FILE]
#include <fcntl.h>
#include <malloc.h>
#include <nlohmann/json.hpp>
#include <omp.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "apps/cli.h"
#include "bench/timing.h"
#include "core/autograd.h"
#include "core/backend.h"
#include "core/blas.h"
#include "core/ops.h"
#include "core/profiler.h"
#include "losses/hash_losses.h"
#include "models/mdff.h"
#include "optim/optimizers.h"

extern char** environ;

using namespace mdff;
using json = nlohmann::json;

namespace {

constexpr const char* kPython = "/usr/bin/python3";
constexpr const char* kServer = MDFF_SOURCE_DIR "/tools/torch_model_bench.py";
// A pause before each round: the other side's idle OpenMP and OpenBLAS threads stop spinning.
constexpr auto kSettle = std::chrono::milliseconds(100);

// A line of /proc/self/status in MiB, e.g. "VmHWM:" (the resident high-water mark, which
// reset_peak_rss() lowers) or "VmRSS:" (the resident memory now); ru_maxrss without /proc.
double status_mib(const char* key) {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind(key, 0) == 0) return std::stod(line.substr(std::strlen(key))) / 1024.0;  // in kB
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss / 1024.0;  // Linux reports KiB
}
double peak_rss_mib() { return status_mib("VmHWM:"); }

// Resets the high-water mark to the current RSS (Linux >= 4.0); false where the kernel refuses.
bool reset_peak_rss() {
  const int fd = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool done = write(fd, "5", 1) == 1;
  close(fd);
  return done;
}

// The FLOPs of one call of fn, as the profiler counts them (2 x multiply-adds of convolutions and
// matrix products). A profile the user asked for (MDFF_PROFILE=1) keeps running and keeps its records.
double count_flops(const std::function<void()>& fn) {
  auto recorded = [] {
    double flops = 0;
    for (const profiler::Entry& e : profiler::entries()) flops += e.flops;
    return flops;
  };
  const bool was_enabled = profiler::enabled();
  const double before = recorded();
  profiler::enable(true);
  fn();
  profiler::enable(was_enabled);
  return recorded() - before;
}

// tools/torch_model_bench.py as a child process: one JSON line each way per command.
class TorchServer {
 public:
  // Spawns the server, sends the spec and returns its "ready" answer; throws with the reason when
  // python3 or torch is missing or the server does not start.
  json start(const json& spec) {
    if (access(kPython, X_OK) != 0) throw std::runtime_error(std::string(kPython) + " is not there");
    int to_child[2], from_child[2];
    if (pipe2(to_child, O_CLOEXEC) != 0) throw std::runtime_error(std::strerror(errno));
    if (pipe2(from_child, O_CLOEXEC) != 0) {
      close(to_child[0]);
      close(to_child[1]);
      throw std::runtime_error(std::strerror(errno));
    }
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, to_child[0], STDIN_FILENO);  // dup2 clears O_CLOEXEC
    posix_spawn_file_actions_adddup2(&actions, from_child[1], STDOUT_FILENO);
    char* argv[] = {const_cast<char*>("python3"), const_cast<char*>(kServer), nullptr};
    const int rc = posix_spawn(&pid_, kPython, &actions, nullptr, argv, environ);
    posix_spawn_file_actions_destroy(&actions);
    close(to_child[0]);
    close(from_child[1]);
    if (rc != 0) {
      pid_ = -1;
      close(to_child[1]);
      close(from_child[0]);
      throw std::runtime_error(std::string(kPython) + ": " + std::strerror(rc));
    }
    to_ = fdopen(to_child[1], "w");
    from_ = fdopen(from_child[0], "r");
    return ask(spec.dump());
  }

  // Sends one line and returns the answer; throws when the server ended or answered an error.
  json ask(const std::string& line) {
    if (std::fputs((line + "\n").c_str(), to_) < 0 || std::fflush(to_) != 0)
      throw std::runtime_error("cannot write to it: " + ended());
    char* text = nullptr;
    size_t capacity = 0;
    const ssize_t n = getline(&text, &capacity, from_);
    const std::string answer = n > 0 ? std::string(text, n) : std::string();
    std::free(text);
    if (n <= 0) throw std::runtime_error(ended() + " (its messages, if any, are above)");
    const json reply = json::parse(answer, nullptr, false);
    if (!reply.is_object()) throw std::runtime_error("it answered: " + answer);
    if (reply.contains("error")) throw std::runtime_error(reply["error"].get<std::string>());
    return reply;
  }

  ~TorchServer() {
    if (to_) std::fclose(to_);  // end of input: the server stops
    if (from_) std::fclose(from_);
    if (pid_ > 0) waitpid(pid_, nullptr, 0);
  }

 private:
  // "it ended with status N" or "it was killed by signal N" (and reaps the process).
  std::string ended() {
    int status = 0;
    if (pid_ <= 0 || waitpid(pid_, &status, 0) != pid_) return "it ended";
    pid_ = -1;
    if (WIFSIGNALED(status)) return "it was killed by signal " + std::to_string(WTERMSIG(status));
    return "it ended with status " + std::to_string(WEXITSTATUS(status));
  }

  pid_t pid_ = -1;
  FILE* to_ = nullptr;    // its stdin
  FILE* from_ = nullptr;  // its stdout
};

// One side's timings of a phase.
struct Timings {
  std::vector<double> times;
  double peak_rss = 0;  // the high-water mark of the phase
  double next_rss = 0;  // the resident memory after it, once freed memory went back to the system
  json to_json(int batch) const {
    json j{{"times_s", times}, {"peak_rss_mib", peak_rss}, {"rss_after_trim_mib", next_rss}};
    if (!times.empty()) {
      j["median_s"] = bench::median(times);
      j["images_per_s"] = batch / bench::median(times);
    }
    return j;
  }
};

std::string mib(double v) {
  char text[32];
  std::snprintf(text, sizeof text, "%.0f MiB", v);
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Times ResNet50-MDFF-SH's training step and encoding on the CPU, next to the PyTorch twin"};
  int batch = 32, encode_batch = 256, image_size = 32, train_size = 5000, warmup = 2, rounds = 3, iterations = 3;
  std::string scales_text = "1,0.5", json_path;
  bool no_torch = false;
  app.add_option("--batch", batch, "training batch size")->capture_default_str()->check(CLI::Range(2, 1024));
  app.add_option("--encode-batch", encode_batch, "encoding batch size")->capture_default_str()
      ->check(CLI::Range(1, 4096));
  app.add_option("--image-size", image_size, "input height = width")->capture_default_str()->check(CLI::Range(32, 512));
  app.add_option("--scales", scales_text, "scales the backbone sees")->capture_default_str();
  app.add_option("--train-size", train_size, "rows of the U matrix (pairs = dataset)")->capture_default_str()
      ->check(CLI::Range(1, 1000000));
  app.add_option("--warmup", warmup, "untimed iterations of each side before each phase")->capture_default_str()
      ->check(CLI::Range(0, 100));
  app.add_option("--rounds", rounds, "rounds of each side per phase, taking turns")->capture_default_str()
      ->check(CLI::Range(1, 100));
  app.add_option("--iterations", iterations, "timed iterations per round")->capture_default_str()
      ->check(CLI::Range(1, 1000));
  app.add_flag("--no-torch", no_torch, "time the engine only");
  app.add_option("--json", json_path, "write the results to this JSON file");
  if (auto exit_code = cli::parse(app, argc, argv)) return *exit_code;
  std::signal(SIGPIPE, SIG_IGN);  // a dead PyTorch process is reported, not fatal

  MdffConfig config;
  try {
    config.scales = cli::parse_list<double>(scales_text, "--scales");
  } catch (const Error& e) {
    std::fprintf(stderr, "bench_model: %s\n", e.what());
    return 2;
  }
  const RMSPropOptions rmsprop;  // lr 1e-5, alpha 0.99, eps 1e-8, weight decay 1e-5
  const LossConfig loss;         // pairs = dataset, beta 0.1, gamma 0.01

  // PyTorch first: it builds its model while the engine waits, then waits itself.
  std::unique_ptr<TorchServer> torch;
  json torch_info;
  std::string torch_problem;  // why there are no PyTorch numbers
  if (no_torch) {
    torch_problem = "--no-torch";
  } else {
    const ResNetConfig& bb = config.backbone;
    const json cfg{{"backbone",
                    {{"name", "resnet50"}, {"blocks", bb.blocks}, {"widths", bb.widths}, {"stem", bb.stem}}},
                   {"bits", config.bits}, {"classes", config.classes}, {"taps", taps_name(config.taps)},
                   {"scales", config.scales}, {"lateral_channels", config.lateral_channels},
                   {"fc1_features", config.fc1_features}, {"fusion_features", config.fusion_features},
                   {"pairs", pairs_name(loss.pairs)}, {"beta", loss.beta}, {"gamma", loss.gamma},
                   {"lr", rmsprop.lr}, {"alpha", rmsprop.alpha}, {"eps", rmsprop.eps},
                   {"weight_decay", rmsprop.weight_decay}};
    try {
      torch = std::make_unique<TorchServer>();
      torch_info = torch->start({{"config", cfg}, {"batch", batch}, {"encode_batch", encode_batch},
                                 {"image_size", image_size}, {"train_size", train_size}});
    } catch (const std::exception& e) {
      torch.reset();
      torch_problem = std::string("PyTorch is not available: ") + e.what();
      std::fprintf(stderr, "bench_model: %s; timing the engine only\n", torch_problem.c_str());
    }
  }
  bool torch_failed = false;
  auto torch_ask = [&](const std::string& command) -> json {
    if (!torch) return json();
    try {
      return torch->ask(command);
    } catch (const std::exception& e) {
      torch.reset();
      torch_failed = true;
      torch_problem = std::string("the PyTorch process failed: ") + e.what();
      std::fprintf(stderr, "bench_model: %s; going on with the engine only\n", torch_problem.c_str());
      return json();
    }
  };

  const double sgemm_peak = bench::sgemm_peak_gflops();
  malloc_trim(0);  // the GEMM's operands are the benchmark's, not the model's: out of the peaks
  reset_peak_rss();
  const double baseline = peak_rss_mib();

  Rng rng(0);
  MdffSh model(config, rng);
  ParameterBuffer parameters(model.named_parameters());
  RMSProp optimizer(parameters, rmsprop);
  optimizer.lr = rmsprop.lr;
  Tensor train_labels = Tensor::zeros({train_size, config.classes});
  for (int i = 0; i < train_size; ++i) train_labels.data<float>()[i * config.classes + i % config.classes] = 1;
  PairMemory memory(train_labels, config.bits);
  memory.codes().copy_(Tensor::uniform({train_size, config.bits}, rng, -1, 1));
  std::vector<int32_t> rows(batch);
  for (int i = 0; i < batch; ++i) rows[i] = i % train_size;
  const Tensor index = Tensor::from_vector(rows, {batch});
  const Tensor labels = ops::gather_rows(train_labels, index);
  const Tensor images = Tensor::randn({batch, 3, image_size, image_size}, rng);
  const Tensor encode_images = Tensor::randn({encode_batch, 3, image_size, image_size}, rng);
  const double setup_peak = peak_rss_mib();  // the model, its parameter buffer, RMSProp's state, the inputs

  auto train_step = [&] {  // as Trainer::train_epoch does it
    parameters.zero_grad();
    const MdffOutput out = model.forward(images);
    const LossTerms terms = mdff_loss(out.u, out.logits, labels, index, &memory, loss);
    (void)terms.total.item();
    terms.total.backward();
    optimizer.step();
  };
  auto encode_step = [&] {  // as retrieval::encode does it
    NoGradGuard no_grad;
    (void)model.forward(encode_images);
  };

  // Warm-up of each side, then `rounds` rounds of each side taking turns (the engine first), collecting
  // both sides' timed iterations.
  auto run_phase = [&](const std::string& command, const std::function<void()>& step, Timings& engine,
                       Timings& twin) {
    for (int i = 0; i < warmup; ++i) step();
    std::this_thread::sleep_for(kSettle);
    torch_ask(command + " " + std::to_string(warmup));
    for (int r = 0; r < rounds; ++r) {
      std::this_thread::sleep_for(kSettle);
      for (int i = 0; i < iterations; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        step();
        engine.times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      std::this_thread::sleep_for(kSettle);
      const json answer = torch_ask(command + " " + std::to_string(iterations));
      if (answer.contains("times"))
        for (double t : answer["times"]) twin.times.push_back(t);
    }
  };
  // The phase's peak of each side; starts the next phase: each side hands the memory it has freed back
  // to the system (malloc_trim) and resets its mark. Returns whether the engine's mark was reset.
  auto end_phase = [&](Timings& engine, Timings& twin, bool& twin_reset) {
    engine.peak_rss = peak_rss_mib();
    malloc_trim(0);
    const bool reset = reset_peak_rss();
    engine.next_rss = status_mib("VmRSS:");
    const json answer = torch_ask("peak");
    if (answer.contains("peak_rss_mib")) {
      twin.peak_rss = answer["peak_rss_mib"];
      twin.next_rss = answer["rss_mib"];
      twin_reset = answer["reset"];
    }
    return reset;
  };

  Timings train_engine, train_torch, encode_engine, encode_torch;
  bool engine_reset = false, torch_reset = false;
  model.train();
  const double train_flops = count_flops(train_step);
  run_phase("train", train_step, train_engine, train_torch);
  engine_reset = end_phase(train_engine, train_torch, torch_reset);

  model.eval();
  const double encode_flops = count_flops(encode_step);
  run_phase("encode", encode_step, encode_engine, encode_torch);
  bool unused = false;
  end_phase(encode_engine, encode_torch, unused);
  const double engine_peak = std::max(train_engine.peak_rss, encode_engine.peak_rss);
  const json torch_end = torch_ask("quit");
  torch.reset();
  const bool have_torch = !torch_failed && torch_problem.empty();

  // ---- the report ----
  const int threads = omp_get_max_threads();
  std::printf("ResNet50-MDFF-SH on the CPU: %dx%d images, scales %s, %d bits, %d classes\n", image_size, image_size,
              scales_text.c_str(), config.bits, config.classes);
  std::printf("engine: %s, %d OpenMP threads, denormals %s\n", blas::describe().c_str(), threads,
              denormals_flushed() ? "flushed to zero" : "kept");
  if (have_torch) {
    const int torch_threads = torch_info["threads"];
    std::printf("PyTorch %s: %d threads (%d inter-op), denormals %s, in its own process%s\n",
                torch_info["version"].get<std::string>().c_str(), torch_threads,
                torch_info["interop_threads"].get<int>(),
                torch_info["flush_denormal"].get<bool>() ? "flushed to zero" : "kept",
                torch_threads != threads ? "  (NOT the engine's thread count)" : "");
  } else {
    std::printf("PyTorch: none (%s)\n", torch_problem.c_str());
  }
  std::printf("SGEMM peak, measured in this run: %.1f GFLOP/s\n", sgemm_peak);
  std::printf("training step: batch %d, zero_grad + forward + backward of J = J1 + %g J2 + %g J3 (pairs = %s, U of "
              "%d rows) + one RMSProp step over all %.1fM parameters: %.2f GFLOP\n",
              batch, loss.beta, loss.gamma, pairs_name(loss.pairs), train_size, parameters.numel() / 1e6,
              train_flops / 1e9);
  std::printf("encoding: batch %d, evaluation mode, no graph: %.2f GFLOP\n", encode_batch, encode_flops / 1e9);
  std::printf("medians over %d rounds x %d iterations per side after %d warm-up iterations, %s\n\n", rounds,
              iterations, warmup, have_torch ? "the engine and PyTorch taking turns" : "the engine alone");

  json result{{"batch", batch}, {"encode_batch", encode_batch}, {"image_size", image_size},
              {"scales", config.scales}, {"bits", config.bits}, {"classes", config.classes},
              {"train_size", train_size}, {"warmup", warmup}, {"rounds", rounds}, {"iterations", iterations},
              {"sgemm_peak_gflops", sgemm_peak}, {"parameters", parameters.numel()},
              {"rmsprop", {{"lr", rmsprop.lr}, {"alpha", rmsprop.alpha}, {"eps", rmsprop.eps},
                           {"weight_decay", rmsprop.weight_decay}}},
              {"engine", {{"threads", threads}, {"blas", blas::describe()}, {"flush_denormal", denormals_flushed()},
                          {"baseline_rss_mib", baseline}, {"setup_peak_rss_mib", setup_peak},
                          {"process_peak_rss_mib", engine_peak}, {"peak_reset_between_phases", engine_reset}}}};
  if (have_torch) {
    json t = torch_info;
    t.erase("ready");
    t["process_peak_rss_mib"] = torch_end["process_peak_rss_mib"];
    t["peak_reset_between_phases"] = torch_reset;
    result["torch"] = t;
  } else {
    result["torch"] = {{torch_failed ? "error" : "unavailable", torch_problem}};
  }

  std::printf("%-14s %13s %14s %15s %12s %13s %15s %10s\n", "", "engine img/s", "PyTorch img/s", "engine/PyTorch",
              "engine peak", "PyTorch peak", "engine GFLOP/s", "% of peak");
  auto row = [&](const char* name, const char* key, int n, double flops, const Timings& engine, const Timings& twin,
                 bool cumulative) {
    const double engine_s = bench::median(engine.times), gflops = flops / engine_s / 1e9;
    json j{{"gflop", flops / 1e9}, {"engine", engine.to_json(n)}};
    j["engine"]["gflops"] = gflops;
    j["engine"]["percent_of_sgemm_peak"] = 100 * gflops / sgemm_peak;
    j["peak_rss_cumulative"] = cumulative;
    std::string twin_ips = "-", ratio = "-", twin_peak = "-";
    if (have_torch) {
      const double twin_s = bench::median(twin.times);
      j["torch"] = twin.to_json(n);
      j["torch"]["gflops"] = flops / twin_s / 1e9;  // the same model: the engine's count
      j["engine_over_torch_throughput"] = twin_s / engine_s;
      char text[32];
      std::snprintf(text, sizeof text, "%.1f", n / twin_s);
      twin_ips = text;
      std::snprintf(text, sizeof text, "%.2f", twin_s / engine_s);
      ratio = text;
      twin_peak = mib(twin.peak_rss);
    }
    std::printf("%-14s %13.1f %14s %15s %12s %13s %15.1f %9.0f%%\n", name, n / engine_s, twin_ips.c_str(),
                ratio.c_str(), mib(engine.peak_rss).c_str(), twin_peak.c_str(), gflops, 100 * gflops / sgemm_peak);
    result[key] = j;
  };
  row("training step", "train", batch, train_flops, train_engine, train_torch, false);
  row("encoding", "encode", encode_batch, encode_flops, encode_engine, encode_torch,
      !engine_reset || (have_torch && !torch_reset));
  std::printf("\nengine/PyTorch: throughput ratio, above 1 when the engine is faster.\n");
  std::printf("peak RSS per phase: training from the process's start; encoding ");
  if (engine_reset && (!have_torch || torch_reset)) {
    std::printf("on its own: before it each process gave back the memory it had freed and reset its mark, "
                "keeping the model, gradients and optimizer state (resident then: engine %s",
                mib(train_engine.next_rss).c_str());
    if (have_torch) std::printf(", PyTorch %s", mib(train_torch.next_rss).c_str());
    std::printf(").\n");
  } else {
    std::printf("CUMULATIVE (the kernel refused to reset the peak): it includes training's.\n");
  }
  std::printf("process peaks: engine %s (%s before the model, %s once it and the optimizer were built)",
              mib(engine_peak).c_str(), mib(baseline).c_str(), mib(setup_peak).c_str());
  if (have_torch)
    std::printf(", PyTorch %s (%s before torch was imported, %s once the model was built)",
                mib(torch_end["process_peak_rss_mib"].get<double>()).c_str(),
                mib(torch_info["baseline_rss_mib"].get<double>()).c_str(),
                mib(torch_info["model_rss_mib"].get<double>()).c_str());
  std::printf("\n");
  if (!json_path.empty()) std::ofstream(json_path) << result.dump(2) << "\n";
  return torch_failed ? 1 : 0;
}
