// Files of the source tree that tests read (fixtures, tools/): under MDFF_SOURCE_DIR, the tree the test was
// built from, else under the current folder. scripts/gpu_check.sh runs the tests on another machine from a
// copy of the repository, in its root, where the build machine's paths do not exist.
#pragma once
#include <filesystem>
#include <string>

namespace mdff::test {

inline std::string source_file(const std::string& relative) {
  const std::string built = std::string(MDFF_SOURCE_DIR) + "/" + relative;
  return std::filesystem::exists(built) || !std::filesystem::exists(relative) ? built : relative;
}

}  // namespace mdff::test
