// Fuzz target: retrieval::read_code_database, the reader of mdff_search's code database, followed by the
// searches mdff_search runs over what it read (the nearest codes and those within a radius).
#include "core/error.h"
#include "retrieval/code_db.h"
#include "tests/fuzz/fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = mdff::fuzz::write_input("codes.safetensors", data, size);
  try {
    const mdff::retrieval::CodeDatabase db = mdff::retrieval::read_code_database(path);
    if (db.codes.count > 0) {
      mdff::retrieval::nearest(db.codes, db.codes, 0, 3);
      mdff::retrieval::within_radius(db.codes, db.codes, db.codes.count - 1, 2);
    }
  } catch (const mdff::Error&) {
  }
  return 0;
}
