// train_mdff: trains MDFF-SH and evaluates its hash codes, end to end.
//
//   train_mdff                      the embedded default: Fashion-MNIST (Debian's dataset-fashion-mnist)
//   train_mdff cifar10              CIFAR-10 binary from --data-dir (scripts/download_cifar10.sh)
//   train_mdff LIST.txt --classes K an image list ("path l1 ... lK" per line; NUS-WIDE, MS-COCO), with
//                                   --resize 256 --crop 224 for DeepHash-pytorch's resize and crops
//   train_mdff --resume RUN_DIR     continues an interrupted run exactly where its checkpoint left it
//
// Everything goes into the run folder (--out): config.json, the split, a checkpoint per code length
// (model, optimizer state, U, counters and random state: written atomically after every epoch and on
// Ctrl-C), metrics.json, the codes as .npy, SVG plots and the paper's Figure 4 as PNG. `--help` explains
// each option; docs in README.md.
//
// Crash safety: a run holds its folder's lock (.lock) while it lives, so a second run there is refused;
// a run killed at any moment (SIGKILL, a power cut) leaves its last checkpoint whole, and --resume
// continues from it; a full disk is an error that names the file and keeps what was written. A loss, a
// gradient, a parameter or an output that stops being finite, or codes that are all the same, stop the
// run with what happened, where, and the last good checkpoint.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <map>
#include <optional>

#include "apps/cli.h"
#include "apps/progress.h"
#include "apps/train_options.h"
#include "core/backend.h"
#include "core/error.h"
#include "core/file_io.h"
#include "core/safetensors.h"
#include "data/protocol.h"
#include "models/checkpoint.h"
#include "models/pretrained.h"
#include "optim/trainer.h"
#include "retrieval/encode.h"
#include "retrieval/grid.h"
#include "retrieval/metrics.h"
#include "retrieval/npy.h"
#include "retrieval/plots.h"

using namespace mdff;
using train::Options;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

// The dataset, which plan_from has checked exists (a built-in name, or an image list with --classes). A run
// started before config.json recorded the data folder has an empty --data-dir: the default's.
data::Dataset load_dataset(const Options& o) {
  const std::string data_dir = o.data_dir.empty() ? train::default_data_dir(o.dataset) : o.data_dir;
  if (o.dataset == "fashion-mnist") return data::load_fashion_mnist(data_dir);
  if (o.dataset == "cifar10") return data::load_cifar10(data_dir);
  return data::load_image_list(o.dataset, o.list_root.empty() ? fs::path(o.dataset).parent_path().string() : o.list_root,
                               o.classes);
}

std::vector<uint8_t> labels_of(const data::Dataset& d, const std::vector<int64_t>& rows) {
  std::vector<uint8_t> out;
  out.reserve(rows.size() * d.classes);
  for (int64_t r : rows) out.insert(out.end(), d.label_row(r), d.label_row(r) + d.classes);
  return out;
}

// A dataset image as RGB for the retrieval grid (in-memory datasets: stored CHW uint8).
retrieval::Image image_of(const data::Dataset& d, int64_t row) {
  retrieval::Image image;
  if (!d.in_memory()) {
    const data::Image decoded = data::decode_image(d.image_paths[row]);
    return {decoded.height, decoded.width, decoded.pixels};
  }
  image.height = d.height;
  image.width = d.width;
  image.rgb.resize(static_cast<size_t>(d.height) * d.width * 3);
  const uint8_t* chw = d.image(row);
  const int64_t plane = int64_t{d.height} * d.width;
  for (int64_t p = 0; p < plane; ++p)
    for (int c = 0; c < 3; ++c) image.rgb[p * 3 + c] = chw[(d.channels == 3 ? c : 0) * plane + p];
  return image;
}

// Figure 4: 10 queries (one per class where single-label) and their top 20 results.
void write_figure4(const std::string& path, const data::Dataset& d, const data::Split& split,
                   const retrieval::PackedCodes& queries, const retrieval::PackedCodes& database) {
  std::vector<int64_t> chosen;
  std::vector<bool> class_used(d.classes, false);
  for (size_t q = 0; q < split.query.size() && chosen.size() < 10; ++q) {
    int first_label = 0;
    while (first_label < d.classes && !d.label_row(split.query[q])[first_label]) ++first_label;
    if (d.multi_label || !class_used[first_label]) {
      chosen.push_back(static_cast<int64_t>(q));
      if (!d.multi_label) class_used[first_label] = true;
    }
  }
  std::vector<retrieval::GridRow> rows;
  for (int64_t q : chosen) {
    retrieval::GridRow row;
    row.query = image_of(d, split.query[q]);
    for (int32_t r : retrieval::rank(database, queries, q, 20)) {
      const int64_t row_in_dataset = split.database[r];
      row.results.push_back(image_of(d, row_in_dataset));
      bool shared = false;
      for (int k = 0; k < d.classes; ++k) shared |= d.label_row(split.query[q])[k] && d.label_row(row_in_dataset)[k];
      row.relevant.push_back(shared);
    }
    rows.push_back(std::move(row));
  }
  retrieval::write_retrieval_grid_png(path, rows);
}

json metrics_json(const retrieval::RetrievalMetrics& m) {
  return {{"map", m.map},
          {"map_at", m.map_at},
          {"precision_at_n", {{"n", m.pn_at}, {"precision", m.precision_at_n}}},
          {"precision_recall_by_radius", {{"precision", m.pr_precision}, {"recall", m.pr_recall}}},
          {"precision_hamming_2", m.precision_h2},
          {"empty_share_hamming_2", m.empty_share_h2}};
}

double precision_at(const retrieval::RetrievalMetrics& m, int n) {
  for (size_t i = 0; i < m.pn_at.size(); ++i)
    if (m.pn_at[i] == n) return m.precision_at_n[i];
  return std::nan("");
}

// The paper's CIFAR-10 mAP for the run's code length and variant on the paper's protocol (method.md §7): the full
// model (Table 2), --taps fc1 or convs (Table 4), or γ = 0 or β = 0 (Table 5). NaN where the paper has no such
// row (another dataset, protocol or backbone, or a variant it did not run).
double paper_map(const Options& o, int bits) {
  using Row = std::array<double, 4>;  // 12, 24, 32, 48 bits
  static const std::map<std::string, Row> cifar{{"all", {0.811, 0.854, 0.874, 0.880}},
                                                {"fc1", {0.710, 0.761, 0.775, 0.788}},
                                                {"convs", {0.580, 0.595, 0.639, 0.688}},
                                                {"gamma0", {0.667, 0.812, 0.830, 0.852}},
                                                {"beta0", {0.656, 0.742, 0.785, 0.796}}};
  static const std::map<int, size_t> column{{12, 0}, {24, 1}, {32, 2}, {48, 3}};
  if (o.dataset != "cifar10" || o.protocol != "paper" || o.model != "resnet50" || !column.count(bits))
    return std::nan("");
  if (o.gamma == 0 && o.beta == 0) return std::nan("");
  const std::string variant = o.gamma == 0 ? "gamma0" : o.beta == 0 ? "beta0" : o.taps;
  if (variant != o.taps && o.taps != "all") return std::nan("");  // two ablations at once
  return cifar.at(variant)[column.at(bits)];
}

std::string timestamp() {
  char text[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(text, sizeof text, "%Y%m%d-%H%M%S", std::localtime(&now));
  return text;
}

// The checkpoint of the `bits`-bit model in the run folder `out`.
fs::path checkpoint_path(const fs::path& out, int bits) {
  return out / ("checkpoint_" + std::to_string(bits) + "bits.safetensors");
}

// What the (resolved) options ask for.
struct Plan {
  TrainSettings settings;
  std::vector<int> bits;
  std::vector<double> scales;
  Device device = Device::CPU;
};

Plan plan_from(const Options& o) {
  Plan plan;
  TrainSettings& settings = plan.settings;
  settings.epochs = o.epochs;
  settings.batch_size = o.batch_size;
  settings.optimizer = o.optimizer;
  settings.lr = o.lr;
  settings.schedule = o.schedule;
  settings.warmup_epochs = o.warmup;
  MDFF_CHECK(o.warmup <= o.epochs, "--warmup ", o.warmup, " is longer than the ", o.epochs, " epochs of training");
  settings.weight_decay = o.weight_decay;
  settings.loss = {parse_pairs(o.pairs), o.beta, o.gamma};
  // --interrupt-after-steps counts progress reports: one a step then, on the GPU too (20 steps apart otherwise).
  if (o.interrupt_after_steps > 0) settings.readout_every = 1;
  settings.batch.image_size = o.image_size;
  settings.batch.flip = !o.no_flip;
  settings.batch.shift = o.shift;
  MDFF_CHECK(o.shift < o.image_size, "--shift ", o.shift, " must be smaller than the image size ", o.image_size);
  settings.batch.crop_mode = o.crop > 0;
  settings.batch.resize = o.resize;
  settings.batch.crop = o.crop;
  MDFF_CHECK((o.resize > 0) == (o.crop > 0), "--resize and --crop go together (crop mode: the shorter side resized "
             "to --resize, then a --crop square cut out): give both or neither");
  MDFF_CHECK(o.crop <= o.resize, "--crop ", o.crop, " is larger than --resize ", o.resize,
             ": the crop is cut from the image resized to --resize");
  MDFF_CHECK(o.crop == 0 || o.shift == 0, "--shift translates --image-size images; crop mode (--resize, --crop) "
             "takes random crops instead: leave --shift out");
  settings.seed = o.seed;
  plan.bits = cli::parse_list<int>(o.bits, "--bits");
  for (size_t i = 0; i < plan.bits.size(); ++i) {
    MDFF_CHECK(plan.bits[i] >= 4 && plan.bits[i] <= 1024, "--bits: ", plan.bits[i], " is outside 4..1024");
    MDFF_CHECK(std::find(plan.bits.begin(), plan.bits.begin() + i, plan.bits[i]) == plan.bits.begin() + i,
               "--bits: ", plan.bits[i], " is given twice (each code length trains one model, into one folder)");
  }
  // Each kind of dataset has its split's sizes: a size of the other kind was silently ignored.
  const bool image_list = o.dataset != "fashion-mnist" && o.dataset != "cifar10";
  MDFF_CHECK(!image_list || !o.per_class_sizes_given, "--queries-per-class and --train-per-class size the split of "
             "fashion-mnist and cifar10 (single-label); an image list's split takes --queries and --train-images");
  MDFF_CHECK(image_list || !o.total_sizes_given, "--queries and --train-images size the split of an image list "
             "(multi-label); ", o.dataset, "'s takes --queries-per-class and --train-per-class");
  if (image_list) {
    MDFF_CHECK(!o.resume.empty() || fs::exists(o.dataset), "DATASET: no file ", o.dataset, ": give fashion-mnist, "
               "cifar10, or the path of an image list (with --classes)");
    std::error_code no_folder;
    MDFF_CHECK(fs::exists(o.dataset), "--resume: the run's image list ", o.dataset, " (its config.json's \"dataset\") "
               "is not there from ", fs::current_path(no_folder).string(), ": run train_mdff from the folder the "
               "run started in (a relative path is taken from there), or put the list back");
    MDFF_CHECK(fs::is_regular_file(o.dataset), "DATASET: ", o.dataset, " is not a file: give the path of an image "
               "list (lines of an image path and its labels, with --classes), fashion-mnist or cifar10");
    MDFF_CHECK(o.classes > 0, "an image list needs --classes K (the number of labels per line)");
  }
  plan.scales = cli::parse_list<double>(o.scales, "--scales");
  for (double s : plan.scales) MDFF_CHECK(s > 0 && s <= 4, "--scales: ", s, " is outside (0, 4]");
  // A resumed run reads the weights only for the code lengths that have no checkpoint yet.
  const auto unstarted = std::find_if(plan.bits.begin(), plan.bits.end(), [&](int bits) {
    return o.resume.empty() || !fs::exists(checkpoint_path(o.resume, bits));
  });
  const bool needs_pretrained = !o.pretrained.empty() && unstarted != plan.bits.end();
  MDFF_CHECK(!needs_pretrained || !fs::is_directory(o.pretrained), "--pretrained: ", o.pretrained, " is a folder: "
             "give the weights file in it (scripts/download_resnet50.sh writes data/resnet50.tv_in1k.safetensors)");
  MDFF_CHECK(!needs_pretrained || fs::is_regular_file(o.pretrained), "--pretrained: no file ", o.pretrained,
             " (scripts/download_resnet50.sh fetches torchvision's ImageNet weights)",
             o.resume.empty() ? "" : detail::concat("; the run's ", *unstarted, "-bit model has not started, and "
                                                    "starts from them: put the file back"));
  MDFF_CHECK(!needs_pretrained || o.model == "resnet50", "--pretrained holds ResNet50 weights: use --model resnet50");
  std::string why_no_gpu;
  MDFF_CHECK(!o.device_of_run || o.device != "cuda" || cuda_available(&why_no_gpu), "--resume: the run trained on "
             "the GPU, and here there is none (", why_no_gpu, "): give --device cpu to continue it on the CPU");
  plan.device = cli::choose_device(o.device);
  set_tf32_allowed(o.precision == "tf32");
  return plan;
}

// The learning curve's database sample: 2,000 images (with the 1,000 queries, 3,000 images to encode
// per point, where 5,000 took 14% of the main job's time; the curve keeps its trend, with more noise).
constexpr size_t kMonitorImages = 2000;
// Multi-label data is ranked by mAP@5000 (the paper's NUS-WIDE and MS-COCO protocol).
constexpr int64_t kMultiLabelMapAt = 5000;

// Ctrl-C (SIGINT) and SIGTERM ask training to stop after the current step; the run then writes its
// checkpoint and exits with 130. A second signal exits at once: every file is written atomically, so the
// previous checkpoint is intact.
std::atomic<bool> stop_requested{false};
extern "C" void request_stop(int) {
  if (stop_requested.exchange(true)) std::_Exit(130);
}

struct Interrupted {
  std::string checkpoint;  // the checkpoint to resume from
};

// A new run needs a folder without a run in it.
void check_new_folder(const fs::path& out) {
  MDFF_CHECK(!fs::exists(out) || fs::is_directory(out), "--out: ", out.string(), " is a file, not a folder; choose "
             "a folder (it is made if it does not exist)");
  MDFF_CHECK(!fs::exists(out / "config.json"), "--out: ", out.string(), " already holds a run; continue it with "
             "--resume ", out.string(), ", or choose another folder");
}

// Everything a code length's training and evaluation share.
struct Run {
  const Options& options;
  const Plan& plan;
  fs::path out;
  const data::Dataset& dataset;
  const data::Split& split;
  json config;
  // The newest checkpoint of the code length in training and what it holds, for messages; empty before
  // its first.
  std::string& last_checkpoint;
  int64_t map_at;  // -1: mAP@ALL
  std::vector<int> pn_at;
  std::vector<uint8_t> query_labels, database_labels;
  std::vector<int64_t> monitor_rows;  // the learning curve's database sample
  std::vector<uint8_t> monitor_labels;
};

// The signs of `u`, the continuous codes of `what` ("the queries"), or an error when the model's
// outputs are not finite: its weights diverged, although every loss, gradient and parameter of the
// training steps stayed finite (the outputs of evaluation mode overflow first).
retrieval::PackedCodes codes_from(const Tensor& u, const std::string& what, const Run& run) {
  if (const std::optional<NonFinite> bad = first_non_finite({{what, u}}))
    throw TrainingDiverged(detail::concat(
        "the model's output for ", what, " is ", bad->value, " (image ", bad->index / u.size(1) + 1, " of ", u.size(0),
        "): its weights diverged in training (--lr ", run.options.lr, "); lower --lr and start a new run"));
  return retrieval::pack_codes(u);
}

// Codes that are all the same rank nothing: the model collapsed, as a learning rate far too high makes
// it do (on the tiny model, SGD from lr 10 and RMSProp from lr 0.1 give one code to every image while
// the loss grows 10 to 10^5 times; every rate that learns gives 6 or more). Fails with that, unless the
// database has a single image or the dataset a single class.
void check_not_collapsed(const retrieval::PackedCodes& database, int bits, const json& history, const Run& run) {
  bool same = database.count >= 2 && run.dataset.classes >= 2;
  for (int64_t i = 1; same && i < database.count; ++i)
    same = std::equal(database.code(i), database.code(i) + database.words, database.code(0));
  if (!same) return;
  std::string losses;
  if (!history.empty())
    losses = detail::concat(", the loss went from ", history.front().at("loss").get<double>(), " in epoch 1 to ",
                            history.back().at("loss").get<double>(), " in epoch ", history.size());
  throw TrainingDiverged(detail::concat(
      "every one of the ", database.count, " database images has the same ", bits, "-bit code: the model collapsed, "
      "and its codes cannot rank anything. A learning rate far too high does this (with --lr ", run.options.lr, losses,
      "): lower --lr, or raise --gamma, and start a new run"));
}

void save_checkpoint(const std::string& path, const MdffSh& model, const Trainer& trainer, const Run& run, int bits,
                     const json& history) {
  NamedTensors state = model_state(model);
  std::map<std::string, std::string> metadata{{"config", run.config.dump()},
                                              {"bits", std::to_string(bits)},
                                              {"epoch", std::to_string(trainer.epochs_done())},
                                              {"history", history.dump()}};
  trainer.save_state(state, metadata);
  io::save_safetensors(path, state, metadata);
}

// Trains the model for `bits` (continuing from its checkpoint when resuming), then returns its
// continuous codes' signs for the queries and the database. Fills `history` (one entry per epoch).
std::pair<retrieval::PackedCodes, retrieval::PackedCodes> train_and_encode(Run& run, int bits, json& history) {
  const Options& o = run.options;
  const TrainSettings& settings = run.plan.settings;
  MdffConfig model_config = mdff_config(o.model, bits, run.dataset.classes, o.taps, run.plan.scales);
  model_config.backbone.zero_init_residual = o.zero_init_residual == 1;
  Rng rng(o.seed);
  MdffSh model(model_config, rng);
  const std::string checkpoint = checkpoint_path(run.out, bits).string();
  const bool resuming = !o.resume.empty() && fs::exists(checkpoint);
  if (!o.pretrained.empty() && !resuming) {
    const PretrainedReport report = load_pretrained_backbone(model.backbone(), o.pretrained);
    std::printf("%d bits: ImageNet weights, %s\n", bits, report.summary().c_str());
  }
  model.to(run.plan.device);
  Trainer trainer(model, run.dataset, run.split.train, settings);
  run.last_checkpoint.clear();
  auto save = [&] {
    save_checkpoint(checkpoint, model, trainer, run, bits, history);
    run.last_checkpoint = detail::concat(checkpoint, " (", trainer.progress(), ")");
  };
  if (resuming) {
    const io::SafetensorsFile file = io::load_safetensors(checkpoint);
    load_model_state(model, file, checkpoint);
    trainer.restore_state(file);
    const auto found = file.metadata.find("history");
    history = found == file.metadata.end() ? json::array() : json::parse(found->second, nullptr, false);
    MDFF_CHECK(history.is_array(), checkpoint, ": the learning history (metadata 'history') is damaged");
    run.last_checkpoint = detail::concat(checkpoint, " (", trainer.progress(), ")");
    std::printf("%d bits: resuming from %s\n", bits, run.last_checkpoint.c_str());
  }

  const fs::path codes_dir = run.out / "codes" / std::to_string(bits);
  const bool encoded = resuming && trainer.epochs_done() == settings.epochs && fs::exists(codes_dir / "query.npy") &&
                       fs::exists(codes_dir / "database.npy");
  int64_t steps = 0;
  // A divergence in training (in a step, or in the learning curve's codes) names the last good checkpoint.
  try {
    while (trainer.epochs_done() < settings.epochs) {
      const int epoch = trainer.epochs_done() + 1;
      cli::Progress progress(detail::concat(bits, " bits, epoch ", epoch, "/", settings.epochs));
      Backend& device = backend(run.plan.device);
      device.reset_peak_memory();
      const EpochReport report = trainer.train_epoch(
          [&](int64_t done, int64_t total, double loss, double ips) {
            char figures[96];
            std::snprintf(figures, sizeof figures, "loss %.4f  %.0f img/s", loss, ips);
            progress.update(done, total, figures);
            if (++steps == o.interrupt_after_steps) std::raise(SIGINT);  // the tests' Ctrl-C
          },
          &stop_requested);
      if (!report.complete) {
        save();
        throw Interrupted{checkpoint};
      }
      json entry{{"epoch", epoch}, {"loss", report.loss}, {"j1", report.j1}, {"j2", report.j2}, {"j3", report.j3},
                 {"lr", report.lr}, {"seconds", report.seconds}, {"images_per_second", report.images_per_second}};
      // The allocator's peak of bytes held by tensors over the epoch; on the GPU also what it held from the
      // driver, in use or cached (the CPU caches nothing).
      const MemoryStats stats = device.memory_stats();
      const double peak_mib = static_cast<double>(stats.peak_bytes_in_use) / (1 << 20);
      entry["peak_tensor_mib"] = peak_mib;
      std::string memory = detail::concat(", peak tensor memory ", std::fixed, std::setprecision(0), peak_mib, " MiB");
      if (run.plan.device == Device::CUDA) {
        const double reserved_mib = static_cast<double>(stats.peak_bytes_reserved) / (1 << 20);
        entry["peak_gpu_reserved_mib"] = reserved_mib;
        memory += detail::concat(" (", std::fixed, std::setprecision(0), reserved_mib, " MiB reserved on the GPU)");
      }
      std::string curve;
      if (o.monitor_every > 0 && (epoch % o.monitor_every == 0 || epoch == settings.epochs)) {
        const auto q = codes_from(retrieval::encode(model, run.dataset, run.split.query, settings.batch, 256),
                                  "the queries", run);
        const auto d = codes_from(retrieval::encode(model, run.dataset, run.monitor_rows, settings.batch, 256),
                                  "the learning curve's database sample", run);
        // Only the mAP is kept: P@1 is asked for because it fits any database sample. mAP@K (multi-label)
        // becomes mAP@ALL when the sample is smaller than K.
        const int64_t sample = static_cast<int64_t>(run.monitor_rows.size());
        const int64_t map_at = run.map_at > 0 && run.map_at < sample ? run.map_at : -1;
        const double m =
            retrieval::evaluate(q, run.query_labels, d, run.monitor_labels, run.dataset.classes, map_at, {1}).map;
        entry["monitor_map"] = m;
        curve = detail::concat(", mAP against ", run.monitor_rows.size(), " database images ", std::fixed,
                               std::setprecision(4), m);
      }
      std::printf("  epoch %d: loss %.4f (J1 %.4f, J2 %.4f, J3 %.4f)%s%s\n", epoch, report.loss, report.j1, report.j2,
                  report.j3, memory.c_str(), curve.c_str());
      history.push_back(entry);
      save();
    }
  } catch (const TrainingDiverged& e) {
    throw TrainingDiverged(detail::concat(e.what(), ". The last good checkpoint is ",
                                          run.last_checkpoint.empty()
                                              ? "none: the " + std::to_string(bits) + "-bit model had none yet"
                                              : run.last_checkpoint));
  }

  if (encoded) {
    auto read_codes = [&](const char* name) {
      const retrieval::NpyArray array = retrieval::read_npy((codes_dir / name).string());
      const std::vector<int8_t> signs = array.int8_values();
      MDFF_CHECK(array.shape.size() == 2 && array.shape[1] == bits, (codes_dir / name).string(), " holds codes of shape ",
                 shape_str(array.shape), ", expected (n, ", bits, ")");
      return retrieval::pack_codes(Tensor::from_vector(std::vector<float>(signs.begin(), signs.end()), array.shape));
    };
    return {read_codes("query.npy"), read_codes("database.npy")};
  }
  // One bar over both: the queries, then the database.
  const auto queries = static_cast<int64_t>(run.split.query.size());
  const int64_t images = queries + static_cast<int64_t>(run.split.database.size());
  cli::Progress encoding(detail::concat(bits, " bits, encoding the queries and the database"));
  auto check_stop_after = [&](int64_t images_before) {
    return [&, images_before](int64_t done, int64_t) {
      if (stop_requested) throw Interrupted{checkpoint};
      encoding.update(images_before + done, images, "images");
    };
  };
  const Tensor uq = retrieval::encode(model, run.dataset, run.split.query, settings.batch, 256, check_stop_after(0));
  const Tensor ud =
      retrieval::encode(model, run.dataset, run.split.database, settings.batch, 256, check_stop_after(queries));
  std::pair<retrieval::PackedCodes, retrieval::PackedCodes> codes{codes_from(uq, "the queries", run),
                                                                  codes_from(ud, "the database", run)};
  check_not_collapsed(codes.second, bits, history, run);
  return codes;
}

}  // namespace

int main(int argc, char** argv) {
  // Line by line into a log file too, so that a line printed before an error message (stderr) comes first.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  Options o;
  CLI::App app{"Trains MDFF-SH (multiscale deep feature fusion hashing) and evaluates its hash codes.\n"
               "With no DATASET it trains on Fashion-MNIST, which Debian's dataset-fashion-mnist installs."};
  train::add_options(app, o);
  if (auto exit_code = cli::parse(app, argc, argv)) return *exit_code;
  using train::given_on_command_line;
  o.per_class_sizes_given =
      given_on_command_line(app, "--queries-per-class") || given_on_command_line(app, "--train-per-class");
  o.total_sizes_given = given_on_command_line(app, "--queries") || given_on_command_line(app, "--train-images");

  // Option values CLI11 cannot check alone: an error here is a usage error (exit 2), like CLI11's own.
  Plan plan;
  try {
    if (!o.resume.empty()) {
      o = train::resumed_options(o, app);
    } else {
      train::resolve_defaults(o);
      if (!o.out.empty()) check_new_folder(o.out);
    }
    plan = plan_from(o);
  } catch (const Error& e) {
    std::fprintf(stderr, "train_mdff: %s\nRun with --help for more information.\n", e.reason());
    return 2;
  } catch (const fs::filesystem_error& e) {  // a path given that the system cannot even look up (too long, ...)
    std::fprintf(stderr, "train_mdff: %s: %s\nRun with --help for more information.\n", e.path1().c_str(),
                 e.code().message().c_str());
    return 2;
  }
  std::signal(SIGINT, request_stop);
  std::signal(SIGTERM, request_stop);
  std::signal(SIGXFSZ, SIG_IGN);  // past a file-size limit (ulimit -f), a write fails with EFBIG: a clear error

  fs::path out;
  std::string last_checkpoint;
  std::optional<io::FolderLock> lock;
  std::vector<fs::path> made_folders;  // the folders this process made for the run, outermost first
  // A run that fails before its config.json (a dataset that does not load, ...) takes back what it wrote: its
  // split, and the folders it made (removed only when empty: a folder where anything else has appeared since
  // stays), with the lock file in them; no empty runs/DATASET-TIME after each mistake. Only while this
  // process holds the lock, and its own files only; a folder that was there keeps its lock file (removing
  // it could let a run about to lock it hold a file no one else can find).
  bool split_was_there = true;  // a split/ (or anything by that name) in the run's folder before this run
  auto remove_unstarted_folder = [&] {
    if (!lock || fs::exists(out / "config.json")) return;
    if (!split_was_there) data::remove_split((out / "split").string());
    std::error_code ignored;
    const bool made_out = std::any_of(made_folders.begin(), made_folders.end(),
                                      [&](const fs::path& folder) { return fs::equivalent(folder, out, ignored); });
    if (made_out) fs::remove(out / ".lock", ignored);
    lock.reset();
    for (auto folder = made_folders.rbegin(); folder != made_folders.rend(); ++folder) fs::remove(*folder, ignored);
  };
  try {
    const std::string dataset_name = fs::path(o.dataset).stem().string();
    out = o.out.empty() ? fs::path("runs") / (dataset_name + "-" + timestamp()) : fs::path(o.out);
    fs::path partial;
    for (const fs::path& part : out) {
      std::error_code error;
      if (fs::create_directory(partial /= part, error)) made_folders.push_back(partial);
      MDFF_CHECK(!error, "cannot make the run's folder ", out.string(), ": ", partial.string(),
                 fs::is_regular_file(partial) ? " is a file, not a folder" : ": " + error.message());
    }
    lock.emplace(out.string());  // held until the process ends: a second run here is refused
    if (o.resume.empty()) check_new_folder(out);  // again under the lock: another run may have just started here
    split_was_there = fs::exists(fs::symlink_status(out / "split"));
    for (const std::string& file : io::remove_stale_temporaries(out.string()))
      std::printf("train_mdff: removed %s, left by a run killed while writing it\n", file.c_str());
    std::printf("train_mdff: %s on %s%s; results in %s\n", dataset_name.c_str(), device_name(plan.device),
                plan.device == Device::CUDA ? (" (" + o.precision + ")").c_str() : "", out.c_str());

    const data::Dataset dataset = load_dataset(o);
    o.classes = dataset.classes;
    const data::Split split = data::make_split(dataset, o.protocol, o.seed, o.split);
    data::write_split((out / "split").string(), split);
    std::printf("%s: %lld images, %d classes; %zu queries, %zu training, %zu database (protocol %s, seed %llu)\n",
                dataset.name.c_str(), static_cast<long long>(dataset.size()), dataset.classes, split.query.size(),
                split.train.size(), split.database.size(), o.protocol.c_str(), static_cast<unsigned long long>(o.seed));

    json config = train::options_json(o);
    config["device"] = device_name(plan.device);  // where the run trains now: a resume with --device moves it
    config["precision"] = o.precision;  // on the CPU too (which computes in FP32), for a resume on the GPU
    config["out"] = out.string();
    io::write_file_atomic((out / "config.json").string(), config.dump(2) + "\n");

    // The learning curve's database: a fixed sample of kMonitorImages (encoding all of it every epoch
    // would cost more than the training on a CPU).
    std::vector<int64_t> monitor_rows = split.database;
    Rng monitor_rng(o.seed + 1);
    for (size_t i = monitor_rows.size(); i > 1; --i) std::swap(monitor_rows[i - 1], monitor_rows[monitor_rng.below(i)]);
    monitor_rows.resize(std::min<size_t>(monitor_rows.size(), kMonitorImages));
    const auto database_size = static_cast<int64_t>(split.database.size());
    Run run{o,
            plan,
            out,
            dataset,
            split,
            config,
            last_checkpoint,
            // mAP@5000 for multi-label data (mAP@ALL when the database is smaller), mAP@ALL otherwise.
            dataset.multi_label ? std::min(kMultiLabelMapAt, database_size) : -1,
            retrieval::default_pn_at(database_size),
            labels_of(dataset, split.query),
            labels_of(dataset, split.database),
            monitor_rows,
            labels_of(dataset, monitor_rows)};

    json results = json::object();
    struct TableRow {
      int bits;
      double map, precision_h2, precision_1000;
    };
    std::vector<TableRow> table;
    std::vector<retrieval::PlotSeries> pr_series, pn_series;
    retrieval::PlotSeries ph2_series{"P@H<=2", {}, {}};
    for (int b : plan.bits) {
      json history = json::array();
      const auto [queries, database] = train_and_encode(run, b, history);
      const retrieval::RetrievalMetrics m = retrieval::evaluate(queries, run.query_labels, database,
                                                                run.database_labels, dataset.classes, run.map_at, run.pn_at);

      const fs::path codes_dir = out / "codes" / std::to_string(b);
      fs::create_directories(codes_dir);
      retrieval::write_npy_codes((codes_dir / "query.npy").string(), queries);
      retrieval::write_npy_codes((codes_dir / "database.npy").string(), database);
      const int64_t nq = static_cast<int64_t>(split.query.size()), nd = static_cast<int64_t>(split.database.size());
      retrieval::write_npy((codes_dir / "query_labels.npy").string(), run.query_labels, {nq, dataset.classes});
      retrieval::write_npy((codes_dir / "database_labels.npy").string(), run.database_labels, {nd, dataset.classes});
      write_figure4((out / ("figure4_" + std::to_string(b) + "bits.png")).string(), dataset, split, queries, database);

      table.push_back({b, m.map, m.precision_h2, precision_at(m, 1000)});
      json entry = metrics_json(m);
      double train_seconds = 0, train_images = 0;
      for (const json& epoch : history) {
        train_seconds += epoch.at("seconds").get<double>();
        train_images += epoch.at("seconds").get<double>() * epoch.at("images_per_second").get<double>();
      }
      entry["train_seconds"] = train_seconds;
      entry["train_images_per_second"] = train_seconds > 0 ? train_images / train_seconds : 0;
      entry["history"] = history;
      results[std::to_string(b)] = entry;
      io::write_file_atomic((out / "metrics.json").string(),
                        json{{"dataset", dataset.name}, {"code_lengths", results}}.dump(2) + "\n");

      pr_series.push_back({std::to_string(b) + " bits", m.pr_recall, m.pr_precision});
      pn_series.push_back({std::to_string(b) + " bits", std::vector<double>(m.pn_at.begin(), m.pn_at.end()),
                           m.precision_at_n});
      ph2_series.xs.push_back(b);
      ph2_series.ys.push_back(m.precision_h2);
    }
    retrieval::write_line_plot_svg((out / "pr_curves.svg").string(), "Precision-recall by Hamming radius", "recall",
                                   "precision", pr_series);
    retrieval::write_line_plot_svg((out / "precision_at_n.svg").string(), "Precision of the top N", "N", "precision",
                                   pn_series);
    retrieval::write_line_plot_svg((out / "precision_hamming2.svg").string(), "Precision within Hamming radius 2",
                                   "code length (bits)", "P@H<=2", {ph2_series});

    std::printf("\n%-6s %8s %10s %10s %12s\n", "bits", "mAP", "P@H<=2", "P@1000", "paper mAP");
    for (const TableRow& row : table) {
      const double paper = paper_map(o, row.bits);
      std::printf("%-6d %8.4f %10.4f %10s %12s\n", row.bits, row.map, row.precision_h2,
                  std::isnan(row.precision_1000) ? "-" : detail::concat(std::fixed, std::setprecision(4),
                                                                       row.precision_1000).c_str(),
                  std::isnan(paper) ? "-" : detail::concat(paper).c_str());
    }
    const std::string which = run.map_at < 0 ? "mAP@ALL"
                              : run.map_at < kMultiLabelMapAt
                                  ? detail::concat("mAP@", kMultiLabelMapAt, ", here mAP@ALL: the database has ",
                                                   run.map_at, " images")
                                  : detail::concat("mAP@", kMultiLabelMapAt);
    std::printf("mAP is %s; results in %s\n", which.c_str(), out.c_str());
  } catch (const Interrupted& i) {
    std::fprintf(stderr, "\ntrain_mdff: interrupted; the checkpoint %s holds the run so far. Continue it with:\n"
                 "  train_mdff --resume %s\n", i.checkpoint.c_str(), out.c_str());
    return 130;
  } catch (const OutOfMemory& e) {  // on the GPU: what was being trained says what to make smaller
    const TrainSettings& s = plan.settings;
    const int side = s.batch.crop_mode ? s.batch.crop : s.batch.image_size;
    std::fprintf(stderr, "train_mdff: error: %s, training %s at batch size %lld on %d x %d images (scales %s)%s. "
                 "Start a new run with a smaller --batch-size (or --image-size)\n", e.what(), o.model.c_str(),
                 static_cast<long long>(s.batch_size), side, side, o.scales.c_str(),
                 last_checkpoint.empty() ? "" : ("; the last checkpoint is " + last_checkpoint).c_str());
    return 1;
  } catch (const io::WriteError& e) {  // a full disk, a file-size limit, ...
    const bool started = fs::exists(out / "config.json");
    std::fprintf(stderr, "train_mdff: error: %s\nEvery file written before is intact (each is written whole or not "
                 "at all)%s. Free some space (or raise the file-size limit), then %s\n", e.what(),
                 last_checkpoint.empty() ? "" : ("; the last checkpoint is " + last_checkpoint).c_str(),
                 started ? ("continue the run with: train_mdff --resume " + out.string()).c_str()
                         : "run the same command again");
    remove_unstarted_folder();
    return 1;
  } catch (const std::exception& e) {  // mdff::Error, and the file system's errors (a folder it cannot create)
    std::fprintf(stderr, "train_mdff: error: %s\n", e.what());
    remove_unstarted_folder();
    return 1;
  }
  return 0;
}
