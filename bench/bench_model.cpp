// ResNet50-MDFF-SH, the engine next to its PyTorch twin in the same run, on the CPU (the default) or on
// the GPU (--device cuda), on
//   (a) the training step: both scales (1, 0.5), J = J1 + beta J2 + gamma J3 with pairs = dataset against
//       a U matrix of 5,000 rows; zero_grad, forward, backward and one RMSProp step over all parameters
//       (lr 1e-5, alpha 0.99, eps 1e-8, weight decay 1e-5), as optim/trainer.cpp does it (ParameterBuffer +
//       RMSProp) and as torch.optim.RMSprop does it;
//   (b) encoding: evaluation mode, no graph (NoGradGuard / torch.no_grad()), both scales;
// for every training batch size of --batch and image size of --image-size (comma lists): one row per
// combination and phase. --grid is the GPU benchmark's matrix: batches 32 and 128 at 224x224 and 32x32.
// Encoding's batch is --encode-batch, by default 256 on the CPU and the training batch on the GPU.
//
// PyTorch (tools/torch_model_bench.py over tools/torch_twin.py) runs in ONE child process, spawned once:
// it builds its model once and then waits for commands ("inputs 32 32 224", "train 3", "encode 3") on
// stdin, answering with its timings. The two sides take turns, round by round (engine, PyTorch, engine,
// ...), never at the same time, so that drift in the machine's speed falls on both alike; after warm-up,
// the median is over all timed iterations of a side. Each row: images/s of each side, the ratio
// engine/PyTorch (above 1: the engine is faster), each side's peak memory and their ratio (below 1: the
// engine needs less), and the engine's GFLOP/s (the FLOPs of one step or batch as core/profiler.h counts
// them, over the median time) against the GEMM peak measured in this run (OpenBLAS's SGEMM on the CPU,
// cuBLAS in the chosen precision on the GPU). Where the engine is slower than PyTorch, one more engine
// step runs under the profiler, and the table of its slowest kernels (all of them in the JSON) says where
// the time goes; that clears the records of a profile asked for with MDFF_PROFILE.
//
// On the GPU, the model, the optimizer's state and the inputs live on the device on both sides, and every
// timed iteration ends with a synchronisation (backend(Device::CUDA).synchronize(),
// torch.cuda.synchronize()). --precision tf32 (the default) or fp32 sets the engine's set_tf32_allowed()
// and PyTorch's TF32 for convolutions and matrix products alike (torch.backends.cudnn.conv and
// torch.backends.cuda.matmul's fp32_precision, or the allow_tf32 flags before torch 2.9). PyTorch runs
// with cudnn.benchmark on: its algorithm search falls in the warm-up. The profiler synchronises the
// device around each kernel, so its GPU times are the kernels' own (each with a launch's latency).
//
// Peak memory of a phase: each side resets its mark after its warm-up, so that the peak covers the timed
// rounds (one-time work, such as cuDNN's algorithm search and its scratch memory, is left out; the JSON
// keeps the warm-up's peak, the first one's from the model's construction on). On the GPU the warm-up
// ends with both sides' caches given back to the driver and one more step. The model and optimizer state
// stay allocated throughout and count in every peak; the gradients, which both sides allocate during
// backward and drop at zero_grad, count where they exist.
//   GPU: the caching allocators' peak of bytes held by live tensors (the engine's
//        memory_stats().peak_bytes_in_use, PyTorch's torch.cuda.max_memory_allocated()): the same measure
//        on both sides; both count cuBLAS's workspace (a block of each allocator) and cuDNN's while a
//        convolution runs; neither counts the CUDA context, the libraries' internal memory or freed blocks
//        kept for reuse. The JSON's reserved_peak_mib (and a line after the table) is the peak of memory held
//        from the driver, in use or cached (the engine's segments, PyTorch's max_memory_reserved()).
//   CPU: each process's resident high-water mark (VmHWM): before the reset each process hands the memory
//        it has freed back to the system (malloc_trim) and lowers its mark through /proc/self/clear_refs;
//        where the kernel refuses that, the peak is cumulative and the row says so. The engine's allocator
//        count of its tensors' peak (the GPU's measure, without cuBLAS's and cuDNN's workspaces) is listed after the
//        table and kept as tensor_peak_mib; PyTorch's CPU allocator counts nothing.
//
// PyTorch's Python: --python, else $MDFF_TORCH_PYTHON, else the first of `python3` on PATH (the lent GPU
// machine's, with CUDA) and /usr/bin/python3 (Debian's python3-torch, CPU only) whose torch starts, with
// CUDA for --device cuda; when none does, the benchmark says why and times the engine alone. A Python named
// with --python is the user's request for the comparison: when it cannot start PyTorch, the benchmark stops.
// The server is this source tree's tools/torch_model_bench.py, else ./tools/'s (a copy of the repository
// elsewhere, run from its root, as scripts/gpu_check.sh does).
//
//   bench_model [--device cpu|cuda] [--precision tf32|fp32] [--grid] [--batch 32[,128]] [--image-size 32[,224]]
//               [--encode-batch N] [--scales 1,0.5] [--train-size 5000] [--warmup 2] [--rounds 3]
//               [--iterations 3] [--python PATH] [--no-torch] [--json FILE]
// Exit status 0; 1 when a configuration failed on the engine, the PyTorch process failed (or the --python given
// could not start it), or the JSON could not be written; 2 for a bad option or value.
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
#include "core/file_io.h"
#include "core/ops.h"
#include "core/profiler.h"
#ifdef MDFF_WITH_CUDA
#include "cuda/conv.h"
#endif
#include "losses/hash_losses.h"
#include "models/mdff.h"
#include "optim/optimizers.h"

extern char** environ;

using namespace mdff;
using json = nlohmann::json;

namespace {

constexpr const char* kServer = "tools/torch_model_bench.py";
// A pause before each round on the CPU: the other side's idle OpenMP and OpenBLAS threads stop spinning.
constexpr auto kSettle = std::chrono::milliseconds(100);
constexpr double kMiB = 1024.0 * 1024.0;
constexpr size_t kProfileRows = 15;  // kernels printed per profiled step (the JSON holds all)

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

// Resets the high-water mark to the current RSS (Linux >= 4.0); false where the kernel refuses.
bool reset_peak_rss() {
  const int fd = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool done = write(fd, "5", 1) == 1;
  close(fd);
  return done;
}

// The engine's memory in MiB, in its device's measure: on the GPU the allocator's bytes held by live
// tensors, on the CPU the process's resident memory.
struct EngineMemory {
  Device device;
  double peak() const {
    return device == Device::CPU ? status_mib("VmHWM:") : backend(device).memory_stats().peak_bytes_in_use / kMiB;
  }
  double now() const {
    return device == Device::CPU ? status_mib("VmRSS:") : backend(device).memory_stats().bytes_in_use / kMiB;
  }
  // On the GPU, the peak of the memory held from the driver (in use + cached); -1 on the CPU.
  double reserved_peak() const {
    return device == Device::CPU ? -1 : backend(device).memory_stats().peak_bytes_reserved / kMiB;
  }
  // The peak of bytes held by tensors as the allocator counts them, on either device (on the GPU: peak()).
  double tensor_peak() const { return backend(device).memory_stats().peak_bytes_in_use / kMiB; }
  // Starts a new peak from the memory in use now (on the CPU, once freed memory went back to the system);
  // false where the kernel refuses.
  bool reset() const {
    backend(device).reset_peak_memory();
    if (device != Device::CPU) return true;
    malloc_trim(0);
    return reset_peak_rss();
  }
};

// Convolution calls on the GPU so far that ran a lean algorithm because the fastest one's workspace would
// have raised the memory peak (cuda/conv.h); 0 without CUDA.
int64_t lean_conv_calls() {
#ifdef MDFF_WITH_CUDA
  return cuda_available() ? cuda::conv_stats().lean_calls : 0;
#else
  return 0;
#endif
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

// Where tools/torch_model_bench.py is: in the source tree this was built from, else under the current
// folder (a copy of the repository elsewhere, run from its root).
std::string server_path() {
  const std::string built = std::string(MDFF_SOURCE_DIR) + "/" + kServer;
  return access(built.c_str(), R_OK) == 0 ? built : kServer;
}

// tools/torch_model_bench.py as a child process: one JSON line each way per command.
class TorchServer {
 public:
  // Spawns the server under `python` (a path, or a name looked up on PATH), sends the spec and returns its
  // "ready" answer; throws with the reason when python or torch is missing or the server does not start.
  json start(const std::string& python, const json& spec) {
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
    const std::string server = server_path();
    char* argv[] = {const_cast<char*>(python.c_str()), const_cast<char*>(server.c_str()), nullptr};
    const int rc = posix_spawnp(&pid_, python.c_str(), &actions, nullptr, argv, environ);
    posix_spawn_file_actions_destroy(&actions);
    close(to_child[0]);
    close(from_child[1]);
    if (rc != 0) {
      pid_ = -1;
      close(to_child[1]);
      close(from_child[0]);
      throw std::runtime_error(std::strerror(rc));
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

// One side's measurements of a phase, memory in MiB.
struct Timings {
  std::vector<double> times;
  double warmup_peak = 0;  // the peak up to the end of the warm-up, since the previous phase
  double peak = 0;         // the peak of the timed rounds
  double after = 0;        // in use after the phase (on the CPU: once freed memory went back to the system)
  double reserved_peak = -1;  // GPU: the peak of memory held from the driver over the timed rounds
  double tensor_peak = -1;    // the engine on the CPU: its tensors' peak over the timed rounds (allocator count)
  bool reset = true;       // whether the mark was reset after the warm-up (else `peak` is cumulative)
  json to_json(int batch) const {
    json j{{"times_s", times}, {"warmup_peak_mib", warmup_peak}, {"peak_mib", peak}, {"after_mib", after},
           {"peak_reset_after_warmup", reset}};
    if (reserved_peak >= 0) j["reserved_peak_mib"] = reserved_peak;
    if (tensor_peak >= 0) j["tensor_peak_mib"] = tensor_peak;
    if (!times.empty()) {
      j["median_s"] = bench::median(times);
      j["images_per_s"] = batch / bench::median(times);
    }
    return j;
  }
};

std::string fixed(double v, const char* pattern = "%.1f") {
  char text[32];
  std::snprintf(text, sizeof text, pattern, v);
  return text;
}

// Every value of a comma list, each within [low, high]; throws an mdff::Error naming the option. A value
// that is not a whole number is shown `example`, a list this option takes (cli::parse_list's own example,
// 12,24,32,48, is not one: 12 is out of range for both).
std::vector<int> int_list(const std::string& text, const char* option, int low, int high, const char* example) {
  std::vector<int> values;
  try {
    values = cli::parse_list<int>(text, option);
  } catch (const Error& e) {
    std::string reason = e.reason();
    reason = reason.substr(0, reason.find(" (write e.g."));
    MDFF_FAIL(reason, " (write e.g. ", example, ")");
  }
  for (int v : values) MDFF_CHECK(v >= low && v <= high, option, ": ", v, " is not in [", low, ", ", high, "]");
  return values;
}

}  // namespace

int main(int argc, char** argv) try {
  CLI::App app{"Times ResNet50-MDFF-SH's training step and encoding on the CPU or the GPU, next to the PyTorch twin"};
  int encode_batch = 0, train_size = 5000, warmup = 2, rounds = 3, iterations = 3;
  std::string batch_text = "32", size_text = "32", scales_text = "1,0.5", device_text = "cpu", precision = "tf32";
  std::string python, json_path;
  bool grid = false, no_torch = false;
  app.add_option("--device", device_text, "cpu or cuda")->capture_default_str()->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--precision", precision, "GPU convolutions and matrix products on both sides: tf32 or fp32")
      ->capture_default_str()->check(CLI::IsMember({"tf32", "fp32"}));
  CLI::Option* batch_option =
      app.add_option("--batch", batch_text, "training batch sizes, a comma list (2..1024)")->capture_default_str();
  CLI::Option* size_option =
      app.add_option("--image-size", size_text, "input heights = widths, a comma list (32..512)")->capture_default_str();
  app.add_flag("--grid", grid,
               "the GPU matrix: --batch 32,128 --image-size 224,32 (not with --batch or --image-size)");
  app.add_option("--encode-batch", encode_batch, "encoding batch size (default: 256 on the CPU, the training batch "
                 "on the GPU)")->transform(cli::whole_number(1, 4096));
  app.add_option("--scales", scales_text, "scales the backbone sees, each in (0, 4]")->capture_default_str();
  app.add_option("--train-size", train_size, "rows of the U matrix (pairs = dataset)")->capture_default_str()
      ->transform(cli::whole_number(1, 1000000));
  app.add_option("--warmup", warmup, "untimed iterations of each side before each phase")->capture_default_str()
      ->transform(cli::whole_number(0, 100));
  app.add_option("--rounds", rounds, "rounds of each side per phase, taking turns")->capture_default_str()
      ->transform(cli::whole_number(1, 100));
  app.add_option("--iterations", iterations, "timed iterations per round")->capture_default_str()
      ->transform(cli::whole_number(1, 1000));
  CLI::Option* python_option =
      app.add_option("--python", python, "the Python that runs PyTorch, a path or a name looked up on PATH; it must "
                     "start PyTorch, else the benchmark stops (default: $MDFF_TORCH_PYTHON, else the first of python3 "
                     "on PATH and /usr/bin/python3 whose torch starts, with CUDA for --device cuda; with none, the "
                     "engine alone)");
  app.add_flag("--no-torch", no_torch, "time the engine only")->excludes(python_option);
  app.add_option("--json", json_path, "write the results to this JSON file (after each configuration)");
  if (auto exit_code = cli::parse(app, argc, argv)) return *exit_code;
  std::signal(SIGPIPE, SIG_IGN);  // a dead PyTorch process is reported, not fatal

  // Option values CLI11 cannot check alone: an error here is a usage error (exit 2), like CLI11's own.
  const Device device = device_text == "cuda" ? Device::CUDA : Device::CPU;
  MdffConfig config;
  std::vector<int> batches, sizes;
  try {
    // --grid replaces both lists: a --batch or --image-size next to it would be dropped without a word.
    for (const CLI::Option* given : {batch_option, size_option})
      MDFF_CHECK(!grid || given->count() == 0, "--grid and ", given->get_name(), " cannot be combined: --grid is "
                 "--batch 32,128 --image-size 224,32; give either --grid or --batch and --image-size");
    if (grid) batch_text = "32,128", size_text = "224,32";
    config.scales = cli::parse_list<double>(scales_text, "--scales");
    for (double s : config.scales) MDFF_CHECK(s > 0 && s <= 4, "--scales: ", s, " is outside (0, 4]");
    batches = int_list(batch_text, "--batch", 2, 1024, "32,128");
    sizes = int_list(size_text, "--image-size", 32, 512, "32,224");
    std::string why_not;
    MDFF_CHECK(device == Device::CPU || cuda_available(&why_not), "--device cuda: ", why_not);
  } catch (const Error& e) {
    std::fprintf(stderr, "bench_model: %s\nRun with --help for more information.\n", e.reason());
    return 2;
  }
  if (!json_path.empty()) io::check_writable(json_path);  // fails now, not after the timing
  set_tf32_allowed(precision == "tf32");
  const RMSPropOptions rmsprop;  // lr 1e-5, alpha 0.99, eps 1e-8, weight decay 1e-5
  const LossConfig loss;         // pairs = dataset, beta 0.1, gamma 0.01

  // PyTorch first: it builds its model while the engine waits, then waits itself.
  std::unique_ptr<TorchServer> torch;
  json torch_info;
  std::string torch_problem;  // why there are (or, later, are no more) PyTorch numbers
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
    const json spec{{"config", cfg}, {"train_size", train_size}, {"device", device_text}, {"precision", precision}};
    std::vector<std::string> pythons{"python3", "/usr/bin/python3"};
    if (const char* chosen = std::getenv("MDFF_TORCH_PYTHON"); chosen && *chosen) pythons = {chosen};
    if (!python.empty()) pythons = {python};
    for (const std::string& candidate : pythons) {
      try {
        torch = std::make_unique<TorchServer>();
        torch_info = torch->start(candidate, spec);
        break;
      } catch (const std::exception& e) {
        torch.reset();
        torch_problem += (torch_problem.empty() ? "" : "; ") + candidate + ": " + e.what();
      }
    }
    if (torch) {
      torch_problem.clear();
    } else if (!python.empty()) {  // the comparison the user asked for by naming a Python cannot run
      std::fprintf(stderr, "bench_model: error: --python %s cannot run PyTorch's side: %s. Give a Python whose "
                   "`import torch` works, or --no-torch to time the engine alone\n", python.c_str(),
                   torch_problem.c_str());
      return 1;
    } else {
      std::fprintf(stderr, "bench_model: PyTorch is not available (%s); timing the engine only\n",
                   torch_problem.c_str());
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

  Backend& engine_backend = backend(device);
  const EngineMemory memory{device};
  const double gemm_peak = bench::gemm_peak_gflops(device);
  // The GEMM's operands are the benchmark's, not the model's: out of the peaks, and out of the cache (the
  // model would otherwise be carved out of their segments).
  engine_backend.release_cached_memory();
  memory.reset();
  const double baseline = memory.now();

  Rng rng(0);
  MdffSh model(config, rng);
  model.to(device);
  ParameterBuffer parameters(model.named_parameters());
  RMSProp optimizer(parameters, rmsprop);
  optimizer.lr = rmsprop.lr;
  Tensor train_labels = Tensor::zeros({train_size, config.classes});
  for (int i = 0; i < train_size; ++i) train_labels.data<float>()[i * config.classes + i % config.classes] = 1;
  train_labels = train_labels.to(device);
  PairMemory pairs(train_labels, config.bits);
  pairs.codes().copy_(Tensor::uniform({train_size, config.bits}, rng, -1, 1));
  const double setup_peak = memory.peak();  // the model, its parameter buffer, RMSProp's state
  double engine_process_peak = setup_peak;

  // ---- the report's head ----
  const bool on_gpu = device == Device::CUDA;
  const int threads = omp_get_max_threads();
  std::printf("ResNet50-MDFF-SH on the %s: scales %s, %d bits, %d classes%s\n", on_gpu ? "GPU" : "CPU",
              scales_text.c_str(), config.bits, config.classes,
              on_gpu ? (", precision " + precision + " on both sides").c_str() : "");
  std::printf("engine: %s backend, %s, %d OpenMP threads, denormals %s\n", engine_backend.name(),
              on_gpu ? (tf32_allowed() ? "TF32 allowed" : "TF32 off") : blas::describe().c_str(), threads,
              denormals_flushed() ? "flushed to zero" : "kept");
  if (torch) {
    const int torch_threads = torch_info["threads"];
    std::printf("PyTorch %s (%s): %d threads (%d inter-op), denormals %s, in its own process%s\n",
                torch_info["version"].get<std::string>().c_str(), torch_info["python"].get<std::string>().c_str(),
                torch_threads, torch_info["interop_threads"].get<int>(),
                torch_info["flush_denormal"].get<bool>() ? "flushed to zero" : "kept",
                torch_threads != threads ? "  (NOT the engine's thread count)" : "");
    auto text = [](const json& v) { return v.is_string() ? v.get<std::string>() : v.dump(); };
    if (on_gpu)
      std::printf("PyTorch on %s: CUDA %s, cuDNN %s, cudnn.benchmark %s, float32 precision: convolutions %s, "
                  "matrix products %s\n",
                  text(torch_info["gpu"]).c_str(), text(torch_info["cuda"]).c_str(), text(torch_info["cudnn"]).c_str(),
                  torch_info["cudnn_benchmark"].get<bool>() ? "on" : "off",
                  text(torch_info["fp32_precision"]["cudnn_conv"]).c_str(),
                  text(torch_info["fp32_precision"]["matmul"]).c_str());
  } else {
    std::printf("PyTorch: none (%s)\n", torch_problem.c_str());
  }
  std::printf("%s peak, measured in this run: %.1f GFLOP/s\n",
              on_gpu ? (std::string("cuBLAS GEMM (") + precision + ")").c_str() : "SGEMM", gemm_peak);
  std::printf("training step: zero_grad + forward + backward of J = J1 + %g J2 + %g J3 (pairs = %s, U of %d rows) "
              "+ one RMSProp step over all %.1fM parameters\n",
              loss.beta, loss.gamma, pairs_name(loss.pairs), train_size, parameters.numel() / 1e6);
  std::printf("encoding: evaluation mode, no graph, batch %s\n",
              encode_batch > 0 ? std::to_string(encode_batch).c_str() : on_gpu ? "= the training batch" : "256");
  std::printf("medians over %d rounds x %d iterations per side after %d warm-up iterations, %s%s\n\n", rounds,
              iterations, warmup, torch ? "the engine and PyTorch taking turns" : "the engine alone",
              on_gpu ? ", each iteration ending with a device synchronisation" : "");

  const std::string memory_measure =
      on_gpu ? "GPU memory held by live tensors, the caching allocator's peak (engine: "
               "memory_stats().peak_bytes_in_use; PyTorch: torch.cuda.max_memory_allocated()), over the timed rounds"
             : "the process's resident high-water mark (VmHWM) over the timed rounds";
  json result{{"device", device_text}, {"precision", on_gpu ? precision : "fp32"}, {"batches", batches},
              {"image_sizes", sizes}, {"scales", config.scales}, {"bits", config.bits}, {"classes", config.classes},
              {"train_size", train_size}, {"warmup", warmup}, {"rounds", rounds}, {"iterations", iterations},
              {"gemm_peak_gflops", gemm_peak}, {"parameters", parameters.numel()}, {"memory_measure", memory_measure},
              {"rmsprop", {{"lr", rmsprop.lr}, {"alpha", rmsprop.alpha}, {"eps", rmsprop.eps},
                           {"weight_decay", rmsprop.weight_decay}}},
              {"engine", {{"backend", engine_backend.name()}, {"threads", threads}, {"blas", blas::describe()},
                          {"tf32_allowed", tf32_allowed()}, {"flush_denormal", denormals_flushed()},
                          {"baseline_mib", baseline}, {"setup_peak_mib", setup_peak}}},
              {"runs", json::array()}};
  if (torch) {
    result["torch"] = torch_info;
    result["torch"].erase("ready");
  }
  auto write_json = [&] {
    if (!json_path.empty()) io::write_file_atomic(json_path, result.dump(2) + "\n");  // a failure: exit 1
  };

  std::printf("%-20s %12s %13s %6s %11s %12s %9s %7s %11s %6s\n", "", "engine img/s", "PyTorch img/s", "ratio",
              "engine peak", "PyTorch peak", "mem ratio", "GFLOP", "eng GFLOP/s", "% peak");
  std::fflush(stdout);
  std::vector<std::string> profiles, short_rows;  // per-layer tables where the engine is slower; rows short of PyTorch
  std::vector<std::string> reserved_rows;  // GPU: each row's reserved peaks
  std::vector<std::string> tensor_rows;    // CPU: each row's engine tensor peak
  bool cumulative_peaks = false, compared = false, engine_failed = false;

  // One phase of one configuration: `flops` counted, the sides' warm-up, their peaks reset, `rounds` rounds
  // taking turns (the engine first), their peaks read; the row printed; a per-layer profile of the engine
  // when it is slower. Returns the row's JSON.
  auto run_phase = [&](const std::string& name, const std::string& command, int n,
                       const std::function<void()>& step) -> json {
    auto settle = [&] {
      if (!on_gpu) std::this_thread::sleep_for(kSettle);
    };
    auto timed_step = [&] {
      const auto t0 = std::chrono::steady_clock::now();
      step();
      engine_backend.synchronize();
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    };
    // Reads each side's peak since its last reset into its `field`, then resets both.
    auto read_peaks = [&](Timings& engine, Timings& twin, double Timings::*field) {
      engine.*field = memory.peak();
      engine.reserved_peak = memory.reserved_peak();  // the last read, after the timed rounds, stays
      if (!on_gpu) engine.tensor_peak = memory.tensor_peak();  // the last read, after the timed rounds, stays
      engine_process_peak = std::max(engine_process_peak, engine.*field);
      engine.reset = memory.reset();
      engine.after = memory.now();
      const json answer = torch_ask("peak");
      if (answer.contains("peak_mib")) {
        twin.*field = answer["peak_mib"];
        twin.after = answer["after_mib"];
        twin.reset = answer["reset"];
        twin.reserved_peak = answer.value("reserved_peak_mib", -1.0);
      }
    };
    Timings engine, twin;
    const double flops = count_flops(step);
    for (int i = 0; i < warmup; ++i) step();
    engine_backend.synchronize();
    settle();
    torch_ask(command + " " + std::to_string(warmup));
    // Both caches go back to the driver (the algorithm searches' scratch, earlier phases' segments) and
    // one more untimed step fills them as a steady step needs: the reserved peaks are this phase's.
    if (on_gpu) {
      engine_backend.release_cached_memory();
      step();
      engine_backend.synchronize();
      torch_ask("empty_cache");
      torch_ask(command + " 1");
    }
    read_peaks(engine, twin, &Timings::warmup_peak);
    const int64_t lean_before = lean_conv_calls();
    for (int r = 0; r < rounds; ++r) {
      settle();
      for (int i = 0; i < iterations; ++i) engine.times.push_back(timed_step());
      settle();
      const json answer = torch_ask(command + " " + std::to_string(iterations));
      if (answer.contains("times"))
        for (double t : answer["times"]) twin.times.push_back(t);
    }
    const int64_t lean_calls = lean_conv_calls() - lean_before;
    read_peaks(engine, twin, &Timings::peak);
    const bool have_twin = !twin.times.empty() && twin.peak > 0;
    compared = compared || have_twin;

    const double engine_s = bench::median(engine.times), gflops = flops / engine_s / 1e9;
    const bool cumulative = !engine.reset || (have_twin && !twin.reset);
    cumulative_peaks = cumulative_peaks || cumulative;
    json j{{"batch", n}, {"gflop", flops / 1e9}, {"engine", engine.to_json(n)}, {"peak_cumulative", cumulative}};
    j["engine"]["gflops"] = gflops;
    j["engine"]["percent_of_gemm_peak"] = 100 * gflops / gemm_peak;
    if (engine.tensor_peak >= 0) tensor_rows.push_back(name + " " + fixed(engine.tensor_peak, "%.0f MiB"));
    if (on_gpu) j["engine"]["lean_conv_calls_per_iteration"] = double(lean_calls) / double(engine.times.size());
    std::string twin_ips = "-", ratio = "-", twin_peak = "-", memory_ratio = "-";
    const char* mark = cumulative ? "*" : "";
    if (have_twin) {
      const double twin_s = bench::median(twin.times);
      j["torch"] = twin.to_json(n);
      j["torch"]["gflops"] = flops / twin_s / 1e9;  // the same model: the engine's count
      j["engine_over_torch_throughput"] = twin_s / engine_s;
      j["engine_over_torch_peak_memory"] = engine.peak / twin.peak;
      if (engine.reserved_peak > 0 && twin.reserved_peak > 0) {
        j["engine_over_torch_reserved_peak"] = engine.reserved_peak / twin.reserved_peak;
        reserved_rows.push_back(name + ": engine " + fixed(engine.reserved_peak, "%.0f MiB") + ", PyTorch " +
                                fixed(twin.reserved_peak, "%.0f MiB") + " (" +
                                fixed(engine.reserved_peak / twin.reserved_peak, "%.2f") + ")");
      }
      twin_ips = fixed(n / twin_s);
      ratio = fixed(twin_s / engine_s, "%.2f");
      twin_peak = fixed(twin.peak, "%.0f MiB") + mark;
      memory_ratio = fixed(engine.peak / twin.peak, "%.2f");
      if (twin_s < engine_s || engine.peak > twin.peak) short_rows.push_back(name);
      if (twin_s < engine_s) {  // one more engine step under the profiler: where the time goes
        const bool was_enabled = profiler::enabled();
        profiler::reset();
        profiler::enable(true);
        const double profiled_s = timed_step();
        profiler::enable(was_enabled);
        j["profile"] = profiler::to_json();
        j["profile"]["step_seconds"] = profiled_s;
        profiles.push_back(name + ": one step under the profiler, " + fixed(profiled_s * 1e3, "%.1f") +
                           " ms (unprofiled median " + fixed(engine_s * 1e3, "%.1f") + " ms; PyTorch " +
                           fixed(twin_s * 1e3, "%.1f") + " ms)\n" + profiler::table(profiled_s, kProfileRows));
      }
    }
    std::printf("%-20s %12.1f %13s %6s %11s %12s %9s %7.1f %11.1f %5.0f%%\n", name.c_str(), n / engine_s,
                twin_ips.c_str(), ratio.c_str(), (fixed(engine.peak, "%.0f MiB") + mark).c_str(), twin_peak.c_str(),
                memory_ratio.c_str(), flops / 1e9, gflops, 100 * gflops / gemm_peak);
    std::fflush(stdout);
    return j;
  };

  auto train_step = [&](const Tensor& images, const Tensor& labels, const Tensor& index) {  // as Trainer does it
    parameters.zero_grad();
    const MdffOutput out = model.forward(images);
    const LossTerms terms = mdff_loss(out.u, out.logits, labels, index, &pairs, loss);
    (void)terms.total.item();
    terms.total.backward();
    optimizer.step();
  };
  for (int size : sizes) {
    for (int batch : batches) {
      const int n_encode = encode_batch > 0 ? encode_batch : on_gpu ? batch : 256;
      const std::string config_name = std::to_string(size) + "x" + std::to_string(size) + " b";
      json run{{"image_size", size}, {"batch", batch}, {"encode_batch", n_encode}};
      try {
        std::vector<int32_t> rows(batch);
        for (int i = 0; i < batch; ++i) rows[i] = i % train_size;
        const Tensor index = Tensor::from_vector(rows, {batch}).to(device);
        const Tensor labels = ops::gather_rows(train_labels, index);
        const Tensor images = Tensor::randn({batch, 3, size, size}, rng).to(device);
        const Tensor encode_images = Tensor::randn({n_encode, 3, size, size}, rng).to(device);
        torch_ask("inputs " + std::to_string(batch) + " " + std::to_string(n_encode) + " " + std::to_string(size));
        model.train();
        run["train"] = run_phase(config_name + std::to_string(batch) + " train", "train", batch,
                                 [&] { train_step(images, labels, index); });
        model.eval();
        run["encode"] = run_phase(config_name + std::to_string(n_encode) + " encode", "encode", n_encode, [&] {
          NoGradGuard no_grad;  // as retrieval::encode does it
          (void)model.forward(encode_images);
        });
      } catch (const std::exception& e) {
        engine_failed = true;
        run["error"] = e.what();
        std::printf("%-20s engine failed: %s\n", (config_name + std::to_string(batch)).c_str(), e.what());
        std::fflush(stdout);
      }
      result["runs"].push_back(run);
      write_json();
    }
  }

  // ---- the report's tail ----
  const json torch_end = torch_ask("quit");
  torch.reset();
  result["engine"]["process_peak_mib"] = engine_process_peak;
  if (torch_end.contains("process_peak_mib")) result["torch"]["process_peak_mib"] = torch_end["process_peak_mib"];
  if (!torch_problem.empty()) result["torch"][torch_failed ? "error" : "unavailable"] = torch_problem;

  std::printf("\nratio: engine/PyTorch throughput, above 1 when the engine is faster. mem ratio: engine/PyTorch peak, "
              "below 1 when the engine needs less.\npeak: %s, reset after each side's warm-up; the model and "
              "optimizer state count in every peak, the gradients where they exist.\n", memory_measure.c_str());
  if (cumulative_peaks)
    std::printf("* CUMULATIVE peak: the kernel refused to reset the high-water mark, so it includes earlier phases.\n");
  std::printf("process peaks: engine %.0f MiB (%.0f MiB before the model, %.0f MiB once it and the optimizer were "
              "built)", engine_process_peak, baseline, setup_peak);
  if (torch_end.contains("process_peak_mib"))
    std::printf(", PyTorch %.0f MiB", torch_end["process_peak_mib"].get<double>());
  std::printf("\n");
  if (!tensor_rows.empty()) {
    std::printf("engine tensor peaks (its allocator's count over the timed rounds: what a GPU would hold at the "
                "peak, before cuBLAS's 32 MiB workspace and cuDNN's):\n");
    for (const std::string& row : tensor_rows) std::printf("  %s\n", row.c_str());
  }
  if (!reserved_rows.empty()) {
    std::printf("reserved peaks (memory held from the driver, in use or cached: the engine's segments, PyTorch's "
                "max_memory_reserved):\n");
    for (const std::string& row : reserved_rows) std::printf("  %s\n", row.c_str());
  }
#ifdef MDFF_WITH_CUDA
  if (on_gpu) {
    const cuda::ConvStats convs = cuda::conv_stats();
    result["engine"]["largest_conv_workspace_mib"] = convs.largest_workspace_bytes / kMiB;
    result["engine"]["conv_plans_with_lean_algorithm"] = convs.plans_with_lean_variant;
    result["engine"]["conv_1x1_plans_timed_on_cublas"] = convs.plans_timed_on_cublas;
    result["engine"]["conv_1x1_plans_faster_on_cublas"] = convs.plans_faster_on_cublas;
    result["engine"]["conv_cublas_calls"] = convs.cublas_calls;
    std::printf("cuDNN: %lld plans, %lld with a lean algorithm besides the fastest; the largest workspace a fastest "
                "one takes while it runs: %.1f MiB; %lld plans of 1x1 stride-1 products timed on cuBLAS too, %lld of "
                "them faster there; %lld calls ran on cuBLAS\n", static_cast<long long>(convs.cached_plans),
                static_cast<long long>(convs.plans_with_lean_variant), convs.largest_workspace_bytes / kMiB,
                static_cast<long long>(convs.plans_timed_on_cublas),
                static_cast<long long>(convs.plans_faster_on_cublas), static_cast<long long>(convs.cublas_calls));
  }
#endif
  if (torch_failed) std::printf("%s\n", torch_problem.c_str());
  if (compared && short_rows.empty()) std::printf("every row reaches PyTorch's throughput with no more peak memory\n");
  if (!short_rows.empty()) {
    std::printf("short of PyTorch (throughput or peak memory):");
    for (const std::string& row : short_rows) std::printf(" [%s]", row.c_str());
    std::printf("\n");
  }
  if (!profiles.empty()) {
    std::printf("\nper-layer timing where the engine is slower than PyTorch (each kernel timed on its own%s; the "
                "JSON's \"profile\" holds every kernel):\n", on_gpu ? ", between two device synchronisations" : "");
    for (const std::string& p : profiles) std::printf("\n%s", p.c_str());
  }
  write_json();
  return engine_failed || torch_failed ? 1 : 0;
} catch (const std::exception& e) {  // the GPU or a kernel failed before the first configuration
  std::fprintf(stderr, "bench_model: error: %s\n", e.what());
  return 1;
}
