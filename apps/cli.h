// Command-line parsing shared by the programs (CLI11): --help exits 0, any bad option or value prints
// the reason and exits 2, as command-line tools conventionally do.
#pragma once
#include <CLI/CLI.hpp>

#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "core/backend.h"
#include "core/error.h"

namespace mdff::cli {

// The device a --device value names: cpu, cuda (an error with the reason when no GPU is usable) or auto
// (the GPU when one is usable).
inline Device choose_device(const std::string& name) {
  std::string why;
  if (name == "cpu") return Device::CPU;
  if (name == "cuda") {
    MDFF_CHECK(cuda_available(&why), "--device cuda: ", why);
    return Device::CUDA;
  }
  MDFF_CHECK(name == "auto", "unknown --device '", name, "': use auto, cpu or cuda");
  return cuda_available(&why) ? Device::CUDA : Device::CPU;
}

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

// "12,24,32,48" or "1,0.5" as numbers; an item that is not a number throws an mdff::Error naming
// `option` and an example.
template <class T>
std::vector<T> parse_list(const std::string& text, const char* option) {
  static_assert(std::is_same_v<T, int> || std::is_same_v<T, double>);
  std::vector<T> values;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) {
    size_t used = 0;
    try {
      values.push_back(std::is_same_v<T, int> ? static_cast<T>(std::stoi(item, &used)) : static_cast<T>(std::stod(item, &used)));
    } catch (const std::exception&) {
      used = 0;
    }
    MDFF_CHECK(used > 0 && used == item.size(), option, ": '", item, "' is not ",
               std::is_same_v<T, int> ? "a whole number (write e.g. 12,24,32,48)" : "a number (write e.g. 1,0.5)");
  }
  MDFF_CHECK(!values.empty(), option, ": give at least one value");
  return values;
}

}  // namespace mdff::cli
