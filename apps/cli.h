// Command-line parsing shared by the programs (CLI11): --help exits 0, any bad option or value prints
// the reason and exits 2, as command-line tools conventionally do.
#pragma once
#include <CLI/CLI.hpp>

#include <optional>

namespace mdff::cli {

// Parses argv into `app`. Returns the exit code when the program should stop now (help or error).
inline std::optional<int> parse(CLI::App& app, int argc, char** argv) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);  // prints help or the error
    return code == 0 ? 0 : 2;
  }
  return std::nullopt;
}

}  // namespace mdff::cli
