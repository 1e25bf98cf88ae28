// NumPy .npy files for the retrieval outputs that Python tools read: ±1 codes (int8, '|i1'), multi-hot
// labels (uint8, '|u1') and float32 arrays ('<f4'), C order. The writer uses format version 1.0 with the
// header padded so the data starts at a multiple of 64 bytes, and writes atomically; the reader takes
// versions 1.0 to 3.0 of those three dtypes and turns every malformed file into a clear mdff::Error.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "retrieval/codes.h"

namespace mdff::retrieval {

enum class NpyDType { Int8, UInt8, Float32 };

// Each writes `values` as an array of `shape` (rank >= 1, numel(shape) == values.size()), replacing
// `path` atomically (temporary file + rename).
void write_npy(const std::string& path, const std::vector<int8_t>& values, const Shape& shape);
void write_npy(const std::string& path, const std::vector<uint8_t>& values, const Shape& shape);
void write_npy(const std::string& path, const std::vector<float>& values, const Shape& shape);

// The codes as an int8 (count, bits) array of ±1 (unpack_codes).
void write_npy_codes(const std::string& path, const PackedCodes& codes);

struct NpyArray {
  NpyDType dtype = NpyDType::Float32;
  Shape shape;
  std::vector<uint8_t> bytes;  // numel(shape) values, C order, little-endian

  // The values, when the array has that dtype (otherwise an error naming both).
  std::vector<int8_t> int8_values() const;
  std::vector<uint8_t> uint8_values() const;
  std::vector<float> float32_values() const;
};

NpyArray read_npy(const std::string& path);

}  // namespace mdff::retrieval
