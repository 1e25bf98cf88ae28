// Image search (mdff_search and what it is built from): the code database file's round trip and its
// refusal of damaged files, load_model_checkpoint on a checkpoint saved the way train_mdff saves one
// (the same outputs, exactly; its input options, crop mode included; clear errors for what is missing or
// wrong), the top-k and radius searches on hand-made codes, and the built program run as a user runs it
// on generated PNG and BMP images; and mdff_walkthrough, which loads checkpoints the same way, on one of
// another image size.
#include <doctest/doctest.h>
#include "tests/doctest_text.h"
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "core/autograd.h"
#include "core/backend.h"
#include "core/error.h"
#include "core/file_io.h"
#include "core/safetensors.h"
#include "data/batch.h"
#include "data/dataset.h"
#include "data/protocol.h"
#include "tests/run_program.h"
#include "models/checkpoint.h"
#include "retrieval/code_db.h"
#include "tests/temp_folder.h"
#include "tests/tiny_dataset.h"

#include "tests/stb_image_write_static.h"

using namespace mdff;
using namespace mdff::retrieval;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {
fs::path temp_path(const std::string& name) {
  static const test::TempFolder folder("mdff_test_search");
  return folder.path / name;
}

// Codes from a ±1 matrix written row by row as strings of '1' (set bit) and '0'.
PackedCodes codes_of(const std::vector<std::string>& rows) {
  std::vector<float> values;
  for (const std::string& row : rows)
    for (char c : row) values.push_back(c == '1' ? 1.0f : -1.0f);
  return pack_codes(Tensor::from_vector(values, {static_cast<int64_t>(rows.size()), static_cast<int64_t>(rows[0].size())}));
}

CodeDatabase sample_database(bool labelled) {
  CodeDatabase db;
  // 70 bits: two words, the second with 6 bits used
  db.codes = codes_of({std::string(70, '1'), std::string(35, '0') + std::string(35, '1'), std::string(70, '0')});
  db.paths = {"/images/a.png", "/images/with space/b \xc3\xa9.jpg", ""};
  if (labelled) {
    db.classes = 2;
    db.labels = {1, 0, 1, 1, 0, 1};
  }
  db.checkpoint = "/runs/x/checkpoint_70bits.safetensors";
  db.checkpoint_crc32 = "0123abcd";
  return db;
}

void check_same(const CodeDatabase& a, const CodeDatabase& b) {
  CHECK(a.codes.bits == b.codes.bits);
  CHECK(a.codes.count == b.codes.count);
  CHECK(a.codes.words == b.codes.words);
  CHECK(a.codes.data == b.codes.data);
  CHECK(a.paths == b.paths);
  CHECK(a.classes == b.classes);
  CHECK(a.labels == b.labels);
  CHECK(a.checkpoint == b.checkpoint);
  CHECK(a.checkpoint_crc32 == b.checkpoint_crc32);
}

// Rewrites the database at `path` after `change` has edited its tensors and metadata.
template <class Change>
std::string damaged_copy(const std::string& path, const std::string& name, Change change) {
  io::SafetensorsFile file = io::load_safetensors(path);
  change(file.entries, file.metadata);
  const std::string out = temp_path(name).string();
  io::save_safetensors_entries(out, file.entries, file.metadata);
  return out;
}

io::SafetensorsEntry& entry_named(std::vector<io::SafetensorsEntry>& entries, const std::string& name) {
  for (auto& e : entries)
    if (e.name == name) return e;
  FAIL("no entry ", name);
  return entries.front();
}

// The config.json fields train_mdff writes that describe the model.
json tiny_config(int classes, const std::string& taps, const std::vector<double>& scales) {
  return {{"model", "tiny"}, {"classes", classes}, {"taps", taps}, {"scales", scales}, {"image_size", 32},
          {"recipe", "scratch"}, {"epochs", 1}};
}

// A tiny MDFF-SH with batch-norm statistics moved away from their initial values by one training-mode
// forward pass, saved as train_mdff saves its checkpoints: parameters, then buffers, by name, with the
// run's config and the code length as metadata.
std::unique_ptr<MdffSh> save_tiny_checkpoint(const std::string& path, const json& config, int bits, uint64_t seed,
                                             const NamedTensors& extra = {}) {
  Rng rng(seed);
  auto model = std::make_unique<MdffSh>(mdff_config("tiny", bits, config["classes"].get<int>(),
                                                    config["taps"].get<std::string>(),
                                                    config["scales"].get<std::vector<double>>()),
                                        rng);
  {
    NoGradGuard no_grad;
    model->forward(Tensor::randn({4, 3, 32, 32}, rng));
  }
  model->eval();
  NamedTensors state = model->named_parameters();
  for (auto& named : model->named_buffers()) state.push_back(named);
  state.insert(state.end(), extra.begin(), extra.end());
  io::save_safetensors(path, state, {{"config", config.dump()}, {"bits", std::to_string(bits)}, {"epoch", "1"}});
  return model;
}

using test::Run;

Run run(const std::string& arguments) { return test::run_program(test::program(MDFF_SEARCH_BINARY), arguments); }

// A 24x24 picture of its own for each i: a coloured background and a bright square placed by i.
std::vector<uint8_t> picture(int i) {
  std::vector<uint8_t> rgb(24 * 24 * 3);
  for (int y = 0; y < 24; ++y)
    for (int x = 0; x < 24; ++x) {
      const bool square = y / 8 == i % 3 && x / 8 == (i / 3) % 3;
      for (int c = 0; c < 3; ++c)
        rgb[(y * 24 + x) * 3 + c] = square ? 255 : static_cast<uint8_t>((37 * i + 71 * c + 3 * (x + y)) % 200);
    }
  return rgb;
}

// One result line of `mdff_search query`: rank, distance, index, labels, path.
struct TextResult {
  int rank, distance, index;
  std::string labels, path;
};

// The result lines that follow the header of query `number` (1-based) in the output.
std::vector<TextResult> text_results(const std::string& output, int number) {
  std::istringstream in(output);
  std::string line;
  const std::string start = "query " + std::to_string(number) + ": ";
  while (std::getline(in, line) && line.rfind(start, 0) != 0) {
  }
  while (std::getline(in, line) && line.find("rank") == std::string::npos) {
  }
  std::vector<TextResult> results;
  while (std::getline(in, line) && !line.empty()) {
    std::istringstream fields(line);
    TextResult r;
    fields >> r.rank >> r.distance >> r.index >> r.labels >> r.path;
    results.push_back(r);
  }
  return results;
}
}  // namespace

TEST_CASE("a code database comes back as written, with and without labels, and empty") {
  for (bool labelled : {true, false}) {
    CAPTURE(labelled);
    const CodeDatabase db = sample_database(labelled);
    const std::string path = temp_path("round_trip.safetensors").string();
    write_code_database(path, db);
    check_same(read_code_database(path), db);
    // what Python sees: the documented tensors and metadata
    const io::SafetensorsFile file = io::load_safetensors(path);
    CHECK(file.metadata.at("format") == "mdff-code-db");
    CHECK(file.metadata.at("bits") == "70");
    CHECK(file.find("codes")->shape == Shape{3, 2});
    CHECK(file.find("path_offsets")->shape == Shape{4});
    CHECK((file.find("labels") != nullptr) == labelled);
  }
  CodeDatabase empty = sample_database(true);
  empty.codes = codes_of({"1010"});
  empty.codes.count = 0;
  empty.codes.data.clear();
  empty.paths.clear();
  empty.labels.clear();
  const std::string path = temp_path("empty.safetensors").string();
  write_code_database(path, empty);
  check_same(read_code_database(path), empty);
}

TEST_CASE("an inconsistent code database is not written") {
  const std::string path = temp_path("refused.safetensors").string();
  CodeDatabase db = sample_database(true);
  db.paths.pop_back();
  CHECK_THROWS_WITH_AS(write_code_database(path, db), doctest::Contains("3 codes but 2 paths"), Error);
  db = sample_database(true);
  db.labels[3] = 2;
  CHECK_THROWS_WITH_AS(write_code_database(path, db), doctest::Contains("label 1 of image 1 is 2"), Error);
  db = sample_database(true);
  db.labels.pop_back();
  CHECK_THROWS_WITH_AS(write_code_database(path, db), doctest::Contains("5 label bytes for 3 images of 2 classes"), Error);
  db = sample_database(false);
  db.checkpoint_crc32 = "xyz";
  CHECK_THROWS_WITH_AS(write_code_database(path, db), doctest::Contains("CRC-32 (8 hex digits)"), Error);
  db = sample_database(false);
  db.codes.words = 1;
  CHECK_THROWS_WITH_AS(write_code_database(path, db), doctest::Contains("need 2 words, not 1"), Error);
  CHECK_FALSE(fs::exists(path));
}

TEST_CASE("damaged code database files are clear errors naming the file") {
  const std::string good = temp_path("good.safetensors").string();
  write_code_database(good, sample_database(true));
  using Entries = std::vector<io::SafetensorsEntry>;
  using Metadata = std::map<std::string, std::string>;
  const auto refused = [&](const std::string& name, auto change, const std::string& message) {
    CAPTURE(name);
    const std::string path = damaged_copy(good, name + ".safetensors", change);
    CHECK_THROWS_WITH_AS(read_code_database(path), doctest::Contains(message.c_str()), Error);
    CHECK_THROWS_WITH_AS(read_code_database(path), doctest::Contains(path.c_str()), Error);
  };
  refused("no_format", [](Entries&, Metadata& m) { m.erase("format"); }, "is not an mdff code database");
  refused("version", [](Entries&, Metadata& m) { m["version"] = "2"; }, "code database version '2' is not supported");
  refused("bits_text", [](Entries&, Metadata& m) { m["bits"] = "70x"; }, "the \"bits\" metadata is '70x'");
  refused("words", [](Entries&, Metadata& m) { m["bits"] = "64"; }, "has 2 words per code, but 64-bit codes take 1");
  // 66 bits: the first code (all 70 bits set) has 4 bits beyond them
  refused("beyond", [](Entries&, Metadata& m) { m["bits"] = "66"; }, "code 0 has bits set beyond its 66 bits");
  refused("no_codes", [](Entries& e, Metadata&) { e.erase(e.begin()); }, "has no tensor 'codes'");
  refused("codes_dtype", [](Entries& e, Metadata&) { entry_named(e, "codes").dtype = "F64"; },
          "tensor 'codes' is F64 (3,2); a code database stores it as I64 with 2 dimensions");
  refused("offsets_count", [](Entries& e, Metadata&) {
    auto& o = entry_named(e, "path_offsets");
    o.shape = {3};
    o.bytes.resize(24);
  }, "tensor 'path_offsets' has 3 entries, but 3 codes need 4");
  refused("offsets_end", [](Entries& e, Metadata&) {
    io::SafetensorsEntry& path_bytes = entry_named(e, "path_bytes");
    path_bytes.bytes.push_back('x');
    path_bytes.shape[0] += 1;
  }, "tensor 'path_offsets' runs from 0 to 40, not from 0 to the 41 bytes of 'path_bytes'");
  refused("offsets_order", [](Entries& e, Metadata&) {
    auto& o = entry_named(e, "path_offsets");
    std::swap(o.bytes[8], o.bytes[16]);  // offsets 0, 13, 40, 40 become 0, 40, 13, 40
  }, "tensor 'path_offsets' decreases at entry 2");
  // Found by fuzzing (tests/fuzz/corpus/fuzz_code_db/crash-offset-past-path-bytes): an offset past the end
  // of 'path_bytes' followed by a smaller one was read from before the decrease was noticed.
  refused("offsets_past_end", [](Entries& e, Metadata&) {
    auto& o = entry_named(e, "path_offsets");
    const int64_t past = 1000;
    std::memcpy(o.bytes.data() + 8, &past, 8);  // offsets 0, 13, 40, 40 become 0, 1000, 40, 40
  }, "tensor 'path_offsets' entry 1 (1000) runs past the 40 bytes of 'path_bytes'");
  refused("labels_rows", [](Entries& e, Metadata&) {
    auto& l = entry_named(e, "labels");
    l.shape = {2, 3};
  }, "tensor 'labels' is (2,3), but 3 codes need (3, K)");
  refused("labels_value", [](Entries& e, Metadata&) { entry_named(e, "labels").bytes[5] = 7; },
          "label 1 of image 2 is 7; labels are 0 or 1");
  refused("unknown", [](Entries& e, Metadata&) { e.push_back({"extra", "U8", {1}, {0}}); },
          "holds an unknown tensor 'extra'");
  refused("no_checkpoint", [](Entries&, Metadata& m) { m.erase("checkpoint"); }, "has no \"checkpoint\" metadata");
  // and damage below the code database: the safetensors reader's own checks
  const std::string truncated = temp_path("truncated.safetensors").string();
  std::vector<uint8_t> bytes = io::read_file(good);
  bytes.resize(bytes.size() - 1);
  std::ofstream(truncated, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  CHECK_THROWS_WITH_AS(read_code_database(truncated), doctest::Contains(truncated.c_str()), Error);
}

TEST_CASE("nearest ranks by distance with ties by index; within_radius returns exactly the items within r") {
  // distances to the query 0000:  4     1     0     2     1     0
  const PackedCodes database = codes_of({"1111", "0001", "0000", "0011", "1000", "0000"});
  const PackedCodes query = codes_of({"0000"});
  const auto indices = [](const std::vector<Match>& matches) {
    std::vector<int32_t> out;
    for (const Match& m : matches) out.push_back(m.index);
    return out;
  };
  const std::vector<Match> all = nearest(database, query, 0, 100);
  CHECK(indices(all) == std::vector<int32_t>{2, 5, 1, 4, 3, 0});
  std::vector<int> distances;
  for (const Match& m : all) distances.push_back(m.distance);
  CHECK(distances == std::vector<int>{0, 0, 1, 1, 2, 4});
  CHECK(indices(nearest(database, query, 0, 3)) == std::vector<int32_t>{2, 5, 1});
  CHECK(nearest(database, query, 0, 0).empty());
  CHECK(indices(within_radius(database, query, 0, 0)) == std::vector<int32_t>{2, 5});
  CHECK(indices(within_radius(database, query, 0, 1)) == std::vector<int32_t>{2, 5, 1, 4});
  CHECK(indices(within_radius(database, query, 0, 3)) == std::vector<int32_t>{2, 5, 1, 4, 3});
  CHECK(indices(within_radius(database, query, 0, 4)) == std::vector<int32_t>{2, 5, 1, 4, 3, 0});
  CHECK_THROWS_WITH_AS(within_radius(database, query, 0, -1), doctest::Contains("radius must be >= 0"), Error);

  // random 70-bit codes: for every radius, exactly the set {i : hamming <= r}, in ranking order
  Rng rng(3);
  const Tensor u = Tensor::randn({300, 70}, rng), q = Tensor::randn({1, 70}, rng);
  const PackedCodes many = pack_codes(u), one = pack_codes(q);
  const std::vector<int32_t> ranking = rank(many, one, 0);
  for (int r = 0; r <= 70; r += 5) {
    CAPTURE(r);
    std::set<int32_t> expected;
    for (int64_t i = 0; i < many.count; ++i)
      if (hamming(many, i, one, 0) <= r) expected.insert(static_cast<int32_t>(i));
    const std::vector<int32_t> found = indices(within_radius(many, one, 0, r));
    CHECK(std::set<int32_t>(found.begin(), found.end()) == expected);
    CHECK(found == std::vector<int32_t>(ranking.begin(), ranking.begin() + found.size()));
  }
}

TEST_CASE("load_model_checkpoint rebuilds the model train_mdff saved and reproduces its outputs exactly") {
  const std::vector<std::pair<std::string, std::vector<double>>> variants{{"all", {1, 0.5}}, {"convs", {1}}, {"fc1", {1, 0.5}}};
  for (const auto& variant : variants) {
    // CAPTURE captures in a lambda, which in C++17 cannot name a structured binding.
    const std::string& taps = variant.first;
    const std::vector<double>& scales = variant.second;
    CAPTURE(taps);
    const std::string path = temp_path("tiny_" + taps + ".safetensors").string();
    // training state a later change will store is skipped
    const auto saved = save_tiny_checkpoint(path, tiny_config(3, taps, scales), 12, 7,
                                            {{"optimizer.momentum.hash.weight", Tensor::zeros({2})},
                                             {"trainer.step", Tensor::zeros({1}, DType::I32)}});
    const LoadedCheckpoint loaded = load_model_checkpoint(path);
    CHECK(loaded.classes == 3);
    CHECK(loaded.backbone == "tiny");
    CHECK(loaded.batch.image_size == 32);
    CHECK_FALSE(loaded.batch.crop_mode);  // a config without "resize" and "crop" (a run from before them)
    CHECK_FALSE(loaded.batch.train);
    CHECK_FALSE(loaded.model->is_training());
    CHECK(loaded.model->config().bits == 12);
    CHECK(loaded.model->config().scales == scales);
    CHECK(taps_name(loaded.model->config().taps) == taps);

    Rng rng(11);
    const Tensor images = Tensor::randn({3, 3, 32, 32}, rng);
    NoGradGuard no_grad;
    const MdffOutput expected = saved->forward(images), got = loaded.model->forward(images);
    CHECK(got.u.to_vector() == expected.u.to_vector());
    CHECK(got.logits.to_vector() == expected.logits.to_vector());
    // the same seed as the loader's own initialisation would not pass by chance: a fresh model differs
    Rng other(0);
    MdffSh fresh(loaded.model->config(), other);
    fresh.eval();
    CHECK(fresh.forward(images).u.to_vector() != expected.u.to_vector());
  }
  // crop mode (train_mdff --resize 40 --crop 32): the loaded options give the centre crop
  json cropped = tiny_config(3, "all", {1});
  cropped["resize"] = 40;
  cropped["crop"] = 32;
  const std::string path = temp_path("tiny_crop.safetensors").string();
  save_tiny_checkpoint(path, cropped, 8, 7);
  const LoadedCheckpoint loaded = load_model_checkpoint(path);
  CHECK(loaded.batch.crop_mode);
  CHECK(loaded.batch.resize == 40);
  CHECK(loaded.batch.crop == 32);
  CHECK_FALSE(loaded.batch.train);
}

TEST_CASE("load_model_checkpoint names what is missing or does not match") {
  const std::string good = temp_path("good_checkpoint.safetensors").string();
  save_tiny_checkpoint(good, tiny_config(3, "all", {1, 0.5}), 8, 5);
  using Entries = std::vector<io::SafetensorsEntry>;
  using Metadata = std::map<std::string, std::string>;
  const auto refused = [&](const std::string& name, auto change, const std::string& message) {
    CAPTURE(name);
    const std::string path = damaged_copy(good, name + ".safetensors", change);
    CHECK_THROWS_WITH_AS(load_model_checkpoint(path), doctest::Contains(message.c_str()), Error);
    CHECK_THROWS_WITH_AS(load_model_checkpoint(path), doctest::Contains(path.c_str()), Error);
  };
  const auto set_config = [](const std::string& key, const json& value) {
    return [=](Entries&, Metadata& m) {
      json config = json::parse(m["config"]);
      if (value.is_null()) config.erase(key);
      else config[key] = value;
      m["config"] = config.dump();
    };
  };
  refused("no_config", [](Entries&, Metadata& m) { m.erase("config"); }, "the checkpoint has no \"config\" metadata");
  refused("no_bits", [](Entries&, Metadata& m) { m.erase("bits"); }, "the checkpoint has no \"bits\" metadata");
  refused("bad_bits", [](Entries&, Metadata& m) { m["bits"] = "eight"; }, "\"bits\" metadata is 'eight'");
  refused("config_json", [](Entries&, Metadata& m) { m["config"] = "{"; }, "\"config\" metadata is not valid JSON");
  refused("no_image_size", set_config("image_size", nullptr), "metadata has no \"image_size\"");
  refused("no_model", set_config("model", nullptr), "metadata has no \"model\"");
  refused("model_kind", set_config("model", 50), "\"model\" in the checkpoint's \"config\" metadata is 50, not a string");
  refused("unknown_model", set_config("model", "vgg"), "unknown model 'vgg'");
  refused("bad_taps", set_config("taps", "some"), "unknown taps 'some'");
  refused("bad_scales", set_config("scales", json::array({1, "half"})), "\"scales\" in the checkpoint's \"config\" "
          "metadata holds \"half\"");
  refused("classes", set_config("classes", 0), "\"classes\" in the checkpoint's \"config\" metadata is 0");
  refused("crop_kind", set_config("crop", "224"), "\"crop\" in the checkpoint's \"config\" metadata is \"224\"");
  refused("crop_alone", set_config("crop", 32), "has \"resize\" 0 and \"crop\" 32; crop mode needs 1 <= crop <= resize");
  refused("crop_too_big", [&](Entries& e, Metadata& m) {
    set_config("resize", 24)(e, m);
    set_config("crop", 32)(e, m);
  }, "has \"resize\" 24 and \"crop\" 32");
  refused("missing", [](Entries& e, Metadata&) {
    e.erase(std::find_if(e.begin(), e.end(), [](const auto& x) { return x.name == "hash.weight"; }));
  }, "the checkpoint has no tensor 'hash.weight', which a tiny MDFF-SH (8 bits, 3 classes, taps all) needs");
  refused("missing_buffer", [](Entries& e, Metadata&) {
    e.erase(std::find_if(e.begin(), e.end(), [](const auto& x) { return x.name == "backbone.bn1.running_var"; }));
  }, "no tensor 'backbone.bn1.running_var'");
  refused("other_bits", [](Entries&, Metadata& m) { m["bits"] = "16"; },
          "tensor 'classifier.weight' has shape (3,8) in the checkpoint, but a tiny MDFF-SH (16 bits, 3 classes, "
          "taps all) needs (3,16)");
  refused("other_taps", set_config("taps", "fc1"), "the checkpoint holds the tensor 'lateral3.weight', which a tiny MDFF-SH "
          "(8 bits, 3 classes, taps fc1) does not have");
  refused("extra", [](Entries& e, Metadata&) { e.push_back({"head.weight", "F32", {1}, {0, 0, 0, 0}}); },
          "holds the tensor 'head.weight'");
  // Metadata describing a model far beyond train_mdff's limits is refused before the model is built
  // (2147483647 classes made the loader allocate 64 GB for the classifier).
  refused("huge_classes", set_config("classes", 2147483647),
          "\"classes\" in the checkpoint's \"config\" metadata is 2147483647, not in 1..10000");
  refused("huge_bits", [](Entries&, Metadata& m) { m["bits"] = "1000000000"; },
          "\"bits\" metadata is '1000000000', not a code length in 1..1024");
  refused("huge_image_size", set_config("image_size", 100000), "\"image_size\" in the checkpoint's \"config\" "
          "metadata is 100000, not in 1..1024");
  refused("huge_scale", set_config("scales", json::array({1, 1e9})), "\"scales\" in the checkpoint's \"config\" "
          "metadata holds 1000000000.0, not a number in (0, 4]");
}

TEST_CASE("mdff_search: bad options exit 2 with the reason") {
  for (const std::string& arguments :
       {std::string(""), std::string("search"), std::string("index --checkpoint c --out d"),
        std::string("index --checkpoint c --out d --folder f --list l"), std::string("query --db d"),
        std::string("query --db d x.png --top-k 3 --radius 1"), std::string("bench --codes 0"),
        std::string("index --checkpoint c --out d --folder f --classes 3"),
        std::string("index --checkpoint c --out d --folder f --device gpu"),
        std::string("query --db d x.png --precision half")}) {
    CAPTURE(arguments);
    const Run r = run(arguments);
    CHECK(r.exit_code == 2);
    CHECK(!r.output.empty());
  }
  const Run help = run("query --help");
  CHECK(help.exit_code == 0);
  CHECK(help.output.find("--radius") != std::string::npos);
}

TEST_CASE("mdff_search end to end: index a folder and an image list, query, JSON, grid and bench") {
  const fs::path root = temp_path("end_to_end");
  const fs::path images = root / "images";
  fs::create_directories(images / "sub");
  std::vector<std::string> paths;  // the indexed files, in the order index sorts them
  for (int i = 0; i < 7; ++i) {
    const std::vector<uint8_t> rgb = picture(i);
    const fs::path file = images / (i % 2 ? "sub" : ".") / ("img" + std::to_string(i) + (i == 5 ? ".BMP" : ".png"));
    if (i == 5) REQUIRE(stbi_write_bmp(file.c_str(), 24, 24, 3, rgb.data()));
    else REQUIRE(stbi_write_png(file.c_str(), 24, 24, 3, rgb.data(), 24 * 3));
    paths.push_back(fs::absolute(file).lexically_normal().string());
  }
  std::ofstream(images / "notes.txt") << "not an image\n";
  std::sort(paths.begin(), paths.end());
  const std::string checkpoint = (root / "checkpoint_32bits.safetensors").string();
  save_tiny_checkpoint(checkpoint, tiny_config(2, "all", {1, 0.5}), 32, 1);

  // index a folder
  const std::string db_path = (root / "db.safetensors").string();
  const Run indexed = run("index --checkpoint " + checkpoint + " --out " + db_path + " --folder " + images.string());
  INFO(indexed.output);
  REQUIRE(indexed.exit_code == 0);
  const CodeDatabase db = read_code_database(db_path);
  CHECK(db.paths == paths);
  CHECK(db.codes.bits == 32);
  CHECK(db.classes == 0);
  CHECK(db.checkpoint == fs::absolute(checkpoint).lexically_normal().string());
  CHECK(db.checkpoint_crc32 == file_crc32(checkpoint));
  const std::set<uint64_t> distinct(db.codes.data.begin(), db.codes.data.end());  // 32 bits: one word a code
  REQUIRE_MESSAGE(distinct.size() == paths.size(), "two images share a code, so a query's own image is not alone at "
                  "distance 0: change the checkpoint's seed");

  // --out is checked before any encoding: a database is replaced, the checkpoint, a folder or another file not
  // (index overwrote whatever --out named, its own checkpoint included)
  const Run again = run("index --checkpoint " + checkpoint + " --out " + db_path + " --folder " + images.string());
  CHECK(again.exit_code == 0);
  CHECK(again.output.find("holds a code database; it will be replaced") != std::string::npos);
  CHECK(read_code_database(db_path).paths == paths);
  const std::vector<uint8_t> checkpoint_bytes = io::read_file(checkpoint);
  std::ofstream(root / "notes.txt") << "keep me\n";
  const std::pair<std::string, std::string> refused_outputs[] = {
      {checkpoint, "is the checkpoint (--checkpoint)"},
      {images.string(), "is a folder: name the database file to write"},
      {(root / "notes.txt").string(), "exists and is not a code database that index may replace"},
      {(root / "new_folder").string() + "/", "names a folder: name the database file to write"},
      {(root / "notes.txt").string() + "/codes.db", "notes.txt is a file, not a folder"}};
  for (const auto& entry : refused_outputs) {
    const std::string& out = entry.first;  // CAPTURE cannot name a structured binding (C++17)
    CAPTURE(out);
    const Run r = run("index --checkpoint " + checkpoint + " --out " + out + " --folder " + images.string());
    CHECK(r.exit_code == 2);  // a usage error, found before the work
    CHECK(r.output.find(entry.second) != std::string::npos);
    CHECK(r.output.find("encoding") == std::string::npos);
  }
  CHECK(io::read_file(checkpoint) == checkpoint_bytes);
  CHECK(io::read_file((root / "notes.txt").string()).size() == 8);

  // a query image cut short is refused, naming it (a BMP was decoded with its missing rows black)
  const std::string cut_bmp = (root / "cut.bmp").string();
  {
    std::vector<uint8_t> bytes = io::read_file(images / "sub" / "img5.BMP");
    bytes.resize(100);
    std::ofstream(cut_bmp, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  }
  const Run cut = run("query --db " + db_path + " " + cut_bmp);
  CHECK(cut.exit_code == 1);
  CHECK(cut.output.find(cut_bmp + ": cannot decode the image") != std::string::npos);
  CHECK(cut.output.find("it is truncated or damaged") != std::string::npos);

  // query with the last indexed image (the last of any ties) and the first
  const std::string query_image = paths.back();
  const std::string json_path = (root / "results.json").string(), grid_path = (root / "grid.png").string();
  const Run queried = run("query --db " + db_path + " --checkpoint " + checkpoint + " " + query_image + " " +
                          paths.front() + " --top-k 4 --json " + json_path + " --grid " + grid_path);
  INFO(queried.output);
  REQUIRE(queried.exit_code == 0);
  const json report = json::parse(std::ifstream(json_path));
  REQUIRE(report["queries"].size() == 2);
  for (int q = 0; q < 2; ++q) {
    CAPTURE(q);
    const std::vector<TextResult> text = text_results(queried.output, q + 1);
    const json& results = report["queries"][q]["results"];
    REQUIRE(text.size() == 4);
    REQUIRE(results.size() == 4);
    for (size_t r = 0; r < text.size(); ++r) {
      CHECK(results[r]["rank"] == text[r].rank);
      CHECK(results[r]["distance"] == text[r].distance);
      CHECK(results[r]["index"] == text[r].index);
      CHECK(results[r]["path"] == text[r].path);
      CHECK(text[r].labels == "-");
      CHECK(text[r].path == db.paths[text[r].index]);
      if (r > 0) CHECK(text[r].distance >= text[r - 1].distance);
    }
  }
  CHECK(report["queries"][0]["image"] == query_image);
  CHECK(report["queries"][0]["results"][0]["path"] == query_image);
  CHECK(report["queries"][0]["results"][0]["distance"] == 0);
  CHECK(report["queries"][1]["results"][0]["path"] == paths.front());
  CHECK(report["top_k"] == 4);
  CHECK(fs::file_size(grid_path) > 0);

  // --radius: every item within r, checked against the codes in the database
  const int radius = report["queries"][0]["results"][2]["distance"].get<int>();
  const Run within = run("query --db " + db_path + " " + query_image + " --radius " + std::to_string(radius) +
                         " --json " + json_path);
  INFO(within.output);
  REQUIRE(within.exit_code == 0);
  const json radius_report = json::parse(std::ifstream(json_path));
  const int64_t query_index = std::find(paths.begin(), paths.end(), query_image) - paths.begin();
  std::set<int64_t> expected, found;
  for (int64_t i = 0; i < db.codes.count; ++i)
    if (hamming(db.codes, i, db.codes, query_index) <= radius) expected.insert(i);
  for (const json& result : radius_report["queries"][0]["results"]) found.insert(result["index"].get<int64_t>());
  CHECK(found == expected);
  CHECK(radius_report["radius"] == radius);

  // another checkpoint is refused: its codes would not be comparable
  const std::string other = (root / "other.safetensors").string();
  save_tiny_checkpoint(other, tiny_config(2, "all", {1, 0.5}), 32, 2);
  const Run wrong = run("query --db " + db_path + " --checkpoint " + other + " " + query_image);
  CHECK(wrong.exit_code == 1);
  CHECK(wrong.output.find("cannot be compared") != std::string::npos);

  // the checkpoint moved since indexing: the error names where the database says it was, and --checkpoint
  // finds it
  const std::string moved = (root / "moved.safetensors").string();
  fs::rename(checkpoint, moved);
  const Run lost = run("query --db " + db_path + " " + query_image);
  CHECK(lost.exit_code == 1);
  CHECK(lost.output.find("was indexed with the checkpoint " + db.checkpoint + ", which is no longer there: if it has "
                         "moved, pass --checkpoint PATH") != std::string::npos);
  CHECK(run("query --db " + db_path + " " + query_image + " --checkpoint " + moved).exit_code == 0);
  fs::rename(moved, checkpoint);

  // the device: cpu gives the same results as the default here; cuda without a GPU names the reason
  const Run on_cpu = run("query --db " + db_path + " " + query_image + " --radius " + std::to_string(radius) +
                         " --json " + json_path + " --device cpu --precision fp32");
  CHECK(on_cpu.exit_code == 0);
  CHECK(on_cpu.output == within.output);
  std::string why_no_gpu;
  if (!cuda_available(&why_no_gpu)) {
    for (const std::string& arguments : {"query --db " + db_path + " " + query_image + " --device cuda",
                                         std::string("bench --codes 100 --queries 2 --device cuda")}) {
      CAPTURE(arguments);
      const Run on_cuda = run(arguments);
      CHECK(on_cuda.exit_code == 2);  // a usage error, as in train_mdff
      CHECK(on_cuda.output.find("--device cuda: " + why_no_gpu) != std::string::npos);
      CHECK(on_cuda.output.find("Run with --help for more information.") != std::string::npos);
    }
  }

  // an image list keeps its labels; a query that is in the database is judged by them
  const fs::path list = root / "list.txt";
  {
    std::ofstream out(list);
    for (size_t i = 0; i < paths.size(); ++i)
      out << fs::relative(paths[i], root).string() << (i % 2 ? " 1 0" : " 0 1") << "\n";
  }
  const std::string list_db = (root / "list_db.safetensors").string();
  const Run list_indexed = run("index --checkpoint " + checkpoint + " --out " + list_db + " --list " + list.string());
  INFO(list_indexed.output);
  REQUIRE(list_indexed.exit_code == 0);
  const CodeDatabase labelled = read_code_database(list_db);
  CHECK(labelled.classes == 2);
  CHECK(labelled.paths == paths);
  CHECK(labelled.codes.data == db.codes.data);  // the same images, the same codes
  const Run judged = run("query --db " + list_db + " " + paths[1] + " --top-k 7 --json " + json_path + " --grid " + grid_path);
  INFO(judged.output);
  REQUIRE(judged.exit_code == 0);
  const json judged_report = json::parse(std::ifstream(json_path));
  const json& entry = judged_report["queries"][0];
  CHECK(entry["labels"] == json::array({0}));
  CHECK(entry["database_index"] == 1);
  for (const json& result : entry["results"]) {
    const int64_t i = result["index"].get<int64_t>();
    CHECK(result["labels"] == json::array({i % 2 ? 0 : 1}));
    CHECK(result["relevant"] == (i % 2 == 1));
  }
  const std::vector<TextResult> judged_text = text_results(judged.output, 1);
  REQUIRE(judged_text.size() == 7);
  CHECK(judged_text[0].labels == (judged_text[0].index % 2 ? "0" : "1"));

  // bench on small sizes, with NumPy when there is one, and without
  const std::string bench_json = (root / "bench.json").string();
  const Run bench = run("bench --codes 3000 --bits 70 --queries 4 --top-k 10 --json " + bench_json);
  INFO(bench.output);
  REQUIRE(bench.exit_code == 0);
  const json bench_report = json::parse(std::ifstream(bench_json));
  CHECK(bench_report["codes"] == 3000);
  CHECK(bench_report["mdff"]["queries_top_k_s"].get<double>() >= bench_report["mdff"]["queries_distances_s"].get<double>());
  if (bench_report["numpy"].is_null()) {
    MESSAGE("NumPy was not found: ", bench_report["numpy_skipped"].get<std::string>());
  } else {
    CHECK(bench_report["agree"] == true);
    CHECK(bench_report["ratio"].contains("queries_top_k_s"));
  }
  const Run no_python = run("bench --codes 100 --queries 2 --python /nonexistent/python3");
  CHECK(no_python.exit_code == 0);
  CHECK(no_python.output.find("NumPy comparison skipped: /nonexistent/python3 does not exist") != std::string::npos);
  // a --python without a '/' is looked for on PATH, as a shell would: here a Python without NumPy
  const fs::path bin = root / "bin";
  fs::create_directories(bin);
  std::ofstream(bin / "fakepython") << "#!/bin/sh\nexit 1\n";
  fs::permissions(bin / "fakepython", fs::perms::owner_all);
  const Run on_path = test::run_program("PATH=" + bin.string() + ":\"$PATH\" " + test::program(MDFF_SEARCH_BINARY),
                                        "bench --codes 100 --queries 2 --python fakepython");
  CHECK(on_path.exit_code == 0);
  CHECK(on_path.output.find("NumPy comparison skipped: " + (bin / "fakepython").string() + " cannot import numpy") !=
        std::string::npos);
  const Run not_on_path = run("bench --codes 100 --queries 2 --python mdff-no-such-python");
  CHECK(not_on_path.exit_code == 0);
  CHECK(not_on_path.output.find("NumPy comparison skipped: mdff-no-such-python was not found on PATH") !=
        std::string::npos);
}

// Found by a user: with a checkpoint trained at --image-size 16, mdff_walkthrough showed the 16x16 batch's
// pixel (16,16), read past its end. It shows each one's centre pixel, checked here against the same batch.
TEST_CASE("mdff_walkthrough on a checkpoint of image size 16 shows the batch's own centre pixel") {
  const std::string walkthrough = test::program(MDFF_WALKTHROUGH_BINARY);
  const fs::path root = temp_path("walkthrough");
  const fs::path data = test::make_dataset(root / "data", 400);  // 600 images a class: the split takes 100 + 500
  json config = tiny_config(10, "all", {1});
  config["image_size"] = 16;
  const std::string checkpoint = (root / "checkpoint_8bits.safetensors").string();
  save_tiny_checkpoint(checkpoint, config, 8, 1);
  const Run r = test::run_program(walkthrough, "--checkpoint " + checkpoint + " --data-dir " + data.string() +
                                                   " --database 20");
  INFO(r.output);
  REQUIRE(r.exit_code == 0);

  const data::Dataset d = data::load_fashion_mnist(data.string());
  const int64_t row = data::make_split(d, "paper", 0).query[0];
  Rng unused(0);
  const Tensor images = data::make_batch(d, {row}, {0}, load_model_checkpoint(checkpoint).batch, unused).images;
  REQUIRE(images.shape() == Shape{1, 3, 16, 16});
  std::string expected = "centre pixel: raw (16,16) " + std::to_string(d.image(row)[16 * 32 + 16]) + " -> batch (8,8)";
  for (int c = 0; c < 3; ++c) {
    char value[16];
    std::snprintf(value, sizeof value, " %+.4f", images.data<float>()[(c * 16 + 8) * 16 + 8]);
    expected += value;
  }
  CHECK(r.output.find(expected) != std::string::npos);
}
