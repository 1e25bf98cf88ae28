// train_mdff: trains MDFF-SH and evaluates its hash codes, end to end.
//
//   train_mdff                      the embedded default: Fashion-MNIST (Debian's dataset-fashion-mnist)
//   train_mdff cifar10              CIFAR-10 binary from --data-dir (scripts/download_cifar10.sh)
//   train_mdff LIST.txt --classes K an image list ("path l1 ... lK" per line; NUS-WIDE, MS-COCO)
//
// Everything goes into the run folder (--out): config.json, the split, a checkpoint per code length,
// metrics.json, the codes as .npy, SVG plots and the paper's Figure 4 as PNG. `--help` explains each
// option; docs in README.md.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>

#include "apps/cli.h"
#include "apps/progress.h"
#include "core/backend.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "data/protocol.h"
#include "optim/trainer.h"
#include "retrieval/encode.h"
#include "retrieval/grid.h"
#include "retrieval/metrics.h"
#include "retrieval/npy.h"
#include "retrieval/plots.h"

using namespace mdff;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

struct Options {
  std::string dataset = "fashion-mnist", data_dir, list_root, out, pretrained, recipe;
  std::string bits = "", taps = "all", scales = "1,0.5", pairs, protocol = "paper";
  std::string optimizer, schedule, device = "auto", model = "resnet50";
  data::SplitSizes split;
  int classes = 0, epochs = 0, image_size = 0, monitor_every = 1;
  int64_t batch_size = 32;
  double lr = 0, weight_decay = -1, beta = 0.1, gamma = -1;
  uint64_t seed = 0;
  bool no_flip = false;
};

// A recipe's defaults; options given on the command line win.
struct Recipe {
  std::string optimizer, schedule, pairs;
  double lr, gamma, weight_decay;
  int epochs, image_size;
};

Recipe recipe_named(const std::string& name) {
  // paper: the paper's recipe, tuned for an ImageNet-pretrained backbone (method.md §4).
  if (name == "paper") return {"rmsprop", "constant", "dataset", 1e-5, 0.01, 1e-5, 30, 32};
  // scratch: for a randomly initialised backbone (see README.md, "Recipes", for how it was chosen).
  if (name == "scratch") return {"sgd", "constant", "batch", 0.01, 1.0, 1e-4, 4, 32};
  MDFF_FAIL("unknown recipe '", name, "': use paper or scratch");
}

data::Dataset load_dataset(const Options& o) {
  if (o.dataset == "fashion-mnist")
    return data::load_fashion_mnist(o.data_dir.empty() ? "/usr/share/datasets/fashion-mnist" : o.data_dir);
  if (o.dataset == "cifar10") return data::load_cifar10(o.data_dir.empty() ? "data/cifar-10-batches-bin" : o.data_dir);
  MDFF_CHECK(fs::is_regular_file(o.dataset), "unknown dataset '", o.dataset,
             "': use fashion-mnist, cifar10, or the path of an image list (with --classes)");
  MDFF_CHECK(o.classes > 0, "an image list needs --classes K (the number of labels per line)");
  return data::load_image_list(o.dataset, o.list_root.empty() ? fs::path(o.dataset).parent_path().string() : o.list_root,
                               o.classes);
}

Device choose_device(const std::string& name) {
  std::string why;
  if (name == "cpu") return Device::CPU;
  if (name == "cuda") {
    MDFF_CHECK(cuda_available(&why), "--device cuda: ", why);
    return Device::CUDA;
  }
  MDFF_CHECK(name == "auto", "unknown --device '", name, "': use auto, cpu or cuda");
  return cuda_available(&why) ? Device::CUDA : Device::CPU;
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

// The paper's Table 2 values for MDFF-SH (method.md §7), where one exists.
double paper_map(const std::string& dataset, int bits) {
  static const std::map<int, double> cifar{{12, 0.811}, {24, 0.854}, {32, 0.874}, {48, 0.880}};
  if (dataset == "cifar10" && cifar.count(bits)) return cifar.at(bits);
  return std::nan("");
}

std::string timestamp() {
  char text[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(text, sizeof text, "%Y%m%d-%H%M%S", std::localtime(&now));
  return text;
}

// What the options ask for, with the recipe's defaults filled in.
struct Plan {
  TrainSettings settings;
  std::vector<int> bits;
  std::vector<double> scales;
  Device device = Device::CPU;
};

Plan plan_from(const Options& o) {
  MDFF_CHECK(o.pretrained.empty(), "--pretrained: loading ImageNet weights is not available yet (issue 6); "
             "train from scratch without it");
  const Recipe recipe = recipe_named(o.recipe.empty() ? (o.pretrained.empty() ? "scratch" : "paper") : o.recipe);
  Plan plan;
  TrainSettings& settings = plan.settings;
  settings.epochs = o.epochs ? o.epochs : recipe.epochs;
  settings.batch_size = o.batch_size;
  settings.optimizer = o.optimizer.empty() ? recipe.optimizer : o.optimizer;
  settings.lr = o.lr > 0 ? o.lr : recipe.lr;
  settings.schedule = o.schedule.empty() ? recipe.schedule : o.schedule;
  settings.weight_decay = o.weight_decay >= 0 ? o.weight_decay : recipe.weight_decay;
  settings.loss = {parse_pairs(o.pairs.empty() ? recipe.pairs : o.pairs), o.beta, o.gamma >= 0 ? o.gamma : recipe.gamma};
  settings.batch.image_size = o.image_size ? o.image_size : recipe.image_size;
  settings.batch.flip = !o.no_flip;
  settings.seed = o.seed;
  plan.bits = cli::parse_list<int>(o.bits.empty() ? (o.dataset == "fashion-mnist" ? "48" : "12,24,32,48") : o.bits, "--bits");
  for (int b : plan.bits) MDFF_CHECK(b >= 4 && b <= 1024, "--bits: ", b, " is outside 4..1024");
  plan.scales = cli::parse_list<double>(o.scales, "--scales");
  for (double s : plan.scales) MDFF_CHECK(s > 0 && s <= 4, "--scales: ", s, " is outside (0, 4]");
  plan.device = choose_device(o.device);
  return plan;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"Trains MDFF-SH (multiscale deep feature fusion hashing) and evaluates its hash codes.\n"
               "With no DATASET it trains on Fashion-MNIST, which Debian's dataset-fashion-mnist installs."};
  app.set_config("--config", "", "read options from a file of `option = value` lines (TOML), e.g. epochs = 10");
  app.add_option("dataset", o.dataset, "fashion-mnist (default), cifar10, or the path of an image list")
      ->capture_default_str();
  app.add_option("--data-dir", o.data_dir, "where the dataset's files are (default: /usr/share/datasets/"
                 "fashion-mnist, data/cifar-10-batches-bin)");
  app.add_option("--classes", o.classes, "number of labels per line of an image list")->check(CLI::Range(1, 10000));
  app.add_option("--list-root", o.list_root, "folder that image-list paths are relative to (default: the list's)");
  app.add_option("--recipe", o.recipe, "defaults for the options below: scratch (random initialisation, the default) "
                 "or paper (the paper's RMSProp recipe, for ImageNet weights)")->check(CLI::IsMember({"paper", "scratch"}));
  app.add_option("--bits", o.bits, "code lengths, one model each (default 48 for fashion-mnist, else 12,24,32,48)");
  app.add_option("--epochs", o.epochs, "passes over the training images (recipe's default)")->check(CLI::Range(1, 100000));
  app.add_option("--batch-size", o.batch_size, "images per step")->capture_default_str()->check(CLI::Range(2, 100000));
  app.add_option("--optimizer", o.optimizer, "rmsprop or sgd (recipe's default)")->check(CLI::IsMember({"rmsprop", "sgd"}));
  app.add_option("--lr", o.lr, "learning rate (recipe's default)")->check(CLI::PositiveNumber);
  app.add_option("--schedule", o.schedule, "learning rate schedule: constant or cosine (recipe's default)")
      ->check(CLI::IsMember({"constant", "cosine"}));
  app.add_option("--weight-decay", o.weight_decay, "L2 weight decay added to the gradient (recipe's default)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--beta", o.beta, "weight of J2, the quantization loss")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--gamma", o.gamma, "weight of J3, the classification loss (recipe's default)")->check(CLI::NonNegativeNumber);
  app.add_option("--pairs", o.pairs, "J1's pairs: dataset (batch x all training images, the U matrix) or batch "
                 "(recipe's default)")->check(CLI::IsMember({"dataset", "batch"}));
  app.add_option("--taps", o.taps, "features fused: all, fc1 or convs (the paper's Table 4)")->capture_default_str()
      ->check(CLI::IsMember({"all", "fc1", "convs"}));
  app.add_option("--scales", o.scales, "image scales the backbone sees, e.g. 1,0.5 (dual scale) or 1")->capture_default_str();
  app.add_option("--image-size", o.image_size, "images are resized to this (recipe's default: 32)")->check(CLI::Range(16, 1024));
  app.add_flag("--no-flip", o.no_flip, "no random horizontal flips of training images");
  app.add_option("--protocol", o.protocol, "split: paper (training images stay in the database) or deephash54k")
      ->capture_default_str()->check(CLI::IsMember({"paper", "deephash54k"}));
  app.add_option("--seed", o.seed, "seed of the split, the initialisation and the data order")->capture_default_str();
  app.add_option("--queries-per-class", o.split.queries_per_class, "single-label split: queries drawn per class")
      ->capture_default_str()->check(CLI::Range(1, 1000000));
  app.add_option("--train-per-class", o.split.train_per_class, "single-label split: training images per class")
      ->capture_default_str()->check(CLI::Range(1, 1000000));
  app.add_option("--queries", o.split.queries, "multi-label split: queries")->capture_default_str()
      ->check(CLI::Range(1, 10000000));
  app.add_option("--train-images", o.split.train, "multi-label split: training images")->capture_default_str()
      ->check(CLI::Range(1, 10000000));
  app.add_option("--model", o.model, "backbone: resnet50 (the paper's) or tiny (the tests' small ResNet, for quick "
                 "trials)")->capture_default_str()->check(CLI::IsMember({"resnet50", "tiny"}));
  app.add_option("--monitor-every", o.monitor_every, "every N epochs, mAP on the queries against a 5,000-image "
                 "sample of the database (the learning curve); 0: off")->capture_default_str()->check(CLI::Range(0, 1000));
  app.add_option("--device", o.device, "auto (the GPU when there is one), cpu or cuda")->capture_default_str()
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app.add_option("--out", o.out, "run folder (default: runs/DATASET-TIME)");
  app.add_option("--pretrained", o.pretrained, "ImageNet ResNet50 weights (safetensors)");
  if (auto exit_code = cli::parse(app, argc, argv)) return *exit_code;

  // Option values CLI11 cannot check alone: an error here is a usage error (exit 2), like CLI11's own.
  Plan plan;
  try {
    plan = plan_from(o);
  } catch (const Error& e) {
    std::fprintf(stderr, "train_mdff: %s\nRun with --help for more information.\n", e.what());
    return 2;
  }
  const TrainSettings& settings = plan.settings;
  const std::vector<int>& bits = plan.bits;
  const std::vector<double>& scales = plan.scales;
  const Device device = plan.device;

  try {
    const std::string dataset_name = fs::path(o.dataset).stem().string();
    const fs::path out = o.out.empty() ? fs::path("runs") / (dataset_name + "-" + timestamp()) : fs::path(o.out);
    fs::create_directories(out);
    std::printf("train_mdff: %s on %s; results in %s\n", dataset_name.c_str(), device_name(device), out.c_str());

    const data::Dataset dataset = load_dataset(o);
    const data::Split split = data::make_split(dataset, o.protocol, o.seed, o.split);
    data::write_split((out / "split").string(), split);
    std::printf("%s: %lld images, %d classes; %zu queries, %zu training, %zu database (protocol %s, seed %llu)\n",
                dataset.name.c_str(), static_cast<long long>(dataset.size()), dataset.classes, split.query.size(),
                split.train.size(), split.database.size(), o.protocol.c_str(), static_cast<unsigned long long>(o.seed));

    json config{{"dataset", o.dataset}, {"data_dir", o.data_dir}, {"classes", dataset.classes},
                {"recipe", o.recipe.empty() ? "scratch" : o.recipe}, {"bits", bits}, {"epochs", settings.epochs},
                {"batch_size", settings.batch_size}, {"optimizer", settings.optimizer}, {"lr", settings.lr},
                {"schedule", settings.schedule}, {"weight_decay", settings.weight_decay}, {"beta", settings.loss.beta},
                {"gamma", settings.loss.gamma}, {"pairs", pairs_name(settings.loss.pairs)}, {"taps", o.taps}, {"scales", scales},
                {"image_size", settings.batch.image_size}, {"flip", settings.batch.flip}, {"protocol", o.protocol},
                {"seed", o.seed}, {"device", device_name(device)}, {"monitor_every", o.monitor_every},
                {"model", o.model}, {"queries_per_class", o.split.queries_per_class},
                {"train_per_class", o.split.train_per_class}, {"queries", o.split.queries},
                {"train_images", o.split.train},
                {"out", out.string()}};
    std::ofstream(out / "config.json") << config.dump(2) << "\n";

    const int64_t map_at = dataset.multi_label ? 5000 : -1;
    const std::vector<int> pn_at = retrieval::default_pn_at(static_cast<int64_t>(split.database.size()));
    const std::vector<uint8_t> query_labels = labels_of(dataset, split.query),
                               database_labels = labels_of(dataset, split.database);
    // The learning curve's database: a fixed 5,000-image sample (encoding all of it every epoch would
    // cost more than the training on a CPU).
    std::vector<int64_t> monitor_rows = split.database;
    {
      Rng rng(o.seed + 1);
      for (size_t i = monitor_rows.size(); i > 1; --i) std::swap(monitor_rows[i - 1], monitor_rows[rng.below(i)]);
      monitor_rows.resize(std::min<size_t>(monitor_rows.size(), 5000));
    }
    const std::vector<uint8_t> monitor_labels = labels_of(dataset, monitor_rows);

    json results = json::object();
    struct TableRow {
      int bits;
      double map, precision_h2, precision_1000;
    };
    std::vector<TableRow> table;
    std::vector<retrieval::PlotSeries> pr_series, pn_series;
    retrieval::PlotSeries ph2_series{"P@H<=2", {}, {}};
    for (int b : bits) {
      MdffConfig model_config;
      model_config.bits = b;
      model_config.classes = dataset.classes;
      model_config.taps = parse_taps(o.taps);
      model_config.scales = scales;
      if (o.model == "tiny") model_config.backbone = ResNetConfig::tiny();
      Rng rng(o.seed);
      MdffSh model(model_config, rng);
      model.to(device);
      Trainer trainer(model, dataset, split.train, settings);
      json history = json::array();
      const auto start = std::chrono::steady_clock::now();
      double images_per_second = 0;
      const std::string checkpoint = (out / ("checkpoint_" + std::to_string(b) + "bits.safetensors")).string();
      for (int epoch = 1; epoch <= settings.epochs; ++epoch) {
        cli::Progress progress(detail::concat(b, " bits, epoch ", epoch, "/", settings.epochs));
        EpochReport report;
        try {
          report = trainer.train_epoch([&](int64_t done, int64_t total, double loss, double ips) {
            char figures[96];
            std::snprintf(figures, sizeof figures, "loss %.4f  %.0f img/s", loss, ips);
            progress.update(done, total, figures);
          });
        } catch (const TrainingDiverged& e) {
          MDFF_FAIL(e.what(), ". The last good checkpoint is ",
                    fs::exists(checkpoint) ? checkpoint : std::string("(none: it failed in the first epoch)"));
        }
        images_per_second = report.images_per_second;
        json entry{{"epoch", epoch}, {"loss", report.loss}, {"j1", report.j1}, {"j2", report.j2}, {"j3", report.j3},
                   {"lr", report.lr}, {"seconds", report.seconds}, {"images_per_second", report.images_per_second}};
        if (o.monitor_every > 0 && (epoch % o.monitor_every == 0 || epoch == settings.epochs)) {
          const auto q = retrieval::pack_codes(retrieval::encode(model, dataset, split.query, settings.batch, 256));
          const auto d = retrieval::pack_codes(retrieval::encode(model, dataset, monitor_rows, settings.batch, 256));
          const double m = retrieval::evaluate(q, query_labels, d, monitor_labels, dataset.classes, map_at, {100}).map;
          entry["monitor_map"] = m;
          std::printf("  epoch %d: loss %.4f (J1 %.4f, J2 %.4f, J3 %.4f), mAP against %zu database images %.4f\n",
                      epoch, report.loss, report.j1, report.j2, report.j3, monitor_rows.size(), m);
        } else {
          std::printf("  epoch %d: loss %.4f (J1 %.4f, J2 %.4f, J3 %.4f)\n", epoch, report.loss, report.j1, report.j2,
                      report.j3);
        }
        history.push_back(entry);
        NamedTensors state = model.named_parameters();
        for (auto& named : model.named_buffers()) state.push_back(named);
        io::save_safetensors(checkpoint, state, {{"config", config.dump()}, {"bits", std::to_string(b)},
                                                 {"epoch", std::to_string(epoch)}});
      }
      const double train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

      cli::Progress encoding(detail::concat(b, " bits, encoding the database"));
      const Tensor uq = retrieval::encode(model, dataset, split.query, settings.batch, 256);
      const Tensor ud = retrieval::encode(model, dataset, split.database, settings.batch, 256,
                                          [&](int64_t done, int64_t total) { encoding.update(done, total, "images"); });
      const retrieval::PackedCodes queries = retrieval::pack_codes(uq), database = retrieval::pack_codes(ud);
      const retrieval::RetrievalMetrics m =
          retrieval::evaluate(queries, query_labels, database, database_labels, dataset.classes, map_at, pn_at);

      const fs::path codes_dir = out / "codes" / std::to_string(b);
      fs::create_directories(codes_dir);
      retrieval::write_npy_codes((codes_dir / "query.npy").string(), queries);
      retrieval::write_npy_codes((codes_dir / "database.npy").string(), database);
      const int64_t nq = static_cast<int64_t>(split.query.size()), nd = static_cast<int64_t>(split.database.size());
      retrieval::write_npy((codes_dir / "query_labels.npy").string(), query_labels, {nq, dataset.classes});
      retrieval::write_npy((codes_dir / "database_labels.npy").string(), database_labels, {nd, dataset.classes});
      write_figure4((out / ("figure4_" + std::to_string(b) + "bits.png")).string(), dataset, split, queries, database);

      table.push_back({b, m.map, m.precision_h2, precision_at(m, 1000)});
      json entry = metrics_json(m);
      entry["train_seconds"] = train_seconds;
      entry["train_images_per_second"] = images_per_second;
      entry["history"] = history;
      results[std::to_string(b)] = entry;
      std::ofstream(out / "metrics.json") << json{{"dataset", dataset.name}, {"code_lengths", results}}.dump(2) << "\n";

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
      const double paper = paper_map(o.dataset, row.bits);
      std::printf("%-6d %8.4f %10.4f %10s %12s\n", row.bits, row.map, row.precision_h2,
                  std::isnan(row.precision_1000) ? "-" : detail::concat(row.precision_1000).substr(0, 6).c_str(),
                  std::isnan(paper) ? "-" : detail::concat(paper).c_str());
    }
    std::printf("mAP is mAP@%s; results in %s\n", map_at < 0 ? "ALL" : "5000", out.c_str());
  } catch (const Error& e) {
    std::fprintf(stderr, "train_mdff: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
