// Fuzz target: data::decode_image, stb_image's decoders (JPEG, PNG, BMP, GIF, TGA, PSD, PNM, HDR) as the
// engine calls them on the files of an image list.
#include "core/error.h"
#include "data/dataset.h"
#include "tests/fuzz/fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = mdff::fuzz::write_input("input.img", data, size);
  try {
    mdff::data::decode_image(path);
  } catch (const mdff::Error&) {
  }
  return 0;
}
