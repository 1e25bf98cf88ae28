// Fuzz target: data::load_cifar10, the reader of CIFAR-10's binary batches, with one record per file. The
// input is cut into the six batch files in order (data_batch_1..5.bin, test_batch.bin), 3,073 bytes each
// (a short input leaves the last files short or empty); what follows the sixth is batches.meta.txt.
#include <algorithm>
#include <filesystem>

#include "core/error.h"
#include "data/dataset.h"
#include "tests/fuzz/fuzz_input.h"

namespace {
constexpr size_t kRecordBytes = 1 + 3 * 32 * 32;
const char* const kFiles[] = {"data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin",
                              "data_batch_4.bin", "data_batch_5.bin", "test_batch.bin"};
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  size_t used = 0;
  for (const char* file : kFiles) {
    const size_t bytes = std::min(kRecordBytes, size - used);
    mdff::fuzz::write_input(std::string("cifar/") + file, data + used, bytes);
    used += bytes;
  }
  const std::filesystem::path meta = mdff::fuzz::scratch() / "cifar" / "batches.meta.txt";
  if (used < size) mdff::fuzz::write_input("cifar/batches.meta.txt", data + used, size - used);
  else std::filesystem::remove(meta);  // the standard names
  try {
    mdff::data::load_cifar10((mdff::fuzz::scratch() / "cifar").string(), 1);
  } catch (const mdff::Error&) {
  }
  return 0;
}
