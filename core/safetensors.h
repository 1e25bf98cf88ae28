// Reading and writing safetensors files, the tensor format of Hugging Face's `safetensors` library:
// an 8-byte little-endian header length N, N bytes of JSON that give each tensor's dtype, shape and
// byte range ("data_offsets", relative to the data section) plus an optional "__metadata__" object of
// strings, then the data section: every tensor's bytes, little-endian and row-major, with no gaps.
// tools/safetensors_io.py reads and writes the same files for the PyTorch reference scripts.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace mdff::io {

// Writes `tensors` (any device; F32, F64 and I32 are written as "F32", "F64" and "I32") in the order
// given, with `metadata` as "__metadata__" when it is not empty. The header is padded with spaces so
// that the data section starts at an 8-byte-aligned offset. The file is written to a temporary file
// next to `path`, synced and renamed over `path`, so `path` never holds a partly written file; on an
// error the temporary file is removed and mdff::Error names the path and the system's reason.
// Duplicate, empty or "__metadata__" names are errors.
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// One tensor as stored: its safetensors dtype ("F32", "BF16", "I64", ...) and its raw little-endian bytes.
struct SafetensorsEntry {
  std::string name;
  std::string dtype;
  Shape shape;
  std::vector<uint8_t> bytes;
};

// Writes entries as they are stored, for data that is no Tensor (bytes as U8, 64-bit words as I64): any
// dtype load_safetensors reads. Same layout, name rules and atomic replacement as save_safetensors; an
// unknown dtype, or bytes that do not fill the shape exactly, is an error naming the tensor.
void save_safetensors_entries(const std::string& path, const std::vector<SafetensorsEntry>& entries,
                              const std::map<std::string, std::string>& metadata = {});

struct SafetensorsFile {
  std::vector<SafetensorsEntry> entries;  // in data-offset order
  std::map<std::string, std::string> metadata;
  const SafetensorsEntry* find(const std::string& name) const;  // nullptr when there is no such tensor
};

// Reads and validates a whole file; every violation of the format is an mdff::Error naming the file and
// the problem. Dtypes read: F64, F32, BF16, F16, I64, I32, U8 and BOOL.
SafetensorsFile load_safetensors(const std::string& path);

// Converts an entry into a CPU tensor of dtype `want`: floating entries (F64, F32, BF16, F16) to F32 or
// F64; integer entries (I64, I32, U8, BOOL) to I32 (an I64 value outside the int32 range is an error)
// or to F32 / F64. A floating entry cannot become I32.
Tensor to_tensor(const SafetensorsEntry& entry, DType want = DType::F32);

}  // namespace mdff::io
