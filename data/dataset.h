// Datasets as the trainer sees them: the images (held in memory, or a list of files decoded on demand)
// and their multi-hot labels. Loaders for CIFAR-10 (binary version), Fashion-MNIST (IDX files) and
// image lists (`path l1 ... lK`, the NUS-WIDE / MS-COCO format). Every loader checks its input and throws
// mdff::Error naming the file (and record or line) and saying how to fix it.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace mdff::data {

struct Dataset {
  std::string name;                      // "cifar10", "fashion-mnist", or the image list's path
  int classes = 0;                       // K
  std::vector<std::string> class_names;  // K names
  bool multi_label = false;              // image lists; CIFAR-10 and Fashion-MNIST have one label per image

  // In-memory images (CIFAR-10, Fashion-MNIST): (n,C,H,W) uint8. Empty for image lists.
  int channels = 0, height = 0, width = 0;
  std::vector<uint8_t> pixels;
  // Image lists: one file per image, decoded on demand (decode_image). Empty for in-memory datasets.
  std::vector<std::string> image_paths;

  std::vector<uint8_t> labels;  // (n,K) multi-hot, 0 or 1 (one-hot for single-label datasets)

  int64_t size() const { return classes > 0 ? static_cast<int64_t>(labels.size()) / classes : 0; }
  bool in_memory() const { return image_paths.empty(); }
  const uint8_t* label_row(int64_t i) const { return labels.data() + i * classes; }
  const uint8_t* image(int64_t i) const { return pixels.data() + i * int64_t(channels) * height * width; }
};

// CIFAR-10's binary version: `dir` holds data_batch_1..5.bin and test_batch.bin (a folder that holds
// cifar-10-batches-bin/ is accepted too). Each record is 1 label byte (0..9) and 3072 pixel bytes (CHW,
// 3x32x32); each file holds exactly `records_per_file` records (10,000 in the real files; tests use
// fewer). The 60,000 images are pooled in the order data_batch_1..5, test_batch: (60000,3,32,32).
// Class names come from batches.meta.txt when present.
inline constexpr int64_t kCifar10RecordsPerFile = 10000;
Dataset load_cifar10(const std::string& dir, int64_t records_per_file = kCifar10RecordsPerFile);

// Fashion-MNIST from its IDX files (train-* then t10k-*, .gz or plain), 70,000 pooled images. The 28x28
// grey images are zero-padded by 2 pixels on each side and repeated to 3 channels: (70000,3,32,32), the
// same layout as CIFAR-10. Default folder: data::kFashionMnistDir (Debian's dataset-fashion-mnist).
Dataset load_fashion_mnist(const std::string& dir);

// An image list: one image per line, `path l1 ... lK` with K labels that are each 0 or 1 (at least one
// 1), separated by whitespace (so a path cannot hold any, as in DeepHash-pytorch's lists); blank lines
// are skipped. Relative paths are taken from `root` (absolute paths are kept). The files
// must exist but are not decoded here.
Dataset load_image_list(const std::string& list_file, const std::string& root, int classes);

// A decoded image file: (H,W,3) uint8, RGB (grey and RGBA files are converted).
struct Image {
  int height = 0, width = 0;
  std::vector<uint8_t> pixels;
};
// Decodes any format stb_image reads (JPEG, PNG, BMP, ...); a missing, undecodable or truncated file, or an
// image of more than 64 megapixels, is an error naming it.
Image decode_image(const std::string& path);

}  // namespace mdff::data
