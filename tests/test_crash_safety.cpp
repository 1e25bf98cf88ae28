// Crash safety of train_mdff, as a user meets it. A run SIGKILLed at random moments, 30 times in all
// (start-up, training, checkpoint writes, encoding, the result files; every third launch is killed in a
// checkpoint write, every fifth other one in its first 0.1 s) and resumed after each kill, ends
// bit-identical to a run never interrupted. A file-size limit makes the checkpoint write fail (what a
// full disk does): the run stops naming the file and keeps the last checkpoint, from which it resumes.
// A second run on a folder in use is refused naming the other process, whose lock dies with it.
#include <doctest/doctest.h>
#include "tests/doctest_text.h"
#include <nlohmann/json.hpp>
#include <poll.h>
#include <stdlib.h>
#include <sys/inotify.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/file_io.h"
#include "core/safetensors.h"
#include "tests/run_program.h"
#include "tests/temp_folder.h"
#include "tests/tiny_dataset.h"

using namespace mdff;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

test::Run run(const std::string& arguments) { return test::run_program(test::program(TRAIN_MDFF_BINARY), arguments); }

// A tiny run: 100 training images in batches of 16 (6 steps an epoch), two code lengths of 2 epochs
// each, RMSProp, U (pairs dataset), shifts and flips, the learning curve at epoch 2. On the CPU, where a
// resumed run is bit-identical (on a GPU each process chooses cuDNN's algorithms by timing them).
std::string tiny_run(const fs::path& data) {
  return "fashion-mnist --device cpu --data-dir " + data.string() +
         " --model tiny --bits 8,16 --batch-size 16 --scales 1 --queries-per-class 5 --train-per-class 10"
         " --epochs 2 --optimizer rmsprop --lr 0.001 --pairs dataset --shift 2 --monitor-every 2 ";
}

// The dataset and an uninterrupted run that every test compares with, made once.
struct Reference {
  test::TempFolder folder{"mdff_crash"};
  fs::path data = test::make_dataset(folder.path / "data", 20);
  fs::path run = folder.path / "reference";
  double seconds = 0;  // its wall time
  Reference() {
    // Every process of a run on one thread: the same thread count in every process (a resumed run is
    // bit-identical only then), and on a shared or loaded machine no thread spins waiting for another.
    ::setenv("OMP_NUM_THREADS", "1", 1);
    const auto start = Clock::now();
    const test::Run r = ::run(tiny_run(data) + "--out " + run.string());
    seconds = std::chrono::duration<double>(Clock::now() - start).count();
    INFO(r.output);
    REQUIRE(r.exit_code == 0);
  }
};
Reference& reference() {
  static Reference once;
  return once;
}

// The temporary files of unfinished writes under `folder` (NAME.tmp-PID), by path.
std::vector<std::string> temporaries(const fs::path& folder) {
  std::vector<std::string> found;
  for (const auto& entry : fs::recursive_directory_iterator(folder))
    if (entry.path().filename().string().find(".tmp-") != std::string::npos) found.push_back(entry.path().string());
  return found;
}

// `run` ends as the reference did: every checkpoint tensor, every code and every metric but the timings
// equal, and no temporary file left.
void check_same_results(const fs::path& run) {
  const fs::path& expected = reference().run;
  for (const std::string bits : {"8", "16"}) {
    CAPTURE(bits);
    const std::string checkpoint = "checkpoint_" + bits + "bits.safetensors";
    CHECK(test::tensor_bytes(run / checkpoint) == test::tensor_bytes(expected / checkpoint));
    for (const char* codes : {"query.npy", "database.npy"})
      CHECK(io::read_file((run / "codes" / bits / codes).string()) ==
            io::read_file((expected / "codes" / bits / codes).string()));
  }
  const auto metrics = nlohmann::json::parse(std::ifstream(run / "metrics.json"));
  const auto wanted = nlohmann::json::parse(std::ifstream(expected / "metrics.json"));
  for (const std::string bits : {"8", "16"}) {
    const auto& got = metrics["code_lengths"][bits];
    const auto& want = wanted["code_lengths"][bits];
    for (const char* key : {"map", "precision_hamming_2", "precision_at_n"}) CHECK(got[key] == want[key]);
    REQUIRE(got["history"].size() == 2);
    for (size_t epoch = 0; epoch < 2; ++epoch)
      for (const char* key : {"loss", "j1", "j2", "j3", "monitor_map"})
        CHECK(got["history"][epoch].value(key, nlohmann::json()) ==
              want["history"][epoch].value(key, nlohmann::json()));
  }
  CHECK(temporaries(run).empty());
}

// Where a run killed in `folder` `seconds` after its process started was, from what it left: the write
// it was in (a temporary file), the start-up (loading the data, the split, the checkpoint: the first
// 0.1 s), or else the work after the last milestone it reached (config.json, each checkpoint, each code
// length's metrics).
std::string phase_of(const fs::path& folder, double seconds) {
  for (const std::string& temporary : temporaries(folder)) {
    const std::string name = fs::relative(temporary, folder).string();
    return "inside the write of " + (name.rfind("checkpoint_", 0) == 0 ? std::string("a checkpoint")
                                                                       : name.substr(0, name.find(".tmp-")));
  }
  if (seconds < 0.1) return "start-up (the first 0.1 s)";
  if (!fs::exists(folder / "config.json")) return "start-up, before config.json";
  const fs::path metrics_file = folder / "metrics.json";
  const auto metrics =
      fs::exists(metrics_file) ? nlohmann::json::parse(std::ifstream(metrics_file)) : nlohmann::json::object();
  for (const std::string bits : {"8", "16"}) {
    const fs::path checkpoint = folder / ("checkpoint_" + bits + "bits.safetensors");
    if (!fs::exists(checkpoint)) return bits + " bits, epoch 1";
    const int epochs = std::stoi(io::load_safetensors(checkpoint.string()).metadata.at("epoch"));
    if (epochs < 2) return bits + " bits, epoch " + std::to_string(epochs + 1);
    if (!metrics.contains("code_lengths") || !metrics["code_lengths"].contains(bits))
      return bits + " bits, encoding and writing its codes";
  }
  return "writing the plots";
}

// Counts the checkpoint writes that begin in a folder: the creation of their temporary files (inotify).
class CheckpointWrites {
 public:
  explicit CheckpointWrites(const fs::path& folder) : fd_(inotify_init1(IN_NONBLOCK | IN_CLOEXEC)) {
    REQUIRE(fd_ >= 0);
    REQUIRE(inotify_add_watch(fd_, folder.c_str(), IN_CREATE) >= 0);
  }
  ~CheckpointWrites() { ::close(fd_); }
  // The writes that began since the last call, waiting up to `ms` milliseconds for one.
  int wait(int ms) {
    pollfd ready{fd_, POLLIN, 0};
    ::poll(&ready, 1, ms);
    alignas(inotify_event) char buffer[4096];
    int began = 0;
    for (ssize_t got; (got = ::read(fd_, buffer, sizeof buffer)) > 0;)
      for (char* at = buffer; at < buffer + got;) {
        const auto* event = reinterpret_cast<const inotify_event*>(at);
        const std::string name = event->len ? event->name : "";
        began += name.rfind("checkpoint_", 0) == 0 && name.find(".tmp-") != std::string::npos;
        at += sizeof(inotify_event) + event->len;
      }
    return began;
  }

 private:
  int fd_;
};

}  // namespace

TEST_CASE("a run SIGKILLed 30 times at random moments and resumed each time ends bit-identical to one never "
          "interrupted") {
  const Reference& ref = reference();
  constexpr int kKills = 30;
  std::mt19937_64 rng(2025);
  // Up to 0.6 of a whole run: a process resumed late in the run may finish first (then the next run
  // starts), one started early never does, and the run moves on when a kill falls past a checkpoint.
  std::uniform_real_distribution<double> delay(0.0, 0.6 * ref.seconds);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::uniform_int_distribution<int> which_write(1, 3), write_delay_us(0, 20000);
  std::map<std::string, int> phases;
  int kills = 0, launches = 0, finished = 0;
  fs::path out;
  auto next_run = [&] {
    out = ref.folder.path / ("killed" + std::to_string(finished));
    fs::create_directories(out);  // watched before the run starts
  };
  auto launch = [&] {
    ++launches;
    const std::string arguments =
        fs::exists(out / "config.json") ? "--resume " + out.string() : tiny_run(ref.data) + "--out " + out.string();
    return test::start_program(test::program(TRAIN_MDFF_BINARY), arguments, ref.folder.file("log"));
  };
  next_run();
  const auto start = Clock::now();
  while (kills < kKills) {
    const bool aimed = launches % 3 == 2, early = !aimed && launches % 5 == 0;
    CheckpointWrites writes(out);
    const pid_t pid = launch();
    const auto started = Clock::now();
    if (aimed) {
      const int wanted = which_write(rng);
      for (int seen = 0; seen < wanted && !test::has_exited(pid);) seen += writes.wait(5);
      std::this_thread::sleep_for(std::chrono::microseconds(write_delay_us(rng)));  // into the write or past it
    } else {
      std::this_thread::sleep_for(std::chrono::duration<double>(early ? 0.1 * unit(rng) : delay(rng)));
    }
    ::kill(pid, SIGKILL);
    const double seconds = std::chrono::duration<double>(Clock::now() - started).count();
    const int status = test::wait_program(pid);
    if (status == -SIGKILL) {
      ++kills;
      ++phases[phase_of(out, seconds)];
      continue;
    }
    std::ifstream log(ref.folder.file("log"));
    INFO(std::string(std::istreambuf_iterator<char>(log), {}));
    REQUIRE(status == 0);  // it finished before the kill
    check_same_results(out);
    ++finished;
    next_run();
  }
  // The last run killed: resumed to its end.
  const pid_t pid = launch();
  REQUIRE(test::wait_program(pid) == 0);
  check_same_results(out);
  ++finished;
  std::ostringstream report;
  report << kills << " kills in " << launches << " launches, " << finished << " runs finished, all equal to the "
         << "uninterrupted run (" << ref.seconds << " s), in "
         << std::chrono::duration<double>(Clock::now() - start).count() << " s. Where the kills landed:";
  for (const auto& [phase, count] : phases) report << "\n  " << count << "  " << phase;
  MESSAGE(report.str());
  CHECK(phases.size() >= 6);  // spread over the run, not bunched in one place
  CHECK(phases.count("inside the write of a checkpoint") == 1);
  CHECK(phases.count("start-up (the first 0.1 s)") == 1);
}

TEST_CASE("a write that fails for want of room stops the run naming the file; the last checkpoint stays, and "
          "resumes") {
  const Reference& ref = reference();
  const fs::path out = ref.folder.path / "full", checkpoint = out / "checkpoint_8bits.safetensors";
  const test::Run first = run(tiny_run(ref.data) + "--out " + out.string() + " --interrupt-after-steps 6");
  INFO(first.output);
  REQUIRE(first.exit_code == 130);  // stopped at the end of epoch 1, like Ctrl-C
  const std::vector<uint8_t> before = io::read_file(checkpoint.string());
  // A file-size limit of 2 to 4 MB (the shell's blocks are 512 or 1024 bytes): the 15.7 MB checkpoint
  // cannot be written, the other files (up to 0.4 MB) can. train_mdff ignores SIGXFSZ, so its write
  // fails with EFBIG instead of killing it.
  const test::Run full = test::run_program("ulimit -f 4096; exec " + test::program(TRAIN_MDFF_BINARY), "--resume " + out.string());
  INFO(full.output);
  CHECK(full.exit_code == 1);
  CHECK(full.output.find("train_mdff: error: cannot write " + checkpoint.string() + ": File too large: it would "
                         "exceed the largest file this process may write (ulimit -f) or the file system allows "
                         "(writing the temporary file " + checkpoint.string() + ".tmp-") != std::string::npos);
  CHECK(full.output.find("the last checkpoint is " + checkpoint.string() + " (1 of 2 epochs done)") !=
        std::string::npos);
  CHECK(full.output.find("continue the run with: train_mdff --resume " + out.string()) != std::string::npos);
  CHECK(io::read_file(checkpoint.string()) == before);
  CHECK(temporaries(out).empty());
  const test::Run resumed = run("--resume " + out.string());
  INFO(resumed.output);
  REQUIRE(resumed.exit_code == 0);
  check_same_results(out);
}

TEST_CASE("a folder in use is refused naming the process that holds it; a killed run's lock dies with it") {
  const Reference& ref = reference();
  const fs::path out = ref.folder.path / "shared";
  fs::create_directories(out);
  {
    const io::FolderLock held(out.string());  // as a run starting there would hold it
    const test::Run refused = run(tiny_run(ref.data) + "--out " + out.string());
    INFO(refused.output);
    CHECK(refused.exit_code == 1);
    CHECK(refused.output.find("another process (pid " + std::to_string(::getpid()) + ") is using " + out.string() +
                              ": it holds " + (out / ".lock").string()) != std::string::npos);
    CHECK_FALSE(fs::exists(out / "config.json"));
  }
  // A run paused (SIGSTOP) once it has started: a --resume of its folder is refused naming it.
  const pid_t pid = test::start_program(test::program(TRAIN_MDFF_BINARY), tiny_run(ref.data) + "--out " + out.string(),
                                        ref.folder.file("log_shared"));
  for (const auto start = Clock::now(); !fs::exists(out / "config.json");) {
    REQUIRE(Clock::now() - start < std::chrono::seconds(30));
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ::kill(pid, SIGSTOP);
  const test::Run second = run("--resume " + out.string());
  INFO(second.output);
  CHECK(second.exit_code == 1);
  CHECK(second.output.find("another process (pid " + std::to_string(pid) + ") is using " + out.string()) !=
        std::string::npos);
  // Killed, it holds nothing: the folder resumes.
  ::kill(pid, SIGKILL);
  CHECK(test::wait_program(pid) == -SIGKILL);
  const test::Run resumed = run("--resume " + out.string());
  INFO(resumed.output);
  REQUIRE(resumed.exit_code == 0);
  check_same_results(out);
}
