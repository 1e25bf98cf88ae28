// train_mdff's options: the struct, the one list that writes config.json and reads it back, the recipes'
// defaults, the command-line definition and --resume's check. A library of its own so that the config
// parsers (the --config TOML file, a run's config.json) can be fuzzed (tests/fuzz) without the program.
#pragma once
#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>

#include "apps/cli.h"
#include "data/protocol.h"

namespace mdff::train {

struct Options {
  std::string dataset = "fashion-mnist", data_dir, list_root, out, pretrained, recipe, resume;
  std::string bits, taps = "all", scales, pairs, protocol = "paper";
  std::string optimizer, schedule, device = "auto", precision = "tf32", model = "resnet50";
  data::SplitSizes split;
  int classes = 0, epochs = 0, image_size = 0, shift = -1, zero_init_residual = -1, monitor_every = 2;
  int resize = 0, crop = 0;  // crop mode (both > 0) or not (both 0)
  int64_t batch_size = 0, interrupt_after_steps = 0;
  double lr = 0, weight_decay = -1, beta = -1, gamma = -1, warmup = -1;
  uint64_t seed = 0;
  bool no_flip = false;
  bool device_of_run = false;  // --resume without --device: `device` is the one the run trained on
  // Whether the command line gave a single-label split size (--queries-per-class, --train-per-class) or a
  // multi-label one (--queries, --train-images): a dataset of the other kind refuses them.
  bool per_class_sizes_given = false, total_sizes_given = false;
};

// Every option that a run's results depend on, by its config.json key (the command-line option is
// "--" + the key with '-' for '_'; "dataset" is the positional argument). One list, so that config.json
// is written and read back (--resume) alike. Not here: --out, --device, --precision and --resume, which
// may differ when a run is continued.
template <class O, class Visit>
void for_each_option(O& o, Visit&& visit) {
  visit("dataset", o.dataset);
  visit("data_dir", o.data_dir);
  visit("list_root", o.list_root);
  visit("classes", o.classes);
  visit("recipe", o.recipe);
  visit("pretrained", o.pretrained);
  visit("model", o.model);
  visit("bits", o.bits);
  visit("taps", o.taps);
  visit("zero_init_residual", o.zero_init_residual);
  visit("scales", o.scales);
  visit("epochs", o.epochs);
  visit("batch_size", o.batch_size);
  visit("optimizer", o.optimizer);
  visit("lr", o.lr);
  visit("schedule", o.schedule);
  visit("warmup", o.warmup);
  visit("weight_decay", o.weight_decay);
  visit("beta", o.beta);
  visit("gamma", o.gamma);
  visit("pairs", o.pairs);
  visit("image_size", o.image_size);
  visit("resize", o.resize);
  visit("crop", o.crop);
  visit("no_flip", o.no_flip);
  visit("shift", o.shift);
  visit("protocol", o.protocol);
  visit("seed", o.seed);
  visit("queries_per_class", o.split.queries_per_class);
  visit("train_per_class", o.split.train_per_class);
  visit("queries", o.split.queries);
  visit("train_images", o.split.train);
  visit("monitor_every", o.monitor_every);
}

// Whether the command line (or a --config file) gave the option `name` ("--lr", "dataset").
bool given_on_command_line(const CLI::App& app, const std::string& name);

// The lists (--bits, --scales) are written as JSON arrays, for programs that read config.json.
nlohmann::json options_json(const Options& o);
// Reads the options back from config.json's object; a missing key or a wrong type throws an Error naming
// `source` and the key.
Options options_from_json(const nlohmann::json& j, const std::string& source);
// Fills every option left unset with the recipe's (or the dataset's) default.
void resolve_defaults(Options& o);
// Where a built-in dataset's files are by default (--data-dir); "" for an image list.
std::string default_data_dir(const std::string& dataset);
// Defines every command-line option (and --config FILE) of train_mdff on `app`, writing into `o`.
void add_options(CLI::App& app, Options& o);
// --resume: the run folder's options, after checking that those given on this command line agree.
Options resumed_options(const Options& given, const CLI::App& app);

}  // namespace mdff::train
