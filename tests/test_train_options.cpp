// train_mdff's options read back from a run's config.json (--resume): every value of the wrong type or
// out of its option's range is an error naming the option, never a cast with undefined behaviour.
#include <doctest/doctest.h>
#include "tests/doctest_text.h"

#include <nlohmann/json.hpp>

#include <filesystem>

#include "apps/train_options.h"
#include "core/error.h"

using namespace mdff;
using json = nlohmann::json;
namespace fs = std::filesystem;

TEST_CASE("config.json: the options come back as written; an integer option must be a JSON integer in range") {
  train::Options written;
  train::resolve_defaults(written);
  const json config = train::options_json(written);
  const train::Options read = train::options_from_json(config, "config.json");
  CHECK(read.epochs == written.epochs);
  CHECK(read.batch_size == written.batch_size);
  CHECK(read.bits == written.bits);
  CHECK(cli::parse_list<double>(read.scales, "--scales") == cli::parse_list<double>(written.scales, "--scales"));
  // Found by fuzz_config_json: nlohmann::json casts these to an integer with undefined behaviour.
  const std::pair<const char*, json> damaged[] = {{"epochs", 1e300}, {"seed", -1.5}, {"epochs", -1.5},
                                                  {"batch_size", "64"}, {"shift", json::array()}};
  for (const auto& entry : damaged) {
    // CAPTURE captures in a lambda, which in C++17 cannot name a structured binding.
    const char* const key = entry.first;
    const json& value = entry.second;
    CAPTURE(key);
    CAPTURE(value.dump());
    json bad = config;
    bad[key] = value;
    const std::string expected = std::string("option '") + key + "'";
    CHECK_THROWS_WITH_AS(train::options_from_json(bad, "config.json"), doctest::Contains(expected.c_str()), Error);
  }
}

TEST_CASE("the defaults name the dataset's folder, so config.json holds every effective option") {
  train::Options fashion, cifar, list;
  cifar.dataset = "cifar10";
  list.dataset = "images/list.txt";
  for (train::Options* o : {&fashion, &cifar, &list}) train::resolve_defaults(*o);
  CHECK(fashion.data_dir == "/usr/share/datasets/fashion-mnist");
  CHECK(cifar.data_dir == (fs::current_path() / "data/cifar-10-batches-bin").string());  // absolute: --resume anywhere
  CHECK(list.data_dir.empty());  // an image list's paths are relative to --list-root
  train::Options given;
  given.data_dir = "elsewhere";
  train::resolve_defaults(given);
  CHECK(given.data_dir == (fs::current_path() / "elsewhere").string());
  CHECK(list.dataset == (fs::current_path() / "images/list.txt").string());
}

TEST_CASE("number lists: every item a number, none empty, doubles finite") {
  CHECK(cli::parse_list<int>("12,24,32,48", "--bits") == std::vector<int>{12, 24, 32, 48});
  CHECK(cli::parse_list<double>("1,0.5", "--scales") == std::vector<double>{1, 0.5});
  CHECK(cli::list_problem<int>("8").empty());
  const std::pair<const char*, const char*> bad_ints[] = {
      {"", "give at least one value"}, {"8,", "'8,' has an empty item"}, {",8", "',8' has an empty item"},
      {"8,,16", "has an empty item"},  {"8.5", "'8.5' is not a whole number"}, {"x", "'x' is not a whole number"},
      {"99999999999", "is not a whole number"}};
  for (const auto& entry : bad_ints) {
    const std::string text = entry.first, problem = cli::list_problem<int>(text);
    CAPTURE(text);
    CHECK(problem.find(entry.second) != std::string::npos);
    CHECK_THROWS_WITH_AS(cli::parse_list<int>(text, "--bits"), doctest::Contains("--bits: "), Error);
  }
  for (const char* text : {"1,nan", "inf", "1e999", "1,", "0.5x"}) {
    CAPTURE(text);
    CHECK_FALSE(cli::list_problem<double>(text).empty());
  }
}

TEST_CASE("option checks: finite numbers with a lower bound, 64-bit seeds") {
  auto problem = [](const CLI::Validator& check, std::string text) { return check(text); };
  const CLI::Validator positive = cli::finite_number(0, true), non_negative = cli::finite_number(0, false);
  CHECK(problem(positive, "0.001").empty());
  CHECK(problem(positive, "1e-5").empty());
  CHECK(problem(non_negative, "0").empty());
  CHECK(problem(positive, "0") == "0 is too small: give a number above 0");
  CHECK(problem(non_negative, "-1") == "-1 is too small: give a number of at least 0");
  for (const char* text : {"nan", "NaN", "inf", "-inf", "1e999"}) {
    CAPTURE(text);
    CHECK(problem(non_negative, text).find("is not a finite number") != std::string::npos);
  }
  for (const char* text : {"", "abc", "1.5x", "0x"}) {
    CAPTURE(text);
    CHECK(problem(positive, text).find("is not a number") != std::string::npos);
  }
  // CLI11 reads integers in base 0: the transforms hand it base-10 text without leading zeros
  const CLI::Validator epochs = cli::whole_number(1, 100);
  std::string text = "010";
  CHECK(epochs(text).empty());
  CHECK(text == "10");
  for (const char* bad : {"0", "101", "-3", "1.5", "0x10", "", "-", "99999999999999999999"}) {
    std::string value = bad;
    CAPTURE(value);
    CHECK_FALSE(epochs(value).empty());
  }
  CHECK(problem(cli::whole_number(-5, 5), "-05").empty());
  const CLI::Validator seed = cli::unsigned_64();
  std::string seed_text = "0010";
  CHECK(seed(seed_text).empty());
  CHECK(seed_text == "10");
  CHECK(problem(seed, "0").empty());
  CHECK(problem(seed, "18446744073709551615").empty());
  for (const char* text : {"-1", "18446744073709551616", "99999999999999999999", "", "1.5", "+3", " 3"}) {
    CAPTURE(text);
    CHECK_FALSE(problem(seed, text).empty());
  }
}

TEST_CASE("an Error's reason is its message without the failed check and where") {
  const int limit = 3;
  try {
    MDFF_CHECK(limit > 4, "--epochs ", limit, " is too few");
    FAIL("MDFF_CHECK did not throw");
  } catch (const Error& e) {
    CHECK(std::string(e.reason()) == "--epochs 3 is too few");
    CHECK(std::string(e.what()).find("--epochs 3 is too few [check `limit > 4` failed at ") == 0);
  }
  CHECK(std::string(Error("plain").reason()) == "plain");
}
