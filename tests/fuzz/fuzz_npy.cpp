// Fuzz target: retrieval::read_npy, the .npy reader, and the typed views of the array it returns.
#include "core/error.h"
#include "retrieval/npy.h"
#include "tests/fuzz/fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = mdff::fuzz::write_input("input.npy", data, size);
  mdff::retrieval::NpyArray array;
  try {
    array = mdff::retrieval::read_npy(path);
  } catch (const mdff::Error&) {
    return 0;
  }
  try {
    switch (array.dtype) {
      case mdff::retrieval::NpyDType::Int8: array.int8_values(); break;
      case mdff::retrieval::NpyDType::UInt8: array.uint8_values(); break;
      case mdff::retrieval::NpyDType::Float32: array.float32_values(); break;
    }
  } catch (const mdff::Error&) {
  }
  return 0;
}
