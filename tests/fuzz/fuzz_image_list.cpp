// Fuzz target: data::load_image_list, the reader of `path l1 ... lK` image lists. The input's first line is
// the number of classes K (1..64, what --classes gives); the rest is the list, whose relative paths are
// taken from a folder holding a.png, b.jpg and sub/c.png (the files must exist, they are not decoded).
#include <cstdlib>
#include <string>

#include "core/error.h"
#include "data/dataset.h"
#include "tests/fuzz/fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const bool images_made = [] {
    for (const char* name : {"images/a.png", "images/b.jpg", "images/sub/c.png"}) mdff::fuzz::write_input(name, nullptr, 0);
    return true;
  }();
  (void)images_made;
  const std::string text(reinterpret_cast<const char*>(data), size);
  const size_t newline = text.find('\n');
  if (newline == std::string::npos) return 0;
  const int classes = std::atoi(text.substr(0, newline).c_str());
  if (classes < 1 || classes > 64) return 0;
  const std::string list = text.substr(newline + 1);
  const std::string path =
      mdff::fuzz::write_input("list.txt", reinterpret_cast<const uint8_t*>(list.data()), list.size());
  try {
    mdff::data::load_image_list(path, (mdff::fuzz::scratch() / "images").string(), classes);
  } catch (const mdff::Error&) {
  }
  return 0;
}
