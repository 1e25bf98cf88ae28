// What every fuzz target shares: the parsers read files, so each input is written to a file in a scratch
// folder of the fuzzing process's own (in /dev/shm when there is one: no disk writes per execution),
// removed when the process exits normally.
#pragma once
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>

namespace mdff::fuzz {

class Scratch {
 public:
  Scratch() {
    const std::filesystem::path shm = "/dev/shm";
    const std::filesystem::path base = std::filesystem::is_directory(shm) ? shm : std::filesystem::temp_directory_path();
    path_ = base / ("mdff_fuzz_" + std::to_string(::getpid()));
    std::filesystem::create_directories(path_);
  }
  ~Scratch() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// The process's scratch folder.
inline const std::filesystem::path& scratch() {
  static const Scratch folder;
  return folder.path();
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
