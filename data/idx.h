// Reading IDX files (the MNIST / Fashion-MNIST format), plain or gzip-compressed.
// Layout: a 4-byte magic 0x00 0x00 <type> <rank>, then `rank` big-endian uint32 dimensions, then the
// values. Only unsigned bytes (type 0x08) are supported, which is what the image and label files use.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace mdff::data {

struct IdxArray {
  std::vector<int64_t> shape;  // e.g. (60000, 28, 28) for images, (60000) for labels
  std::vector<uint8_t> values;
};

// Throws mdff::Error naming the file and what is wrong (missing, bad magic, truncated, ...).
IdxArray read_idx(const std::string& path);

// Where Debian's dataset-fashion-mnist puts the files.
inline const char* kFashionMnistDir = "/usr/share/datasets/fashion-mnist";

}  // namespace mdff::data
