// train_mdff as a user runs it: bad options exit 2 with the reason, a missing dataset exits 1 naming
// the path, and a tiny end-to-end run (tiny ResNet, 300 generated images, one epoch, two code lengths)
// writes every result file, with a metrics.json whose mAP agrees with an mAP recomputed here, from the
// .npy codes, by a plain sort.
#include <doctest/doctest.h>
#include <nlohmann/json.hpp>
#include <zlib.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <numeric>
#include <sys/wait.h>
#include <unistd.h>
#include <string>
#include <vector>

#include "core/safetensors.h"
#include "retrieval/npy.h"

using namespace mdff;
namespace fs = std::filesystem;

namespace {

struct Run {
  int exit_code;
  std::string output;  // stdout and stderr
};

Run run(const std::string& arguments) {
  const std::string command = std::string(TRAIN_MDFF_BINARY) + " " + arguments + " 2>&1";
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(command.c_str(), "r"), pclose);
  REQUIRE(pipe);
  std::string output;
  char buffer[4096];
  while (size_t n = fread(buffer, 1, sizeof buffer, pipe.get())) output.append(buffer, n);
  const int status = pclose(pipe.release());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
}

void write_idx_gz(const fs::path& path, const std::vector<uint32_t>& dims, const std::vector<uint8_t>& values) {
  std::vector<uint8_t> bytes{0, 0, 0x08, static_cast<uint8_t>(dims.size())};
  for (uint32_t d : dims)
    for (int shift : {24, 16, 8, 0}) bytes.push_back(static_cast<uint8_t>(d >> shift));
  bytes.insert(bytes.end(), values.begin(), values.end());
  gzFile f = gzopen(path.c_str(), "wb");
  REQUIRE(f);
  gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
  gzclose(f);
}

// A Fashion-MNIST-format dataset: `per_class` training and half as many test images per class, each
// class a bright square at its own place on a noisy background (learnable in one epoch).
fs::path make_dataset(const fs::path& dir, int train_per_class) {
  fs::create_directories(dir);
  uint32_t state = 12345;
  auto noise = [&] { return static_cast<uint8_t>((state = state * 1664525 + 1013904223) >> 27); };
  for (auto [prefix, per_class] : {std::pair<const char*, int>{"train", train_per_class}, {"t10k", train_per_class / 2}}) {
    std::vector<uint8_t> images, labels;
    for (int i = 0; i < 10 * per_class; ++i) {
      const int c = i % 10;
      labels.push_back(static_cast<uint8_t>(c));
      for (int y = 0; y < 28; ++y)
        for (int x = 0; x < 28; ++x) {
          const bool square = y / 7 == c / 4 && x / 7 == c % 4;
          images.push_back(square ? 255 : noise());
        }
    }
    const uint32_t n = static_cast<uint32_t>(labels.size());
    write_idx_gz(dir / (std::string(prefix) + "-images-idx3-ubyte.gz"), {n, 28, 28}, images);
    write_idx_gz(dir / (std::string(prefix) + "-labels-idx1-ubyte.gz"), {n}, labels);
  }
  return dir;
}

// mAP@ALL from ±1 codes and multi-hot labels, by the definition (method.md §6) and a stable sort.
double naive_map(const retrieval::NpyArray& q, const retrieval::NpyArray& d, const retrieval::NpyArray& ql,
                 const retrieval::NpyArray& dl) {
  const std::vector<int8_t> qc = q.int8_values(), dc = d.int8_values();
  const std::vector<uint8_t> qlab = ql.uint8_values(), dlab = dl.uint8_values();
  const int64_t nq = q.shape[0], nd = d.shape[0], bits = q.shape[1], k = ql.shape[1];
  double total = 0;
  for (int64_t i = 0; i < nq; ++i) {
    std::vector<int> distance(nd);
    for (int64_t j = 0; j < nd; ++j)
      for (int64_t b = 0; b < bits; ++b) distance[j] += qc[i * bits + b] != dc[j * bits + b];
    std::vector<int64_t> order(nd);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return distance[a] < distance[b]; });
    double relevant = 0, sum = 0;
    for (int64_t r = 0; r < nd; ++r) {
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
                                "--batch-size 1", "--pairs all", "--no-such-option"}) {
    CAPTURE(arguments);
    const Run r = run(arguments);
    CHECK(r.exit_code == 2);
    CHECK(!r.output.empty());
  }
  CHECK(run("--bits 12,x").output.find("'x' is not a whole number") != std::string::npos);
  const Run help = run("--help");
  CHECK(help.exit_code == 0);
  CHECK(help.output.find("--weight-decay") != std::string::npos);
}

TEST_CASE("a missing dataset exits 1 naming where it looked") {
  const fs::path dir = fs::temp_directory_path() / "mdff_no_such_dataset";
  const Run r = run("cifar10 --data-dir " + dir.string() + " --out " + (fs::temp_directory_path() / "mdff_run_x").string());
  CHECK(r.exit_code == 1);
  CHECK(r.output.find(dir.string()) != std::string::npos);
  CHECK(r.output.find("download_cifar10.sh") != std::string::npos);
}

TEST_CASE("a diverging run stops naming the step and the last good checkpoint; --config is read") {
  const fs::path root = fs::temp_directory_path() / ("mdff_train_diverge_" + std::to_string(::getpid()));
  const fs::path data = make_dataset(root / "data", 20);
  const std::string common = "fashion-mnist --data-dir " + data.string() +
                             " --model tiny --bits 8 --batch-size 16 --scales 1 --queries-per-class 5"
                             " --train-per-class 10 --monitor-every 0 ";
  const Run diverged = run(common + "--epochs 3 --optimizer sgd --lr 1e12 --out " + (root / "diverged").string());
  CHECK(diverged.exit_code == 1);
  CHECK(diverged.output.find("the loss became") != std::string::npos);
  CHECK(diverged.output.find("at epoch") != std::string::npos);
  CHECK(diverged.output.find("checkpoint") != std::string::npos);
  // options from a file; a bad value there is a usage error like on the command line
  std::ofstream(root / "good.toml") << "epochs = 1\nlr = 0.01\n";
  const Run configured = run(common + "--config " + (root / "good.toml").string() + " --out " + (root / "cfg").string());
  CHECK(configured.exit_code == 0);
  const auto config = nlohmann::json::parse(std::ifstream(root / "cfg" / "config.json"));
  CHECK(config["epochs"] == 1);
  CHECK(config["lr"] == 0.01);
  std::ofstream(root / "bad.toml") << "epochs = 0\n";
  CHECK(run(common + "--config " + (root / "bad.toml").string()).exit_code == 2);
  fs::remove_all(root);
}

TEST_CASE("a tiny end-to-end run writes every result, and its mAP is right") {
  const fs::path root = fs::temp_directory_path() / ("mdff_train_test_" + std::to_string(::getpid()));
  const fs::path data = make_dataset(root / "data", 20), out = root / "run";
  const Run r = run("fashion-mnist --data-dir " + data.string() + " --out " + out.string() +
                    " --model tiny --epochs 1 --bits 8,16 --batch-size 16 --scales 1 --queries-per-class 5"
                    " --train-per-class 10 --optimizer sgd --lr 0.01");
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
    CHECK(entry["map"].get<double>() == doctest::Approx(naive_map(q, d, ql, dl)).epsilon(1e-12));
    CHECK(entry["history"].size() == 1);
    CHECK(entry.contains("precision_hamming_2"));
  }
  const io::SafetensorsFile checkpoint = io::load_safetensors((out / "checkpoint_8bits.safetensors").string());
  CHECK(checkpoint.find("hash.weight") != nullptr);
  CHECK(checkpoint.find("backbone.layer1.0.bn1.running_mean") != nullptr);
  CHECK(r.output.find("mAP@ALL") != std::string::npos);
  fs::remove_all(root);
}

namespace {
// Every tensor of a checkpoint as its raw bytes, by name.
std::map<std::string, std::vector<uint8_t>> tensor_bytes(const fs::path& path) {
  std::map<std::string, std::vector<uint8_t>> tensors;
  for (const io::SafetensorsEntry& entry : io::load_safetensors(path.string()).entries) tensors[entry.name] = entry.bytes;
  return tensors;
}
}  // namespace

TEST_CASE("a run interrupted twice and resumed ends bit-identical to an uninterrupted one") {
  const fs::path root = fs::temp_directory_path() / ("mdff_train_resume_" + std::to_string(::getpid()));
  const fs::path data = make_dataset(root / "data", 20);
  // 100 training images in batches of 16: 6 steps an epoch. RMSProp, U (pairs = dataset), shifts and
  // flips: every piece of state that resuming must restore matters here.
  const std::string common = "fashion-mnist --data-dir " + data.string() +
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
  for (const auto& [name, bytes] : expected) {
    CAPTURE(name);
    REQUIRE(resumed.count(name) == 1);
    CHECK(resumed.at(name) == bytes);
  }
  const auto metrics_whole = nlohmann::json::parse(std::ifstream(root / "whole" / "metrics.json"));
  const auto metrics_parts = nlohmann::json::parse(std::ifstream(parts / "metrics.json"));
  CHECK(metrics_parts["code_lengths"]["8"]["map"] == metrics_whole["code_lengths"]["8"]["map"]);
  for (int epoch = 0; epoch < 3; ++epoch)
    for (const char* key : {"loss", "j1", "j2", "j3", "monitor_map"})
      CHECK(metrics_parts["code_lengths"]["8"]["history"][epoch][key] ==
            metrics_whole["code_lengths"]["8"]["history"][epoch][key]);

  // A resume that asks for other options is refused naming them; a new run cannot reuse a run's folder.
  const Run refused = run("--resume " + parts.string() + " --lr 0.5 --epochs 3");
  CHECK(refused.exit_code == 2);
  CHECK(refused.output.find("--lr 0.5 here, 0.001 in the run") != std::string::npos);
  CHECK(refused.output.find("--epochs") == std::string::npos);  // the same value is no difference
  const Run reused = run(common + "--out " + parts.string());
  CHECK(reused.exit_code == 2);
  CHECK(reused.output.find("--resume") != std::string::npos);
  CHECK(run("--resume " + (root / "nothing").string()).exit_code == 2);
  fs::remove_all(root);
}
