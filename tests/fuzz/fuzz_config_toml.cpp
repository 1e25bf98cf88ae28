// Fuzz target: train_mdff's --config FILE (CLI11's TOML reader, into every option train::add_options
// defines), then what train_mdff's main does next with the options: --resume's check of a run folder or the
// recipe's defaults, and the option lists (--bits, --scales). CLI::ParseError, mdff::Error and
// std::filesystem::filesystem_error are the errors main reports (status 2).
#include <filesystem>

#include "apps/train_options.h"
#include "core/error.h"
#include "tests/fuzz/fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = mdff::fuzz::write_input("config.toml", data, size);
  mdff::train::Options o;
  CLI::App app;
  mdff::train::add_options(app, o);
  const char* const argv[] = {"train_mdff", "--config", path.c_str()};
  try {
    app.parse(3, argv);
  } catch (const CLI::ParseError&) {
    return 0;
  }
  try {
    if (!o.resume.empty()) {
      o = mdff::train::resumed_options(o, app);
    } else {
      mdff::train::resolve_defaults(o);
    }
    mdff::train::options_json(o);
  } catch (const mdff::Error&) {
  } catch (const std::filesystem::filesystem_error&) {  // a path the system cannot look up: main's usage error too
  }
  return 0;
}
