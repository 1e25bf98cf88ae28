// Command-line parsing shared by the programs (CLI11): --help exits 0, any bad option or value prints
// the reason and exits 2, as command-line tools conventionally do.
#pragma once
#include <CLI/CLI.hpp>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <optional>
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

// Parses argv into `app`. Returns the exit code when the program should stop now: 0 after --help, 2 after
// a bad option or value, printed as "program: reason" and the --help hint (as the programs' own usage errors).
inline std::optional<int> parse(CLI::App& app, int argc, char** argv) {
  const std::string program = std::filesystem::path(argv[0]).filename().string();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ConfigError& e) {  // CLI11 says "INI was not able to parse epoch" for a misspelt key
    std::fprintf(stderr, "%s: --config: %s: each line is `option = value`, the option one of --help's without its "
                 "dashes (e.g. epochs = 10)\nRun with --help for more information.\n", program.c_str(), e.what());
    return 2;
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help: prints it
    std::fprintf(stderr, "%s: %s\nRun with --help for more information.\n", program.c_str(), e.what());
    return 2;
  }
  return std::nullopt;
}

// Reads `text` as a list of numbers ("12,24,32,48" or "1,0.5") into `values` (when not null). Returns what is
// wrong with it, or "" when nothing is: an empty list, an empty item ("8," or "8,,16"), an item that is not a
// number, or (for double) not finite.
template <class T>
std::string read_list(const std::string& text, std::vector<T>* values) {
  static_assert(std::is_same_v<T, int> || std::is_same_v<T, double>);
  const char* example = std::is_same_v<T, int> ? " (write e.g. 12,24,32,48)" : " (write e.g. 1,0.5)";
  if (text.empty()) return detail::concat("give at least one value", example);
  for (size_t start = 0;;) {
    const size_t comma = text.find(',', start);
    const std::string item = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    size_t used = 0;
    T value = 0;
    try {
      if constexpr (std::is_same_v<T, int>) value = std::stoi(item, &used);
      else value = std::stod(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (item.empty()) return detail::concat("'", text, "' has an empty item", example);
    if (used == 0 || used != item.size() || !std::isfinite(static_cast<double>(value)))
      return detail::concat("'", item, "' is not ", std::is_same_v<T, int> ? "a whole number" : "a finite number",
                            example);
    if (values) values->push_back(value);
    if (comma == std::string::npos) return "";
    start = comma + 1;
  }
}

template <class T>
std::string list_problem(const std::string& text) {
  return read_list<T>(text, nullptr);
}

// The numbers of a list that list_problem accepts; otherwise throws an mdff::Error naming `option`.
template <class T>
std::vector<T> parse_list(const std::string& text, const char* option) {
  std::vector<T> values;
  const std::string problem = read_list(text, &values);
  MDFF_CHECK(problem.empty(), option, ": ", problem);
  return values;
}

// An option's check that its value is such a list, at parsing (exit 2 otherwise).
template <class T>
CLI::Validator number_list() {
  return CLI::Validator([](std::string& text) { return list_problem<T>(text); }, "LIST");
}

// An option's check that its value is a finite number of at least `min` (above it when `strictly`). CLI11's
// PositiveNumber takes "nan" and, refusing a value, prints its range with all 309 digits of DBL_MAX.
inline CLI::Validator finite_number(double min, bool strictly) {
  return CLI::Validator(
      [min, strictly](std::string& text) -> std::string {
        char* end = nullptr;
        const double value = std::strtod(text.c_str(), &end);
        if (text.empty() || end != text.c_str() + text.size()) return detail::concat("'", text, "' is not a number");
        if (!std::isfinite(value)) return detail::concat(text, " is not a finite number");
        if (strictly ? value <= min : value < min)
          return detail::concat(text, " is too small: give a number ", strictly ? "above " : "of at least ", min);
        return "";
      },
      strictly ? "NUMBER > " + detail::concat(min) : "NUMBER >= " + detail::concat(min));
}

// Integer options take these as transforms (->transform, which may rewrite the text; ->check's copy is thrown
// away): CLI11 2.1 reads an integer in base 0, so "010" was 8 and "09" an error, and it reads "-1" into a
// uint64_t as 2^64 - 1. Each accepts decimal digits only and hands CLI11 the number rewritten without leading
// zeros.

// A whole number in min..max (CLI11's Range, in base 10).
inline CLI::Validator whole_number(int64_t min, int64_t max) {
  return CLI::Validator(
      [min, max](std::string& text) -> std::string {
        const size_t sign = !text.empty() && text[0] == '-' ? 1 : 0;
        if (text.size() == sign || text.find_first_not_of("0123456789", sign) != std::string::npos)
          return detail::concat("'", text, "' is not a whole number");
        errno = 0;
        const long long value = std::strtoll(text.c_str(), nullptr, 10);
        if (errno == ERANGE || value < min || value > max)
          return detail::concat(text, " is outside ", min, "..", max);
        text = std::to_string(value);
        return "";
      },
      detail::concat("INT in [", min, " - ", max, "]"));
}

// A whole number from 0 to 2^64 - 1.
inline CLI::Validator unsigned_64() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        const bool digits = !text.empty() && text.find_first_not_of("0123456789") == std::string::npos;
        errno = 0;
        const unsigned long long value = digits ? std::strtoull(text.c_str(), nullptr, 10) : 0;
        if (!digits || errno == ERANGE)
          return detail::concat("'", text, "' is not a whole number from 0 to 18446744073709551615");
        text = std::to_string(value);
        return "";
      },
      "UINT64");
}

// The program a shell would run for `name` (e.g. --python's): a name with a '/' as it is, else the first
// executable file of that name in the folders of $PATH (an empty entry is the current folder). "" when there
// is none, with `why` saying so.
inline std::string find_program(const std::string& name, std::string& why) {
  std::error_code ignored;
  if (name.find('/') != std::string::npos) {
    if (std::filesystem::exists(name, ignored)) return name;
    why = name + " does not exist";
    return "";
  }
  const char* path = std::getenv("PATH");
  const std::string folders = path ? path : "";
  for (size_t start = 0; !folders.empty();) {
    const size_t end = folders.find(':', start);
    const std::string folder = folders.substr(start, end == std::string::npos ? std::string::npos : end - start);
    const std::filesystem::path candidate = std::filesystem::path(folder.empty() ? "." : folder) / name;
    if (std::filesystem::is_regular_file(candidate, ignored) && ::access(candidate.c_str(), X_OK) == 0)
      return candidate.string();
    if (end == std::string::npos) break;
    start = end + 1;
  }
  why = name + " was not found on PATH (give its full path: /path/to/" + name + ")";
  return "";
}

}  // namespace mdff::cli
