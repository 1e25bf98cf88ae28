// Fuzz target: load_model_checkpoint, which rebuilds an MDFF-SH from a train_mdff checkpoint's metadata
// and loads its tensors (what mdff_search does with --checkpoint). The seeds are checkpoints of the tiny
// backbone, so that a model is quick to build.
#include "core/error.h"
#include "models/checkpoint.h"
#include "tests/fuzz/fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = mdff::fuzz::write_input("checkpoint.safetensors", data, size);
  try {
    mdff::load_model_checkpoint(path);
  } catch (const mdff::Error&) {
  }
  return 0;
}
