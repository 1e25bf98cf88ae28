// train_mdff's options read back from a run's config.json (--resume): every value of the wrong type or
// out of its option's range is an error naming the option, never a cast with undefined behaviour.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include "apps/train_options.h"
#include "core/error.h"

using namespace mdff;
using json = nlohmann::json;

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
