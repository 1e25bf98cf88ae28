// Fuzz target: load_pretrained_backbone (train_mdff --pretrained), loading a safetensors file into the tiny
// ResNet backbone by torchvision's names, and the summary line it prints.
#include "core/error.h"
#include "core/rng.h"
#include "models/pretrained.h"
#include "tests/fuzz/fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static mdff::ResNet backbone = [] {
    mdff::Rng rng(0);
    return mdff::ResNet(mdff::ResNetConfig::tiny(), rng);
  }();
  const std::string path = mdff::fuzz::write_input("weights.safetensors", data, size);
  try {
    mdff::load_pretrained_backbone(backbone, path).summary();
  } catch (const mdff::Error&) {
  }
  return 0;
}
