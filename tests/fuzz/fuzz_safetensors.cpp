// Fuzz target: io::load_safetensors, and io::to_tensor of every tensor it returns to each dtype (F32, F64,
// I32), as the loaders of weights, checkpoints and code databases use them.
#include "core/error.h"
#include "core/safetensors.h"
#include "tests/fuzz/fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = mdff::fuzz::write_input("input.safetensors", data, size);
  mdff::io::SafetensorsFile file;
  try {
    file = mdff::io::load_safetensors(path);
  } catch (const mdff::Error&) {
    return 0;
  }
  for (const mdff::io::SafetensorsEntry& entry : file.entries) {
    for (mdff::DType dtype : {mdff::DType::F32, mdff::DType::F64, mdff::DType::I32}) {
      try {
        mdff::io::to_tensor(entry, dtype);
      } catch (const mdff::Error&) {
      }
    }
  }
  return 0;
}
