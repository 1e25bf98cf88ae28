// train_mdff as a user runs it: bad options exit 2 with the reason, a missing dataset exits 1 naming
// the path, and a tiny end-to-end run (tiny ResNet, 300 generated images, one epoch, two code lengths)
// writes every result file, with a metrics.json whose mAP agrees with an mAP recomputed here, from the
// .npy codes, by a plain sort. The same (mAP@5000) for a generated NUS-WIDE-style multi-label image list
// (PNG files of two shapes) in crop mode (--resize, --crop), where the codes are also those of
// centre crops made here by hand, and of the checkpoint as load_model_checkpoint reads it; that list
// without crop mode; and a corrupt image in a list exits 1 naming it. A learning rate that diverges stops
// the run with what happened and where, whether the loss becomes NaN or the codes collapse.
#include <doctest/doctest.h>
#include "tests/doctest_text.h"
#include <fcntl.h>
#include <nlohmann/json.hpp>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <regex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "core/autograd.h"
#include "core/ops.h"
#include "core/safetensors.h"
#include "core/backend.h"
#include "core/file_io.h"
#include "tests/run_program.h"
#include "data/batch.h"
#include "data/protocol.h"
#include "models/checkpoint.h"
#include "retrieval/encode.h"
#include "retrieval/npy.h"
#include "tests/temp_folder.h"
#include "tests/tiny_dataset.h"

#include "tests/stb_image_write_static.h"

using namespace mdff;
namespace fs = std::filesystem;

namespace {

using test::make_dataset;
using test::Run;
using test::tensor_bytes;

Run run(const std::string& arguments) { return test::run_program(test::program(TRAIN_MDFF_BINARY), arguments); }

// A NUS-WIDE / MS-COCO-style image list, dir/list.txt: `count` PNG images in dir/images, alternately
// 60x50 and 50x70 (width x height), each showing 1 to 3 of 5 concepts on a noisy background (a coloured
// square: one per quadrant, and a smaller one in the centre), listed as "images/N.png l1 ... l5" with the
// matching multi-hot labels.
fs::path make_image_list(const fs::path& dir, int count) {
  fs::create_directories(dir / "images");
  static const uint8_t colours[5][3] = {{255, 0, 0}, {0, 255, 0}, {0, 0, 255}, {255, 255, 0}, {255, 0, 255}};
  uint32_t state = 777;
  auto next = [&] { return (state = state * 1664525 + 1013904223) >> 24; };
  std::ofstream list(dir / "list.txt");
  for (int i = 0; i < count; ++i) {
    const int width = i % 2 ? 50 : 60, height = i % 2 ? 70 : 50;
    bool shown[5] = {};
    for (uint32_t wanted = 1 + next() % 3, chosen = 0; chosen < wanted;) {
      const uint32_t c = next() % 5;
      chosen += !shown[c];
      shown[c] = true;
    }
    std::vector<uint8_t> rgb(static_cast<size_t>(width) * height * 3);
    for (uint8_t& v : rgb) v = static_cast<uint8_t>(next() % 96);
    for (int c = 0; c < 5; ++c) {
      if (!shown[c]) continue;
      // quadrant c (concepts 0..3) with a 3-pixel margin, or the centre quarter (concept 4)
      const int y0 = c == 4 ? height * 3 / 8 : (c / 2) * height / 2 + 3, y1 = c == 4 ? height * 5 / 8 : y0 + height / 2 - 6;
      const int x0 = c == 4 ? width * 3 / 8 : (c % 2) * width / 2 + 3, x1 = c == 4 ? width * 5 / 8 : x0 + width / 2 - 6;
      for (int y = y0; y < y1; ++y)
        for (int x = x0; x < x1; ++x) std::copy(colours[c], colours[c] + 3, &rgb[(static_cast<size_t>(y) * width + x) * 3]);
    }
    const std::string name = "images/" + std::to_string(i) + ".png";
    REQUIRE(stbi_write_png((dir / name).c_str(), width, height, 3, rgb.data(), width * 3));
    list << name;
    for (bool s : shown) list << (s ? " 1" : " 0");
    list << "\n";
  }
  return dir / "list.txt";
}

// The evaluation input of make_image_list's image `path` in crop mode with --resize 40 --crop 32, made here
// step by step: the shorter side resized to 40 keeping the aspect ratio (60x50 -> 48x40, 50x70 -> 40x56),
// the centred 32x32 window (from x 8, y 4, or from x 4, y 12), ImageNet normalisation. (3,32,32) values.
std::vector<float> centre_crop_input(const std::string& path) {
  const data::Image image = data::decode_image(path);
  const bool wide = image.width == 60;
  Tensor x = Tensor::empty({1, 3, image.height, image.width});
  const int64_t plane = int64_t{image.height} * image.width;
  for (int64_t p = 0; p < plane; ++p)
    for (int c = 0; c < 3; ++c) x.data<float>()[c * plane + p] = image.pixels[p * 3 + c] / 255.0f;
  const int height = wide ? 40 : 56, width = wide ? 48 : 40, top = wide ? 4 : 12, left = wide ? 8 : 4;
  const Tensor resized = ops::resize_bilinear(x, height, width);
  std::vector<float> out;
  for (int c = 0; c < 3; ++c)
    for (int y = top; y < top + 32; ++y)
      for (int v = left; v < left + 32; ++v)
        out.push_back((resized.data<float>()[(c * height + y) * width + v] - data::kImageNetMean[c]) / data::kImageNetStd[c]);
  return out;
}

// mAP@K (the whole ranking when `at` is -1 or exceeds the database) from ±1 codes and multi-hot labels,
// by the definition (method.md §6; retrieval/metrics.h) and a stable sort: AP = (1/R) sum of P@r over the
// relevant ranks r <= K, R the relevant items in the top K (AP = 0 when R = 0).
double naive_map(const retrieval::NpyArray& q, const retrieval::NpyArray& d, const retrieval::NpyArray& ql,
                 const retrieval::NpyArray& dl, int64_t at) {
  const std::vector<int8_t> qc = q.int8_values(), dc = d.int8_values();
  const std::vector<uint8_t> qlab = ql.uint8_values(), dlab = dl.uint8_values();
  const int64_t nq = q.shape[0], nd = d.shape[0], bits = q.shape[1], k = ql.shape[1];
  const int64_t top = at < 0 ? nd : std::min(at, nd);
  double total = 0;
  for (int64_t i = 0; i < nq; ++i) {
    std::vector<int> distance(nd);
    for (int64_t j = 0; j < nd; ++j)
      for (int64_t b = 0; b < bits; ++b) distance[j] += qc[i * bits + b] != dc[j * bits + b];
    std::vector<int64_t> order(nd);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return distance[a] < distance[b]; });
    double relevant = 0, sum = 0;
    for (int64_t r = 0; r < top; ++r) {
      bool shared = false;
      for (int64_t c = 0; c < k; ++c) shared |= qlab[i * k + c] && dlab[order[r] * k + c];
      if (shared) sum += ++relevant / (r + 1);
    }
    total += relevant > 0 ? sum / relevant : 0;
  }
  return total / nq;
}

}  // namespace

TEST_CASE("bad options exit 2 with the reason") {
  for (const char* arguments : {"--epochs 0", "--taps fc2", "--bits 12,x", "--scales 1,a", "--recipe fast",
                                "--batch-size 1", "--pairs all", "--no-such-option", "--crop 32", "--resize 40",
                                "--resize 32 --crop 40", "--image-size 32 --resize 40 --crop 32",
                                "--resize 40 --crop 32 --shift 2", "--precision fp16", "--device tpu"}) {
    CAPTURE(arguments);
    const Run r = run(arguments);
    CHECK(r.exit_code == 2);
    CHECK(!r.output.empty());
  }
  CHECK(run("--bits 12,x").output.find("'x' is not a whole number") != std::string::npos);
  CHECK(run("--crop 32").output.find("--resize and --crop go together") != std::string::npos);
  CHECK(run("--resize 32 --crop 40").output.find("--crop 40 is larger than --resize 32") != std::string::npos);
  CHECK(run("--image-size 32 --resize 40 --crop 32").output.find("--crop replaces --image-size") != std::string::npos);
  CHECK(run("--resize 40 --crop 32 --shift 2").output.find("leave --shift out") != std::string::npos);

  // Values that CLI11's own checks let through (a NaN passes PositiveNumber, a uint64 takes -1 as 2^64 - 1, an
  // empty --bits meant the default) or that failed only later, after the run folder held a config.json that
  // --resume could not read. Each would otherwise get past the options and fail to find this dataset (exit 1).
  const test::TempFolder folder("mdff_train_bad_options");
  const std::string no_data = "cifar10 --data-dir " + (folder.path / "none").string() + " --out " +
                              (folder.path / "run").string() + " ";
  std::ofstream(folder.path / "list.txt") << "a.png 1 0\n";
  std::ofstream(folder.path / "file") << "not a folder\n";
  const std::pair<std::string, std::string> refused[] = {
      {no_data + "--lr nan", "--lr: nan is not a finite number"},
      {no_data + "--lr 0", "--lr: 0 is too small: give a number above 0"},
      {no_data + "--lr abc", "--lr: 'abc' is not a number"},
      {no_data + "--gamma inf", "--gamma: inf is not a finite number"},
      {no_data + "--beta nan", "--beta: nan is not a finite number"},
      {no_data + "--warmup nan", "--warmup: nan is not a finite number"},
      {no_data + "--weight-decay -1", "--weight-decay: -1 is too small"},
      {no_data + "--bits ''", "--bits: give at least one value"},
      {no_data + "--bits 8,", "--bits: '8,' has an empty item"},
      {no_data + "--bits ,8", "--bits: ',8' has an empty item"},
      {no_data + "--bits 8,16,8", "--bits: 8 is given twice"},
      {no_data + "--scales 1,nan", "--scales: 'nan' is not a finite number"},
      {no_data + "--seed -1", "--seed: '-1' is not a whole number"},
      {no_data + "--seed 18446744073709551616", "--seed: '18446744073709551616' is not a whole number"},
      {(folder.path / "no_list.txt").string() + " --classes 2", "DATASET: no file"},
      {folder.path.string() + " --classes 2", "is not a file"},
      {(folder.path / "list.txt").string(), "an image list needs --classes"},
      {no_data + "--pretrained " + folder.path.string(), "is a folder: give the weights file in it"},
      // a split size of the other kind of dataset, which was silently ignored
      {no_data + "--queries 500", "--queries and --train-images size the split of an image list (multi-label); "
                                  "cifar10's takes --queries-per-class"},
      {no_data + "--train-images 10000", "--queries and --train-images size the split of an image list"},
      {(folder.path / "list.txt").string() + " --classes 2 --train-per-class 5",
       "--queries-per-class and --train-per-class size the split of fashion-mnist and cifar10"},
      {std::string(5000, 'a') + " --classes 2", "File name too long"},  // was an uncaught filesystem_error
      {"cifar10 --data-dir " + (folder.path / "none").string() + " --out " + std::string(5000, 'b'), "File name too long"},
      {"cifar10 --data-dir " + (folder.path / "none").string() + " --out " + (folder.path / "file").string(),
       "is a file, not a folder"},
  };
  for (const auto& entry : refused) {
    const std::string& arguments = entry.first;  // CAPTURE cannot name a structured binding (C++17)
    CAPTURE(arguments);
    const Run r = run(arguments);
    CHECK(r.exit_code == 2);
    CHECK_MESSAGE(r.output.find(entry.second) != std::string::npos, r.output);
    CHECK(r.output.find("[check") == std::string::npos);  // the user's mistake: no source location
  }
  CHECK_FALSE(fs::exists(folder.path / "run"));
  std::string why_no_gpu;
  if (!cuda_available(&why_no_gpu)) {  // asking for the GPU where there is none: a usage error with the reason
    const Run cuda = run("--device cuda");
    CHECK(cuda.exit_code == 2);
    CHECK(cuda.output.find("--device cuda: " + why_no_gpu) != std::string::npos);
  }
  const Run help = run("--help");
  CHECK(help.exit_code == 0);
  CHECK(help.output.find("--precision") != std::string::npos);
  CHECK(help.output.find("--weight-decay") != std::string::npos);
  CHECK(help.output.find("replaces --image-size") != std::string::npos);
}

TEST_CASE("a missing dataset exits 1 naming where it looked, and leaves no run folder behind") {
  const test::TempFolder folder("mdff_no_dataset");
  const fs::path dir = folder.path / "no_such_dataset";
  const Run r = run("cifar10 --data-dir " + dir.string() + " --out " + (folder.path / "made" / "run").string());
  CHECK(r.exit_code == 1);
  CHECK(r.output.find(dir.string()) != std::string::npos);
  CHECK(r.output.find("download_cifar10.sh") != std::string::npos);
  CHECK_FALSE(fs::exists(folder.path / "made"));  // the folders it made for the run, gone with it
  // a folder that was there stays, with its files (even a split/ the run did not write) and the run's lock
  // file only
  fs::create_directories(folder.path / "there" / "split");
  std::ofstream(folder.path / "there" / "mine.txt") << "a user's file\n";
  std::ofstream(folder.path / "there" / "split" / "query.txt") << "a user's split\n";
  CHECK(run("cifar10 --data-dir " + dir.string() + " --out " + (folder.path / "there").string()).exit_code == 1);
  std::set<std::string> left;
  for (const auto& entry : fs::recursive_directory_iterator(folder.path / "there"))
    left.insert(fs::relative(entry.path(), folder.path / "there").string());
  CHECK(left == std::set<std::string>{".lock", "mine.txt", "split", "split/query.txt"});
  // a path that leaves a folder it made (made/sub/..): that folder goes too, with the lock file
  CHECK(run("cifar10 --data-dir " + dir.string() + " --out " + (folder.path / "made" / "sub" / "..").string())
            .exit_code == 1);
  CHECK_FALSE(fs::exists(folder.path / "made"));
  // What appears in a folder the run made while the run loads its data (here: another run's results next
  // to it) stays: the run takes back its own files only. CIFAR-10's class names are read from a FIFO, so
  // that the run waits there until this test has written the other files, then fails on what it reads.
  const fs::path slow_data = folder.path / "slow_data";
  fs::create_directories(slow_data);
  REQUIRE(::mkfifo((slow_data / "batches.meta.txt").c_str(), 0600) == 0);
  const fs::path shared = folder.path / "shared";
  const pid_t pid = test::start_program(test::program(TRAIN_MDFF_BINARY), "cifar10 --device cpu --data-dir " +
                                        slow_data.string() + " --out " + (shared / "run").string(),
                                        folder.file("slow.log"));
  // The FIFO opens for writing once the run has opened it to read (ENXIO until then); not at all should the
  // run end first, or hang (a minute at most), so that the test fails instead of waiting for ever.
  int fifo = -1;
  for (int waited_ms = 0; fifo < 0 && !test::has_exited(pid) && waited_ms < 60000; waited_ms += 10) {
    fifo = ::open((slow_data / "batches.meta.txt").c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (fifo < 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (fifo < 0) ::kill(pid, SIGKILL);
  REQUIRE_MESSAGE(fifo >= 0, "train_mdff never opened CIFAR-10's class names: see ", folder.file("slow.log"));
  fs::create_directories(shared / "other");
  std::ofstream(shared / "other" / "results.txt") << "another run's\n";
  const std::string names = "only one class name\n";
  CHECK(::write(fifo, names.data(), names.size()) == static_cast<ssize_t>(names.size()));
  ::close(fifo);
  CHECK(test::wait_program(pid) == 1);
  CHECK(fs::exists(shared / "other" / "results.txt"));
  CHECK_FALSE(fs::exists(shared / "run"));
  // an output folder that cannot be made is an error naming it, not an uncaught exception
  const Run no_folder = run("--out /proc/mdff_cannot_exist/run");
  CHECK(no_folder.exit_code == 1);
  CHECK(no_folder.output.find("/proc/mdff_cannot_exist/run") != std::string::npos);
}

TEST_CASE("a diverging run stops naming the step and the last good checkpoint, a collapsed one writes no codes; "
          "--config is read") {
  const fs::path root = fs::temp_directory_path() / ("mdff_train_diverge_" + std::to_string(::getpid()));
  const fs::path data = make_dataset(root / "data", 20);
  const std::string common = "fashion-mnist --data-dir " + data.string() +
                             " --model tiny --bits 8 --batch-size 16 --scales 1 --queries-per-class 5"
                             " --train-per-class 10 --monitor-every 0 ";
  const Run diverged = run(common + "--epochs 3 --optimizer sgd --lr 1e12 --out " + (root / "diverged").string());
  CHECK(diverged.exit_code == 1);
  // Which value is reported first (the loss, a gradient, a batch-norm statistic) depends on OpenBLAS's kernels,
  // which round differently: on an AVX-512 machine, SkylakeX's (what core/blas.cpp picks there) make the loss
  // -nan, Haswell's (OPENBLAS_CORETYPE=Haswell, set by one development environment) make a running variance
  // inf first, at the same step. Each report names the value, the step and the fix.
  INFO(diverged.output);
  CHECK(std::regex_search(diverged.output, std::regex("became (-?nan|-?inf|NaN or infinite)[^\\n]* at epoch 1, "
                                                      "step 2[^\\n]*[Ll]ower --lr")));
  CHECK(diverged.output.find("The last good checkpoint is none") != std::string::npos);
  // lr 10 diverges with every loss finite: the model gives every image the same code
  const fs::path collapsed = root / "collapsed";
  const Run garbage = run(common + "--epochs 3 --optimizer sgd --lr 10 --out " + collapsed.string());
  CHECK(garbage.exit_code == 1);
  CHECK(garbage.output.find("every one of the 250 database images has the same 8-bit code: the model collapsed") !=
        std::string::npos);
  CHECK(garbage.output.find("with --lr 10, the loss went from") != std::string::npos);
  CHECK_FALSE(fs::exists(collapsed / "codes"));
  CHECK_FALSE(fs::exists(collapsed / "metrics.json"));
  // options from a file; a bad value there is a usage error like on the command line
  std::ofstream(root / "good.toml") << "epochs = 1\nlr = 0.01\n";
  const Run configured = run(common + "--config " + (root / "good.toml").string() + " --out " + (root / "cfg").string());
  CHECK(configured.exit_code == 0);
  const auto config = nlohmann::json::parse(std::ifstream(root / "cfg" / "config.json"));
  CHECK(config["epochs"] == 1);
  CHECK(config["lr"] == 0.01);
  std::ofstream(root / "bad.toml") << "epochs = 0\n";
  CHECK(run(common + "--config " + (root / "bad.toml").string()).exit_code == 2);
  // a misspelt option, or a line that is not `option = value`, is refused (CLI11 ignored both by default)
  for (const char* text : {"epoch = 1\n", "this is not toml\n"}) {
    CAPTURE(text);
    std::ofstream(root / "typo.toml") << text;
    const Run typo = run(common + "--config " + (root / "typo.toml").string() + " --out " + (root / "typo").string());
    CHECK(typo.exit_code == 2);
    CHECK(typo.output.find("--config: ") != std::string::npos);
    CHECK_FALSE(fs::exists(root / "typo"));
  }
  fs::remove_all(root);
}

TEST_CASE("a tiny end-to-end run writes every result, and its mAP is right") {
  const fs::path root = fs::temp_directory_path() / ("mdff_train_test_" + std::to_string(::getpid()));
  const fs::path data = make_dataset(root / "data", 20), out = root / "run";
  const Run r = run("fashion-mnist --data-dir " + data.string() + " --out " + out.string() +
                    " --model tiny --epochs 1 --bits 8,16 --batch-size 16 --scales 1 --queries-per-class 5"
                    " --train-per-class 10 --optimizer sgd --lr 0.01 --seed 010");
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  for (const char* file : {"config.json", "split/query.txt", "split/train.txt", "split/database.txt", "metrics.json",
                           "checkpoint_8bits.safetensors", "checkpoint_16bits.safetensors", "pr_curves.svg",
                           "precision_at_n.svg", "precision_hamming2.svg", "figure4_8bits.png", "figure4_16bits.png"}) {
    CAPTURE(file);
    CHECK(fs::is_regular_file(out / file));
    CHECK(fs::file_size(out / file) > 0);
  }
  const auto config = nlohmann::json::parse(std::ifstream(out / "config.json"));
  for (const char* key : {"dataset", "bits", "epochs", "batch_size", "optimizer", "lr", "schedule", "weight_decay", "beta",
                          "gamma", "pairs", "taps", "scales", "image_size", "protocol", "seed", "device", "model"})
    CHECK_MESSAGE(config.contains(key), "config.json lacks ", key);
  CHECK(config["data_dir"] == data.string());
  CHECK(config["seed"] == 10);  // base 10: CLI11 alone read "010" as octal 8
  // one progress bar over the queries and the database (non-terminal output: its last line)
  CHECK(r.output.find("8 bits, encoding the queries and the database 300/300") != std::string::npos);
  const auto metrics = nlohmann::json::parse(std::ifstream(out / "metrics.json"));
  for (const char* bits : {"8", "16"}) {
    CAPTURE(bits);
    const fs::path codes = out / "codes" / bits;
    const auto q = retrieval::read_npy((codes / "query.npy").string()), d = retrieval::read_npy((codes / "database.npy").string());
    const auto ql = retrieval::read_npy((codes / "query_labels.npy").string());
    const auto dl = retrieval::read_npy((codes / "database_labels.npy").string());
    CHECK(q.shape == Shape{50, std::stoi(bits)});
    CHECK(d.shape == Shape{250, std::stoi(bits)});
    CHECK(ql.shape == Shape{50, 10});
    for (int8_t v : q.int8_values()) CHECK((v == 1 || v == -1));
    const auto& entry = metrics["code_lengths"][bits];
    CHECK(entry["map"].get<double>() == doctest::Approx(naive_map(q, d, ql, dl, -1)).epsilon(1e-12));
    CHECK(entry["history"].size() == 1);
    CHECK(entry.contains("precision_hamming_2"));
  }
  // paths given relative to where the run starts are stored absolute: --resume works from another folder
  const std::string binary = test::program(TRAIN_MDFF_BINARY);
  const Run relative = test::run_program("cd " + root.string() + " && exec " + binary,
                                         "fashion-mnist --data-dir data --out relative --model tiny --epochs 1 --bits 8 "
                                         "--batch-size 16 --scales 1 --queries-per-class 5 --train-per-class 10 "
                                         "--monitor-every 0");
  REQUIRE(relative.exit_code == 0);
  CHECK(nlohmann::json::parse(std::ifstream(root / "relative" / "config.json"))["data_dir"] == data.string());
  const Run elsewhere = test::run_program("cd / && exec " + binary, "--resume " + (root / "relative").string());
  INFO(elsewhere.output);
  CHECK(elsewhere.exit_code == 0);
  const io::SafetensorsFile checkpoint = io::load_safetensors((out / "checkpoint_8bits.safetensors").string());
  CHECK(checkpoint.find("hash.weight") != nullptr);
  CHECK(checkpoint.find("backbone.layer1.0.bn1.running_mean") != nullptr);
  CHECK(r.output.find("mAP@ALL") != std::string::npos);
  fs::remove_all(root);
}

TEST_CASE("a multi-label image list in crop mode: mAP@5000 is right and the checkpoint reproduces the codes") {
  const test::TempFolder folder("mdff_train_list");
  const fs::path root = folder.path, list = make_image_list(root / "data", 160), out = root / "run";
  // A small learning rate: larger ones collapse these codes to one or two, which would not tell one way of
  // preparing the images from another.
  const std::string common = list.string() + " --classes 5 --model tiny --bits 8 --batch-size 16 --scales 1"
                             " --queries 20 --train-images 60 --optimizer sgd --lr 0.001 ";
  const Run r = run(common + "--resize 40 --crop 32 --epochs 2 --out " + out.string());
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  const auto config = nlohmann::json::parse(std::ifstream(out / "config.json"));
  CHECK(config["resize"] == 40);
  CHECK(config["crop"] == 32);
  CHECK(config["image_size"] == 32);  // the model's input: the crop

  const fs::path codes = out / "codes" / "8";
  const auto q = retrieval::read_npy((codes / "query.npy").string()), d = retrieval::read_npy((codes / "database.npy").string());
  const auto ql = retrieval::read_npy((codes / "query_labels.npy").string());
  const auto dl = retrieval::read_npy((codes / "database_labels.npy").string());
  CHECK(q.shape == Shape{20, 8});
  CHECK(d.shape == Shape{140, 8});
  REQUIRE(dl.shape == Shape{140, 5});
  int64_t several = 0;  // database images with 2 or 3 labels
  const std::vector<uint8_t> database_labels = dl.uint8_values();
  for (int64_t i = 0; i < 140; ++i)
    several += std::count(database_labels.begin() + i * 5, database_labels.begin() + (i + 1) * 5, 1) >= 2;
  CHECK(several >= 40);
  const auto metrics = nlohmann::json::parse(std::ifstream(out / "metrics.json"));
  const double map = metrics["code_lengths"]["8"]["map"].get<double>();
  MESSAGE("crop mode, 8 bits: mAP@5000 ", map);
  CHECK(map == doctest::Approx(naive_map(q, d, ql, dl, 5000)).epsilon(1e-12));
  const auto& history = metrics["code_lengths"]["8"]["history"];
  REQUIRE(history.size() == 2);
  // J3's target sums to 1 (labels / their count): about ln 5 against near-uniform predictions, where the
  // labels themselves (2 an image on average) would give about twice that
  for (const auto& epoch : history) {
    CHECK(epoch["j3"].get<double>() < 1.5 * std::log(5.0));
    CHECK(epoch["peak_tensor_mib"].get<double>() > 0);  // counted on the CPU too
  }
  // 160 images: the database is smaller than 5000, which the line says
  CHECK(r.output.find("mAP is mAP@5000, here mAP@ALL: the database has 140 images") != std::string::npos);
  CHECK(r.output.find("peak tensor memory") != std::string::npos);

  // The run's codes are those of the centre crops (made here by hand) through the checkpoint's model; and
  // the input options the checkpoint holds (mdff_search's way in) give the same codes. (Each set of
  // images in one batch, as train_mdff encodes them.)
  const LoadedCheckpoint loaded = load_model_checkpoint((out / "checkpoint_8bits.safetensors").string());
  CHECK(loaded.batch.crop_mode);
  const data::Dataset dataset = data::load_image_list(list.string(), (root / "data").string(), 5);
  const data::Split split = data::read_split((out / "split").string(), dataset.size());
  for (const auto& [rows, written] : {std::pair{&split.query, &q}, {&split.database, &d}}) {
    std::vector<float> inputs;
    for (int64_t row : *rows) {
      const std::vector<float> one = centre_crop_input(dataset.image_paths[row]);
      inputs.insert(inputs.end(), one.begin(), one.end());
    }
    const auto count = static_cast<int64_t>(rows->size());
    NoGradGuard no_grad;
    const Tensor by_hand = loaded.model->forward(Tensor::from_vector(inputs, {count, 3, 32, 32})).u;
    CHECK(retrieval::unpack_codes(retrieval::pack_codes(by_hand)) == written->int8_values());
    const Tensor encoded = retrieval::encode(*loaded.model, dataset, *rows, loaded.batch, 256);
    CHECK(retrieval::unpack_codes(retrieval::pack_codes(encoded)) == written->int8_values());
  }

  // a resumed run reads the crop options back from config.json
  const Run other_crop = run("--resume " + out.string() + " --crop 24");
  CHECK(other_crop.exit_code == 2);
  CHECK(other_crop.output.find("--crop 24 here, 32 in the run") != std::string::npos);

  // without crop options: the plain resize to --image-size
  const Run plain = run(common + "--image-size 32 --epochs 1 --monitor-every 0 --out " + (root / "plain").string());
  INFO(plain.output);
  REQUIRE(plain.exit_code == 0);
  const auto plain_config = nlohmann::json::parse(std::ifstream(root / "plain" / "config.json"));
  CHECK(plain_config["crop"] == 0);
  CHECK(plain_config["resize"] == 0);
  const auto plain_metrics = nlohmann::json::parse(std::ifstream(root / "plain" / "metrics.json"));
  MESSAGE("plain resize, 8 bits: mAP@5000 ", plain_metrics["code_lengths"]["8"]["map"].get<double>());
  CHECK(plain_metrics["code_lengths"]["8"]["map"].get<double>() > 0);
  CHECK_FALSE(load_model_checkpoint((root / "plain" / "checkpoint_8bits.safetensors").string()).batch.crop_mode);

  // a resumed run whose image list has gone: the message names the run's list, not "give a DATASET" (which
  // --resume refuses as a difference)
  fs::rename(list, root / "moved.txt");
  const Run lost = run("--resume " + (root / "plain").string());
  CHECK(lost.exit_code == 2);
  CHECK(lost.output.find("--resume: the run's image list " + list.string()) != std::string::npos);
}

TEST_CASE("a corrupt image in a list exits 1 naming the file") {
  const test::TempFolder folder("mdff_train_corrupt");
  const fs::path list = make_image_list(folder.path / "data", 40), broken = folder.path / "data" / "images" / "7.png";
  fs::resize_file(broken, fs::file_size(broken) / 2);  // a truncated PNG
  const Run r = run(list.string() + " --classes 5 --model tiny --bits 8 --batch-size 16 --scales 1 --queries 5"
                    " --train-images 20 --epochs 1 --monitor-every 0 --resize 40 --crop 32 --out " + folder.file("run"));
  INFO(r.output);
  CHECK(r.exit_code == 1);
  CHECK(r.output.find(broken.string() + ": cannot decode the image") != std::string::npos);
}

TEST_CASE("a run interrupted twice and resumed ends bit-identical to an uninterrupted one") {
  const fs::path root = fs::temp_directory_path() / ("mdff_train_resume_" + std::to_string(::getpid()));
  const fs::path data = make_dataset(root / "data", 20);
  // 100 training images in batches of 16: 6 steps an epoch. RMSProp, U (pairs = dataset), shifts and
  // flips: every piece of state that resuming must restore matters here. On the CPU, where a resumed run
  // is bit-identical (on a GPU each process chooses cuDNN's algorithms by timing them).
  const std::string common = "fashion-mnist --device cpu --data-dir " + data.string() +
                             " --model tiny --bits 8 --batch-size 16 --scales 1 --queries-per-class 5"
                             " --train-per-class 10 --epochs 3 --optimizer rmsprop --lr 0.001 --pairs dataset"
                             " --shift 2 --schedule cosine ";
  const Run whole = run(common + "--out " + (root / "whole").string());
  INFO(whole.output);
  REQUIRE(whole.exit_code == 0);

  const fs::path parts = root / "parts";
  // Stopped at the end of epoch 1, then in the middle of epoch 3 (6 + 1 steps later).
  const Run first = run(common + "--out " + parts.string() + " --interrupt-after-steps 6");
  INFO(first.output);
  REQUIRE(first.exit_code == 130);
  CHECK(first.output.find("--resume " + parts.string()) != std::string::npos);
  const Run second = run("--resume " + parts.string() + " --interrupt-after-steps 7");
  INFO(second.output);
  REQUIRE(second.exit_code == 130);
  CHECK(second.output.find("resuming") != std::string::npos);
  const Run third = run("--resume " + parts.string());
  INFO(third.output);
  REQUIRE(third.exit_code == 0);

  const auto expected = tensor_bytes(root / "whole" / "checkpoint_8bits.safetensors");
  const auto resumed = tensor_bytes(parts / "checkpoint_8bits.safetensors");
  CHECK(expected.count("optimizer.square_avg") == 1);
  CHECK(expected.count("trainer.codes") == 1);
  REQUIRE(expected.size() == resumed.size());
  for (const auto& [key, bytes] : expected) {
    const std::string& name = key;  // CAPTURE captures in a lambda, which in C++17 cannot name a structured binding
    CAPTURE(name);
    REQUIRE(resumed.count(name) == 1);
    CHECK(resumed.at(name) == bytes);
  }
  const auto metrics_whole = nlohmann::json::parse(std::ifstream(root / "whole" / "metrics.json"));
  const auto metrics_parts = nlohmann::json::parse(std::ifstream(parts / "metrics.json"));
  CHECK(metrics_parts["code_lengths"]["8"]["map"] == metrics_whole["code_lengths"]["8"]["map"]);
  const auto& history_whole = metrics_whole["code_lengths"]["8"]["history"];
  const auto& history_parts = metrics_parts["code_lengths"]["8"]["history"];
  REQUIRE(history_whole.size() == 3);
  REQUIRE(history_parts.size() == 3);
  CHECK(history_whole[1].contains("monitor_map"));  // the learning curve: every 2 epochs and at the end
  CHECK(history_whole[2].contains("monitor_map"));
  for (int epoch = 0; epoch < 3; ++epoch)
    for (const char* key : {"loss", "j1", "j2", "j3", "monitor_map"}) {
      CAPTURE(epoch);
      CAPTURE(key);
      CHECK(history_parts[epoch].value(key, nlohmann::json()) == history_whole[epoch].value(key, nlohmann::json()));
    }

  // A resume that asks for other options is refused naming them; a new run cannot reuse a run's folder.
  const Run refused = run("--resume " + parts.string() + " --lr 0.5 --epochs 3");
  CHECK(refused.exit_code == 2);
  CHECK(refused.output.find("--lr 0.5 here, 0.001 in the run") != std::string::npos);
  CHECK(refused.output.find("--epochs") == std::string::npos);  // the same value is no difference
  const Run reused = run(common + "--out " + parts.string());
  CHECK(reused.exit_code == 2);
  CHECK(reused.output.find("--resume") != std::string::npos);
  CHECK(run("--resume " + (root / "nothing").string()).exit_code == 2);
  // --out names the run's folder when it starts; a resumed run continues where it is
  const Run elsewhere = run("--resume " + parts.string() + " --out " + (root / "elsewhere").string());
  CHECK(elsewhere.exit_code == 2);
  CHECK(elsewhere.output.find("a run continues in its own folder") != std::string::npos);
  CHECK_FALSE(fs::exists(root / "elsewhere"));
  // The device is the run's unless the command gives one: this CPU run stays on the CPU where there is a GPU
  // (it is finished, so it only reports). A run that trained on the GPU, resumed where there is none, is
  // refused with the fix; a device that train_mdff does not know is refused naming config.json.
  const Run finished = run("--resume " + parts.string());
  CHECK(finished.exit_code == 0);
  CHECK_MESSAGE(finished.output.find("fashion-mnist on cpu") != std::string::npos, finished.output);
  const fs::path config_path = parts / "config.json";
  const std::vector<uint8_t> config_bytes = io::read_file(config_path.string());
  CHECK(nlohmann::json::parse(config_bytes).value("precision", "") == "tf32");  // recorded on the CPU too
  const std::string config_text(config_bytes.begin(), config_bytes.end());
  // The run as config.json would hold it with `changes`, resumed with `arguments`.
  auto resume_with = [&](const nlohmann::json& changes, const std::string& arguments) {
    nlohmann::json config = nlohmann::json::parse(config_text);
    config.update(changes);
    io::write_file_atomic(config_path.string(), config.dump(2));
    return run("--resume " + parts.string() + arguments);
  };
  std::string why_no_gpu;
  if (!cuda_available(&why_no_gpu)) {
    const Run gpu_run = resume_with({{"device", "cuda"}}, "");
    CHECK(gpu_run.exit_code == 2);
    CHECK_MESSAGE(gpu_run.output.find("--resume: the run trained on the GPU, and here there is none (" + why_no_gpu +
                                      "): give --device cpu") != std::string::npos, gpu_run.output);
    // moved to the CPU, the run keeps its GPU precision for a later resume there
    CHECK(resume_with({{"device", "cuda"}, {"precision", "fp32"}}, " --device cpu").exit_code == 0);
    const auto moved = nlohmann::json::parse(std::ifstream(config_path));
    CHECK(moved.value("device", "") == "cpu");
    CHECK(moved.value("precision", "") == "fp32");
  }
  const Run unknown = resume_with({{"device", "tpu"}}, "");
  CHECK(unknown.exit_code == 2);
  CHECK_MESSAGE(unknown.output.find("config.json: 'device' is \"tpu\"") != std::string::npos, unknown.output);
  // Weights the run started from (--pretrained) that have gone since: no matter once every code length has
  // its checkpoint; refused, naming the length, while one has yet to start from them.
  const std::string gone = (root / "gone.safetensors").string();
  CHECK(resume_with({{"pretrained", gone}}, "").exit_code == 0);
  const Run unstarted = resume_with({{"pretrained", gone}, {"bits", "8,16"}}, "");
  CHECK(unstarted.exit_code == 2);
  CHECK_MESSAGE(unstarted.output.find("--pretrained: no file " + gone) != std::string::npos, unstarted.output);
  CHECK(unstarted.output.find("the run's 16-bit model has not started") != std::string::npos);
  io::write_file_atomic(config_path.string(), config_text);
  // A checkpoint whose training state is damaged is an error naming it, not a crash.
  const fs::path checkpoint = parts / "checkpoint_8bits.safetensors";
  io::SafetensorsFile file = io::load_safetensors(checkpoint.string());
  file.metadata["trainer"] = "{\"optimizer\": \"rmsprop\", \"steps\": \"many\"}";
  io::save_safetensors_entries(checkpoint.string(), file.entries, file.metadata);
  const Run damaged = run("--resume " + parts.string());
  CHECK(damaged.exit_code == 1);
  CHECK(damaged.output.find("training state (metadata 'trainer') is damaged") != std::string::npos);
  fs::remove_all(root);
}
