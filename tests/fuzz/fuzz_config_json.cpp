// Fuzz target: train_mdff --resume RUN, which reads the run's config.json back into the options
// (train::options_from_json) and compares them with those given on the command line (here --epochs 3, so
// the comparison runs too).
#include "apps/train_options.h"
#include "core/error.h"
#include "tests/fuzz/fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static mdff::train::Options given;
  static CLI::App app;
  static const bool parsed = [] {
    mdff::train::add_options(app, given);
    const char* const argv[] = {"train_mdff", "--epochs", "3"};
    app.parse(3, argv);
    given.resume = (mdff::fuzz::scratch() / "run").string();
    return true;
  }();
  (void)parsed;
  mdff::fuzz::write_input("run/config.json", data, size);
  try {
    mdff::train::resumed_options(given, app);
  } catch (const mdff::Error&) {
  }
  return 0;
}
