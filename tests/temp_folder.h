// A temporary folder of the test process's own, removed with its contents when the object goes, so that
// tests leave nothing behind and listing it shows every file a test wrote.
#pragma once
#include <unistd.h>

#include <filesystem>
#include <string>
#include <system_error>

namespace mdff::test {

struct TempFolder {
  std::filesystem::path path;
  // PREFIX_PID under `base` (the system's temporary folder unless given).
  explicit TempFolder(const std::string& prefix,
                      const std::filesystem::path& base = std::filesystem::temp_directory_path())
      : path(base / (prefix + "_" + std::to_string(::getpid()))) {
    std::filesystem::create_directories(path);
  }
  ~TempFolder() {
    std::error_code ignored;
    std::filesystem::remove_all(path, ignored);
  }
  TempFolder(const TempFolder&) = delete;
  TempFolder& operator=(const TempFolder&) = delete;
  std::string file(const std::string& name) const { return (path / name).string(); }
};

}  // namespace mdff::test
