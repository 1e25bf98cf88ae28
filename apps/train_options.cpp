// train_mdff's options (apps/train_options.h): config.json both ways, the recipes, the command line.
#include "apps/train_options.h"

#include <algorithm>
#include <filesystem>
#include <limits>
#include <type_traits>

#include "core/error.h"
#include "core/file_io.h"
#include "data/idx.h"

namespace mdff::train {

using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

// A recipe's defaults; options given on the command line win.
struct Recipe {
  std::string optimizer, schedule, pairs, scales;
  double lr, beta, gamma, weight_decay, warmup;
  int epochs, batch_size, image_size, shift, zero_init_residual;
};

Recipe recipe_named(const std::string& name) {
  // paper: the paper's recipe, tuned for an ImageNet-pretrained backbone (method.md §4).
  if (name == "paper") return {"rmsprop", "constant", "dataset", "1,0.5", 1e-5, 0.1, 0.01, 1e-5, 0, 30, 32, 32, 0, 0};
  // scratch: for a randomly initialised backbone (see README.md, "Recipes", for how it was chosen).
  // Measured on the 2-core machine (README.md, "Recipes"): SGD with momentum, batch 64, lr 0.04 after a
  // one-epoch warm-up, cosine decay, weight decay 5e-4, a small quantization weight (beta 0.01: a
  // larger one saturates tanh and stalls learning), gamma 1, residual blocks starting as the identity,
  // one scale (more epochs in the budget), 16 epochs.
  if (name == "scratch") return {"sgd", "cosine", "batch", "1", 0.04, 0.01, 1.0, 5e-4, 1, 16, 64, 32, 0, 1};
  MDFF_FAIL("unknown recipe '", name, "': use paper or scratch");
}

// Whether `item` is a JSON integer that T holds. nlohmann::json converts a float, or an integer out of
// range, to an integer type with a plain cast, which is undefined behaviour for 1e300 or -1.5.
template <class T>
bool integer_fits(const json& item) {
  if (item.is_number_unsigned()) return item.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<T>::max());
  if (!item.is_number_integer()) return false;
  const int64_t value = item.get<int64_t>();
  if (value < 0) return std::is_signed_v<T> && value >= static_cast<int64_t>(std::numeric_limits<T>::min());
  return static_cast<uint64_t>(value) <= static_cast<uint64_t>(std::numeric_limits<T>::max());
}

}  // namespace

json options_json(const Options& o) {
  json j;
  for_each_option(o, [&](const char* key, const auto& value) { j[key] = value; });
  j["bits"] = cli::parse_list<int>(o.bits, "--bits");
  j["scales"] = cli::parse_list<double>(o.scales, "--scales");
  return j;
}

Options options_from_json(const json& j, const std::string& source) {
  Options o;
  for_each_option(o, [&](const char* key, auto& value) {
    MDFF_CHECK(j.contains(key), source, " has no option '", key, "' (written by another version of train_mdff?)");
    using T = std::decay_t<decltype(value)>;
    try {
      if constexpr (std::is_same_v<T, std::string>) {
        if (j.at(key).is_array()) {  // a list option: "1,0.5"
          value.clear();
          for (const json& item : j.at(key)) value += (value.empty() ? "" : ",") + item.dump();
          return;
        }
      } else if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
        MDFF_CHECK(integer_fits<T>(j.at(key)), source, ": option '", key, "' is ", j.at(key).dump(),
                   ", not a whole number in ", std::numeric_limits<T>::min(), "..", std::numeric_limits<T>::max());
      }
      j.at(key).get_to(value);
    } catch (const json::exception&) {
      MDFF_FAIL(source, ": option '", key, "' has the wrong type: ", j.at(key).dump());
    }
  });
  return o;
}

// In crop mode the image size is the crop's (--crop replaces --image-size) and there is no --shift (the
// random crop moves the image).
void resolve_defaults(Options& o) {
  if (o.recipe.empty()) o.recipe = o.pretrained.empty() ? "scratch" : "paper";
  const Recipe r = recipe_named(o.recipe);
  if (o.epochs == 0) o.epochs = r.epochs;
  if (o.batch_size == 0) o.batch_size = r.batch_size;
  if (o.beta < 0) o.beta = r.beta;
  if (o.optimizer.empty()) o.optimizer = r.optimizer;
  if (o.lr <= 0) o.lr = r.lr;
  if (o.schedule.empty()) o.schedule = r.schedule;
  if (o.warmup < 0) o.warmup = r.warmup;
  if (o.weight_decay < 0) o.weight_decay = r.weight_decay;
  if (o.pairs.empty()) o.pairs = r.pairs;
  if (o.gamma < 0) o.gamma = r.gamma;
  MDFF_CHECK(o.crop == 0 || o.image_size == 0, "--crop replaces --image-size (the model sees the crop): give one "
             "of them");
  if (o.image_size == 0) o.image_size = o.crop > 0 ? o.crop : r.image_size;
  if (o.shift < 0) o.shift = o.crop > 0 ? 0 : r.shift;
  if (o.scales.empty()) o.scales = r.scales;
  if (o.zero_init_residual < 0) o.zero_init_residual = r.zero_init_residual;
  if (o.bits.empty()) o.bits = o.dataset == "fashion-mnist" ? "48" : "12,24,32,48";
  if (o.data_dir.empty()) o.data_dir = default_data_dir(o.dataset);
  // Paths as absolute ones, so that config.json lets --resume continue the run from any folder, and the same
  // folder written another way on the command line is no difference.
  const auto absolute = [](std::string& path) {
    std::error_code error;
    const fs::path resolved = fs::absolute(path, error);
    if (!path.empty() && !error) path = resolved.lexically_normal().string();
  };
  absolute(o.data_dir);
  absolute(o.list_root);
  absolute(o.pretrained);
  if (o.dataset != "fashion-mnist" && o.dataset != "cifar10") absolute(o.dataset);
}

std::string default_data_dir(const std::string& dataset) {
  if (dataset == "fashion-mnist") return data::kFashionMnistDir;
  if (dataset == "cifar10") return "data/cifar-10-batches-bin";
  return "";  // an image list's files are found through --list-root
}

bool given_on_command_line(const CLI::App& app, const std::string& name) {
  const CLI::Option* option = app.get_option_no_throw(name);
  return option && option->count() > 0;
}

Options resumed_options(const Options& given, const CLI::App& app) {
  const fs::path config_path = fs::path(given.resume) / "config.json";
  MDFF_CHECK(fs::is_regular_file(config_path), "--resume: ", given.resume, " has no config.json; give the folder of "
             "a run that train_mdff started (its --out)");
  json stored;
  try {
    const std::vector<uint8_t> bytes = io::read_file(config_path.string());
    stored = json::parse(bytes.begin(), bytes.end());
  } catch (const json::exception& e) {
    MDFF_FAIL("--resume: ", config_path.string(), " is not valid JSON (", e.what(), ")");
  }
  Options o = options_from_json(stored, config_path.string());
  Options here = given;
  resolve_defaults(here);
  const json mine = options_json(here), theirs = options_json(o);
  std::string differences;
  for (const auto& [key, value] : mine.items()) {
    std::string name = key == "dataset" ? key : "--" + key;
    std::replace(name.begin(), name.end(), '_', '-');
    if (given_on_command_line(app, name) && value != theirs.at(key))
      differences += detail::concat(differences.empty() ? "" : "; ", name, " ", value.dump(), " here, ",
                                    theirs.at(key).dump(), " in the run");
  }
  // The same folder however written (r1, ./r1/, an absolute path); a path that cannot be resolved is compared
  // as written, since weakly_canonical's throwing form would escape main's usage-error handler.
  auto resolved = [](const std::string& path) {
    std::error_code error;
    const fs::path canonical = fs::weakly_canonical(path, error);
    return error ? fs::path(path).lexically_normal() : canonical;
  };
  MDFF_CHECK(!given_on_command_line(app, "--out") || resolved(given.out) == resolved(given.resume),
             "--resume: a run continues in its own folder, ", given.resume, ", not in --out ", given.out,
             ": leave --out out (copy the folder first to continue a copy)");
  MDFF_CHECK(differences.empty(), "--resume: this command asks for different options than the run in ", given.resume,
             " was started with: ", differences, ". Leave them out to continue the run as it was, or start a new run");
  o.resume = given.resume;
  o.out = given.resume;
  // The device and the GPU's math are the run's (config.json), unless this command gives them: a run started
  // on the CPU, or in FP32, does not move to the GPU, or to TF32, because this machine has one.
  auto stored_choice = [&](const char* key, const std::string& fallback, std::initializer_list<const char*> allowed) {
    if (!stored.contains(key)) return fallback;
    const json& value = stored.at(key);
    for (const char* choice : allowed)
      if (value == choice) return std::string(choice);
    MDFF_FAIL("--resume: ", config_path.string(), ": '", key, "' is ", value.dump(), ", not one of train_mdff's "
              "(written by another version of train_mdff?); give --", key, " to choose");
  };
  o.device_of_run = !given_on_command_line(app, "--device");
  o.device = o.device_of_run ? stored_choice("device", given.device, {"cpu", "cuda"}) : given.device;
  const bool precision_given = given_on_command_line(app, "--precision");
  o.precision = precision_given ? given.precision : stored_choice("precision", given.precision, {"tf32", "fp32"});
  o.interrupt_after_steps = given.interrupt_after_steps;
  return o;
}

void add_options(CLI::App& app, Options& o) {
  app.set_config("--config", "", "read options from a file of `option = value` lines (TOML), e.g. epochs = 10");
  app.allow_config_extras(CLI::config_extras_mode::error);  // a misspelt key in the file is an error, not ignored
  app.add_option("dataset", o.dataset, "fashion-mnist (default), cifar10, or the path of an image list")
      ->capture_default_str();
  app.add_option("--data-dir", o.data_dir, "where the dataset's files are (default: /usr/share/datasets/"
                 "fashion-mnist, data/cifar-10-batches-bin)");
  app.add_option("--classes", o.classes, "number of labels per line of an image list")->transform(cli::whole_number(1, 10000));
  app.add_option("--list-root", o.list_root, "folder that image-list paths are relative to (default: the list's)");
  app.add_option("--recipe", o.recipe, "defaults for the options below: scratch (random initialisation, the default) "
                 "or paper (the paper's RMSProp recipe, the default with --pretrained)")
      ->check(CLI::IsMember({"paper", "scratch"}));
  app.add_option("--bits", o.bits, "code lengths, one model each (default 48 for fashion-mnist, else 12,24,32,48)")
      ->check(cli::number_list<int>());
  app.add_option("--epochs", o.epochs, "passes over the training images (recipe's default)")->transform(cli::whole_number(1, 100000));
  app.add_option("--batch-size", o.batch_size, "images per step (recipe's default)")->transform(cli::whole_number(2, 100000));
  app.add_option("--optimizer", o.optimizer, "rmsprop or sgd (recipe's default)")->check(CLI::IsMember({"rmsprop", "sgd"}));
  app.add_option("--lr", o.lr, "learning rate (recipe's default)")->check(cli::finite_number(0, true));
  app.add_option("--schedule", o.schedule, "learning rate schedule: constant or cosine (recipe's default)")
      ->check(CLI::IsMember({"constant", "cosine"}));
  app.add_option("--warmup", o.warmup, "epochs (may be fractional) over which the learning rate rises linearly "
                 "at the start, scaling the schedule (with cosine it peaks at the cosine's value there, e.g. 0.99 "
                 "--lr after 1 of 16 epochs) (recipe's default)")->check(cli::finite_number(0, false));
  app.add_option("--weight-decay", o.weight_decay, "L2 weight decay added to the gradient (recipe's default)")
      ->check(cli::finite_number(0, false));
  app.add_option("--beta", o.beta, "weight of J2, the quantization loss (recipe's default)")
      ->check(cli::finite_number(0, false));
  app.add_option("--gamma", o.gamma, "weight of J3, the classification loss (recipe's default)")
      ->check(cli::finite_number(0, false));
  app.add_option("--pairs", o.pairs, "J1's pairs: dataset (batch x all training images, the U matrix) or batch "
                 "(recipe's default)")->check(CLI::IsMember({"dataset", "batch"}));
  app.add_option("--taps", o.taps, "features fused: all, fc1 or convs (the paper's Table 4)")->capture_default_str()
      ->check(CLI::IsMember({"all", "fc1", "convs"}));
  app.add_option("--zero-init-residual", o.zero_init_residual, "1: every residual block starts as the identity "
                 "(its last batch norm's gamma = 0), 0: torchvision's default initialisation (recipe's default)")
      ->transform(cli::whole_number(0, 1));
  app.add_option("--scales", o.scales, "image scales the backbone sees, e.g. 1,0.5 (dual scale, the paper's) or 1 "
                 "(recipe's default)")->check(cli::number_list<double>());
  app.add_option("--image-size", o.image_size, "images are resized to this square (recipe's default: 32); --crop "
                 "replaces it")->transform(cli::whole_number(16, 1024));
  app.add_option("--resize", o.resize, "crop mode, with --crop (DeepHash-pytorch's 256 for NUS-WIDE and MS-COCO): "
                 "the shorter side of each image is resized to this, keeping the aspect ratio")->transform(cli::whole_number(16, 1024));
  app.add_option("--crop", o.crop, "crop mode, with --resize (DeepHash-pytorch's 224): the model sees a random "
                 "square of this size of the resized image in training, the centre one in evaluation; replaces "
                 "--image-size")->transform(cli::whole_number(16, 1024));
  app.add_flag("--no-flip", o.no_flip, "no random horizontal flips of training images");
  app.add_option("--shift", o.shift, "random translation of training images by up to this many pixels each way, "
                 "uncovered pixels black (recipe's default)")->transform(cli::whole_number(0, 1023));
  app.add_option("--protocol", o.protocol, "split: paper (training images stay in the database) or deephash54k")
      ->capture_default_str()->check(CLI::IsMember({"paper", "deephash54k"}));
  app.add_option("--seed", o.seed, "seed of the split, the initialisation and the data order")->capture_default_str()
      ->transform(cli::unsigned_64());
  app.add_option("--queries-per-class", o.split.queries_per_class, "single-label split: queries drawn per class")
      ->capture_default_str()->transform(cli::whole_number(1, 1000000));
  app.add_option("--train-per-class", o.split.train_per_class, "single-label split: training images per class")
      ->capture_default_str()->transform(cli::whole_number(1, 1000000));
  app.add_option("--queries", o.split.queries, "multi-label split: queries")->capture_default_str()
      ->transform(cli::whole_number(1, 10000000));
  app.add_option("--train-images", o.split.train, "multi-label split: training images")->capture_default_str()
      ->transform(cli::whole_number(1, 10000000));
  app.add_option("--model", o.model, "backbone: resnet50 (the paper's) or tiny (the tests' small ResNet, for quick "
                 "trials)")->capture_default_str()->check(CLI::IsMember({"resnet50", "tiny"}));
  app.add_option("--monitor-every", o.monitor_every, "every N epochs, mAP on the queries against a 2,000-image "
                 "sample of the database (the learning curve); 0: off")->capture_default_str()->transform(cli::whole_number(0, 1000));
  app.add_option("--device", o.device, "auto (the GPU when there is one), cpu or cuda; with --resume, the run's")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app.add_option("--precision", o.precision, "GPU math: tf32 (convolutions and matrix products on tensor cores with "
                 "10-bit mantissas and FP32 sums, about 1e-3 relative error, as PyTorch's cuDNN default) or fp32 "
                 "(full FP32, slower); the CPU always computes in FP32; with --resume, the run's")
      ->capture_default_str()
      ->check(CLI::IsMember({"tf32", "fp32"}));
  app.add_option("--out", o.out, "run folder (default: runs/DATASET-TIME); it must not hold another run");
  app.add_option("--pretrained", o.pretrained, "ImageNet ResNet50 weights, safetensors with torchvision's names "
                 "(scripts/download_resnet50.sh); the recipe then defaults to paper");
  app.add_option("--resume", o.resume, "continue the run in this folder from its checkpoints, with its options "
                 "(after Ctrl-C, a crash or a kill)");
  app.add_option("--interrupt-after-steps", o.interrupt_after_steps, "testing: act as if Ctrl-C were pressed "
                 "after this many training steps")->group("");
}

}  // namespace mdff::train
