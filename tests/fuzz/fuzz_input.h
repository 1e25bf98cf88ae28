// What every fuzz target shares: the parsers read files, so each input is written to a file in a scratch
// folder of the fuzzing process's own (in /dev/shm when there is one: no disk writes per execution),
// removed when the process exits normally.
#pragma once
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

#include "tests/temp_folder.h"

namespace mdff::fuzz {

// The process's scratch folder.
inline const std::filesystem::path& scratch() {
  static const test::TempFolder folder(
      "mdff_fuzz", std::filesystem::is_directory("/dev/shm") ? std::filesystem::path("/dev/shm")
                                                             : std::filesystem::temp_directory_path());
  return folder.path;
}

// Writes `size` bytes to `name` in the scratch folder (replacing it) and returns the file's path.
inline std::string write_input(const std::string& name, const uint8_t* data, size_t size) {
  const std::filesystem::path path = scratch() / name;
  std::filesystem::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary | std::ios::trunc).write(reinterpret_cast<const char*>(data),
                                                                static_cast<std::streamsize>(size));
  return path.string();
}

}  // namespace mdff::fuzz
