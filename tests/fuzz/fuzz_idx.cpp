// Fuzz target: data::read_idx, the IDX reader of Fashion-MNIST's files, on plain and gzip input (zlib
// passes a file without the gzip magic through unchanged, so one target covers both).
#include "core/error.h"
#include "data/idx.h"
#include "tests/fuzz/fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = mdff::fuzz::write_input("input.idx", data, size);
  try {
    mdff::data::read_idx(path);
  } catch (const mdff::Error&) {
  }
  return 0;
}
