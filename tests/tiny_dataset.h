// What the tests that run train_mdff share: a Fashion-MNIST-format dataset that the tiny model learns
// from in seconds, and a checkpoint's tensors as bytes, to compare two runs bit for bit.
#pragma once
#include "tests/doctest_text.h"
#include <zlib.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "core/safetensors.h"

namespace mdff::test {

inline void write_idx_gz(const std::filesystem::path& path, const std::vector<uint32_t>& dims,
                         const std::vector<uint8_t>& values) {
  std::vector<uint8_t> bytes{0, 0, 0x08, static_cast<uint8_t>(dims.size())};
  for (uint32_t d : dims)
    for (int shift : {24, 16, 8, 0}) bytes.push_back(static_cast<uint8_t>(d >> shift));
  bytes.insert(bytes.end(), values.begin(), values.end());
  gzFile f = gzopen(path.c_str(), "wb");
  REQUIRE(f);
  gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
  gzclose(f);
}

// A Fashion-MNIST-format dataset in `dir`: `train_per_class` training and half as many test images per
// class, each class a bright square at its own place on a noisy background (learnable in one epoch).
inline std::filesystem::path make_dataset(const std::filesystem::path& dir, int train_per_class) {
  std::filesystem::create_directories(dir);
  uint32_t state = 12345;
  auto noise = [&] { return static_cast<uint8_t>((state = state * 1664525 + 1013904223) >> 27); };
  for (auto [prefix, per_class] :
       {std::pair<const char*, int>{"train", train_per_class}, {"t10k", train_per_class / 2}}) {
    std::vector<uint8_t> images, labels;
    for (int i = 0; i < 10 * per_class; ++i) {
      const int c = i % 10;
      labels.push_back(static_cast<uint8_t>(c));
      for (int y = 0; y < 28; ++y)
        for (int x = 0; x < 28; ++x) {
          const bool square = y / 7 == c / 4 && x / 7 == c % 4;
          images.push_back(square ? 255 : noise());
        }
    }
    const uint32_t n = static_cast<uint32_t>(labels.size());
    write_idx_gz(dir / (std::string(prefix) + "-images-idx3-ubyte.gz"), {n, 28, 28}, images);
    write_idx_gz(dir / (std::string(prefix) + "-labels-idx1-ubyte.gz"), {n}, labels);
  }
  return dir;
}

// Every tensor of a checkpoint as its raw bytes, by name.
inline std::map<std::string, std::vector<uint8_t>> tensor_bytes(const std::filesystem::path& path) {
  std::map<std::string, std::vector<uint8_t>> tensors;
  for (const io::SafetensorsEntry& entry : io::load_safetensors(path.string()).entries)
    tensors[entry.name] = entry.bytes;
  return tensors;
}

}  // namespace mdff::test
