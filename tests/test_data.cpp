// The data module on small generated files: CIFAR-10 batches, Fashion-MNIST IDX files and image lists
// (good and damaged), image decoding, make_batch (normalisation, flip, resize, crop) and BatchLoader
// (coverage, shuffling, determinism, errors from its worker thread); plus the real Fashion-MNIST when
// Debian's dataset-fashion-mnist is installed.
#include <doctest/doctest.h>
#include "tests/doctest_text.h"
#include <zlib.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <numeric>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/ops.h"
#include "core/rng.h"
#include "data/batch.h"
#include "data/dataset.h"
#include "data/idx.h"

#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>

using namespace mdff;
using namespace mdff::data;
namespace fs = std::filesystem;

namespace {
// A fresh, empty folder for one test.
std::string temp_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("mdff_test_data_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

void write_text(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

// ---- CIFAR-10 ----
const char* kCifarFiles[] = {"data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin",
                             "data_batch_4.bin", "data_batch_5.bin", "test_batch.bin"};
uint8_t cifar_label(int file, int record) { return static_cast<uint8_t>((file + record) % 10); }
uint8_t cifar_pixel(int file, int record, int i) { return static_cast<uint8_t>(file * 31 + record * 7 + i); }

// The six batch files with `records` records each; returns the folder.
std::string write_cifar(const std::string& name, int records) {
  const std::string dir = temp_dir(name);
  for (int f = 0; f < 6; ++f) {
    std::vector<uint8_t> bytes;
    for (int r = 0; r < records; ++r) {
      bytes.push_back(cifar_label(f, r));
      for (int i = 0; i < 3072; ++i) bytes.push_back(cifar_pixel(f, r, i));
    }
    write_bytes(dir + "/" + kCifarFiles[f], bytes);
  }
  return dir;
}

// ---- Fashion-MNIST ----
void write_idx_gz(const std::string& path, const std::vector<uint32_t>& dims, const std::vector<uint8_t>& values) {
  std::vector<uint8_t> bytes{0, 0, 0x08, static_cast<uint8_t>(dims.size())};
  for (uint32_t d : dims) {
    for (int shift : {24, 16, 8, 0}) bytes.push_back(static_cast<uint8_t>(d >> shift));
  }
  bytes.insert(bytes.end(), values.begin(), values.end());
  gzFile f = gzopen(path.c_str(), "wb");
  gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
  gzclose(f);
}

uint8_t fmnist_pixel(int64_t image, int y, int x) { return static_cast<uint8_t>(1 + image * 50 + y * 3 + x); }

// train (3 images) and t10k (2 images) with labels 7,8,9 and 2,3.
std::string write_fashion_mnist(const std::string& name) {
  const std::string dir = temp_dir(name);
  const std::pair<const char*, std::vector<uint8_t>> parts[] = {{"train", {7, 8, 9}}, {"t10k", {2, 3}}};
  int64_t image = 0;
  for (const auto& [prefix, labels] : parts) {
    std::vector<uint8_t> pixels;
    for (size_t i = 0; i < labels.size(); ++i, ++image) {
      for (int y = 0; y < 28; ++y) {
        for (int x = 0; x < 28; ++x) pixels.push_back(fmnist_pixel(image, y, x));
      }
    }
    const auto n = static_cast<uint32_t>(labels.size());
    write_idx_gz(dir + "/" + prefix + "-images-idx3-ubyte.gz", {n, 28, 28}, pixels);
    write_idx_gz(dir + "/" + prefix + "-labels-idx1-ubyte.gz", {n}, labels);
  }
  return dir;
}

// ---- image lists ----
// An RGB PNG whose pixel (y,x,c) is rgb_pixel(y,x,c).
uint8_t rgb_pixel(int y, int x, int c) { return static_cast<uint8_t>(10 * y + 3 * x + 80 * c); }
void write_png(const std::string& path, int height, int width) {
  std::vector<uint8_t> pixels;
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      for (int c = 0; c < 3; ++c) pixels.push_back(rgb_pixel(y, x, c));
    }
  }
  REQUIRE(stbi_write_png(path.c_str(), width, height, 3, pixels.data(), width * 3));
}

// A folder with a.png (5x4), sub/b.png (3x7), a grey c.png (2x2) and a damaged bad.png.
std::string write_images(const std::string& name) {
  const std::string dir = temp_dir(name);
  fs::create_directories(dir + "/sub");
  write_png(dir + "/a.png", 5, 4);
  write_png(dir + "/sub/b.png", 3, 7);
  const uint8_t grey[4] = {0, 85, 170, 255};
  REQUIRE(stbi_write_png((dir + "/c.png").c_str(), 2, 2, 1, grey, 2));
  write_text(dir + "/bad.png", "this is not a PNG file");
  return dir;
}

// ---- in-memory datasets for make_batch and BatchLoader ----
uint8_t synthetic_pixel(int64_t i) { return static_cast<uint8_t>((i * 37) % 256); }

// n images (3,h,w) whose pixel at flat position i of the whole array is synthetic_pixel(i); label i % K.
Dataset synthetic(int64_t n, int classes, int height, int width) {
  Dataset d;
  d.name = "synthetic";
  d.classes = classes;
  for (int k = 0; k < classes; ++k) d.class_names.push_back(std::to_string(k));
  d.channels = 3;
  d.height = height;
  d.width = width;
  d.pixels.resize(static_cast<size_t>(n * 3 * height * width));
  for (size_t i = 0; i < d.pixels.size(); ++i) d.pixels[i] = synthetic_pixel(static_cast<int64_t>(i));
  d.labels.assign(static_cast<size_t>(n * classes), 0);
  for (int64_t i = 0; i < n; ++i) d.labels[i * classes + i % classes] = 1;
  return d;
}

float normalised(float value01, int channel) { return (value01 - kImageNetMean[channel]) / kImageNetStd[channel]; }

std::vector<int32_t> iota_positions(size_t n) {
  std::vector<int32_t> positions(n);
  std::iota(positions.begin(), positions.end(), 0);
  return positions;
}

// All the batches of one epoch.
std::vector<Batch> epoch(BatchLoader& loader) {
  std::vector<Batch> batches;
  loader.start_epoch();
  for (Batch b; loader.next(b);) batches.push_back(b);
  return batches;
}

std::vector<int64_t> rows_of(const std::vector<Batch>& batches) {
  std::vector<int64_t> rows;
  for (const Batch& b : batches) rows.insert(rows.end(), b.dataset_rows.begin(), b.dataset_rows.end());
  return rows;
}
}  // namespace

TEST_CASE("CIFAR-10: six batch files pooled in order, one-hot labels, CHW pixels, class names") {
  const std::string dir = write_cifar("cifar_ok", 10);
  const Dataset d = load_cifar10(dir, 10);
  CHECK(d.name == "cifar10");
  CHECK(d.size() == 60);
  CHECK((d.channels == 3 && d.height == 32 && d.width == 32));
  CHECK_FALSE(d.multi_label);
  REQUIRE(d.pixels.size() == 60u * 3072);
  CHECK(d.class_names.at(9) == "truck");
  for (int f = 0; f < 6; ++f) {
    for (int r = 0; r < 10; ++r) {
      const int64_t row = f * 10 + r;
      for (int k = 0; k < 10; ++k) CHECK(d.label_row(row)[k] == (k == cifar_label(f, r)));
      for (int i : {0, 1024 + 33, 3071}) CHECK(d.image(row)[i] == cifar_pixel(f, r, i));
    }
  }
  // the folder above cifar-10-batches-bin/ works too, and batches.meta.txt gives the names
  const std::string parent = temp_dir("cifar_parent");
  fs::rename(dir, parent + "/cifar-10-batches-bin");
  write_text(parent + "/cifar-10-batches-bin/batches.meta.txt", "a\nb\nc\nd\ne\nf\ng\nh\ni\nj\n\n");
  const Dataset again = load_cifar10(parent, 10);
  CHECK(again.pixels == d.pixels);
  CHECK(again.class_names.at(9) == "j");
}

TEST_CASE("CIFAR-10: damaged or missing files are errors naming the file and the fix") {
  const std::string dir = write_cifar("cifar_bad", 10);
  // the real files hold 10,000 records: small files fail the default size check
  CHECK_THROWS_WITH_AS(load_cifar10(dir), doctest::Contains("data_batch_1.bin: 30730 bytes, expected 30730000"), Error);

  std::vector<uint8_t> bytes(10 * 3073, 0);
  bytes[4 * 3073] = 10;  // label of record 4
  write_bytes(dir + "/data_batch_2.bin", bytes);
  CHECK_THROWS_WITH_AS(load_cifar10(dir, 10),
                       doctest::Contains("data_batch_2.bin: record 4 (byte offset 12292) has "
                                         "label 10, outside 0..9"),
                       Error);

  write_bytes(dir + "/data_batch_2.bin", std::vector<uint8_t>(10 * 3073 - 1, 0));
  CHECK_THROWS_WITH_AS(load_cifar10(dir, 10), doctest::Contains("data_batch_2.bin: 30729 bytes, expected 30730"),
                       Error);

  fs::remove(dir + "/test_batch.bin");
  write_bytes(dir + "/data_batch_2.bin", std::vector<uint8_t>(10 * 3073, 0));
  CHECK_THROWS_WITH_AS(load_cifar10(dir, 10), doctest::Contains("test_batch.bin is missing"), Error);
  CHECK_THROWS_WITH_AS(load_cifar10(dir, 10), doctest::Contains("scripts/download_cifar10.sh"), Error);
  CHECK_THROWS_WITH_AS(load_cifar10(dir + "/nowhere"), doctest::Contains("nowhere does not exist"), Error);

  write_cifar("cifar_bad", 10);
  write_text(dir + "/batches.meta.txt", "cat\ndog\n");
  CHECK_THROWS_WITH_AS(load_cifar10(dir, 10), doctest::Contains("expected 10 class names (one a line), found 2"),
                       Error);
}

TEST_CASE("Fashion-MNIST: train then t10k, padded to 32x32 with zeros, repeated to 3 channels") {
  const Dataset d = load_fashion_mnist(write_fashion_mnist("fmnist_ok"));
  CHECK(d.name == "fashion-mnist");
  REQUIRE(d.size() == 5);
  CHECK((d.channels == 3 && d.height == 32 && d.width == 32));
  CHECK(d.class_names.at(9) == "Ankle boot");
  const int expected_labels[] = {7, 8, 9, 2, 3};
  int wrong = 0;
  for (int64_t i = 0; i < 5; ++i) {
    for (int k = 0; k < 10; ++k) wrong += d.label_row(i)[k] != (k == expected_labels[i]);
    for (int c = 0; c < 3; ++c) {
      for (int y = 0; y < 32; ++y) {
        for (int x = 0; x < 32; ++x) {
          const bool inside = y >= 2 && y < 30 && x >= 2 && x < 30;
          const uint8_t expected = inside ? fmnist_pixel(i, y - 2, x - 2) : 0;
          wrong += d.image(i)[(c * 32 + y) * 32 + x] != expected;
        }
      }
    }
  }
  CHECK(wrong == 0);
}

TEST_CASE("Fashion-MNIST: mismatched, damaged or missing files are clear errors") {
  const std::string dir = write_fashion_mnist("fmnist_bad");
  write_idx_gz(dir + "/t10k-labels-idx1-ubyte.gz", {3}, {1, 2, 3});
  CHECK_THROWS_WITH_AS(load_fashion_mnist(dir), doctest::Contains("t10k-labels-idx1-ubyte.gz: holds 3 labels but"),
                       Error);
  write_idx_gz(dir + "/t10k-labels-idx1-ubyte.gz", {2}, {1, 12});
  CHECK_THROWS_WITH_AS(load_fashion_mnist(dir), doctest::Contains("t10k-labels-idx1-ubyte.gz: label 1 is 12"), Error);
  write_idx_gz(dir + "/t10k-labels-idx1-ubyte.gz", {2}, {1, 2});
  write_idx_gz(dir + "/t10k-images-idx3-ubyte.gz", {2, 27, 28}, std::vector<uint8_t>(2 * 27 * 28));
  CHECK_THROWS_WITH_AS(load_fashion_mnist(dir),
                       doctest::Contains("expected images of shape (n,28,28), found (2,27,28)"), Error);
  fs::remove(dir + "/t10k-images-idx3-ubyte.gz");
  CHECK_THROWS_WITH_AS(load_fashion_mnist(dir), doctest::Contains("neither"), Error);
  CHECK_THROWS_WITH_AS(load_fashion_mnist(dir + "/nowhere"), doctest::Contains("dataset-fashion-mnist"), Error);
}

TEST_CASE("Fashion-MNIST: the real files of Debian's dataset-fashion-mnist, when installed") {
  if (!fs::exists(std::string(kFashionMnistDir) + "/train-images-idx3-ubyte.gz")) {
    MESSAGE("skipped: ", kFashionMnistDir, " is not installed (Debian package dataset-fashion-mnist)");
    return;
  }
  const auto start = std::chrono::steady_clock::now();
  const Dataset d = load_fashion_mnist(kFashionMnistDir);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  MESSAGE("loading Fashion-MNIST took ", seconds, " s");
  REQUIRE(d.size() == 70000);
  CHECK(d.pixels.size() == 70000u * 3 * 32 * 32);
  std::vector<int64_t> per_class(10, 0);
  for (int64_t i = 0; i < d.size(); ++i) {
    for (int k = 0; k < 10; ++k) per_class[k] += d.label_row(i)[k];
  }
  CHECK(per_class == std::vector<int64_t>(10, 7000));
  // the first test image sits at row 60,000, shifted by the padding, in all three channels
  const IdxArray raw = read_idx(std::string(kFashionMnistDir) + "/t10k-images-idx3-ubyte.gz");
  for (int c = 0; c < 3; ++c) {
    for (int p = 0; p < 28 * 28; p += 29)
      CHECK(d.image(60000)[(c * 32 + p / 28 + 2) * 32 + p % 28 + 2] == raw.values[p]);
  }
}

TEST_CASE("image lists: multi-hot labels, paths from the root or absolute, blank lines skipped") {
  const std::string dir = write_images("list_ok");
  const std::string list = dir + "/list.txt";
  write_text(list, "a.png 1 0 1\n\n  \nsub/b.png 0 1 0\n" + dir + "/c.png 1 1 1\n");
  const Dataset d = load_image_list(list, dir, 3);
  REQUIRE(d.size() == 3);
  CHECK(d.multi_label);
  CHECK(d.pixels.empty());
  CHECK(d.image_paths == std::vector<std::string>{dir + "/a.png", dir + "/sub/b.png", dir + "/c.png"});
  CHECK(d.labels == std::vector<uint8_t>{1, 0, 1, 0, 1, 0, 1, 1, 1});

  const Image b = decode_image(d.image_paths[1]);
  REQUIRE((b.height == 3 && b.width == 7));
  int wrong = 0;
  for (int y = 0; y < 3; ++y) {
    for (int x = 0; x < 7; ++x) {
      for (int c = 0; c < 3; ++c) wrong += b.pixels[(y * 7 + x) * 3 + c] != rgb_pixel(y, x, c);
    }
  }
  CHECK(wrong == 0);
  const Image grey = decode_image(d.image_paths[2]);
  CHECK(grey.pixels == std::vector<uint8_t>{0, 0, 0, 85, 85, 85, 170, 170, 170, 255, 255, 255});
}

TEST_CASE("image lists: bad lines and bad images are errors naming the file and line") {
  const std::string dir = write_images("list_bad");
  const std::string list = dir + "/list.txt";
  auto load_line = [&](const std::string& second_line) {
    write_text(list, "a.png 1 0 0\n" + second_line + "\n");
    return load_image_list(list, dir, 3);
  };
  CHECK_THROWS_WITH_AS(load_line("a.png 1 0"),
                       doctest::Contains("list.txt:2: found 2 labels after the path, expected 3"), Error);
  CHECK_THROWS_WITH_AS(load_line("a.png 1 0 1 1"), doctest::Contains("found 4 labels"), Error);
  CHECK_THROWS_WITH_AS(load_line("a.png 1 2 0"), doctest::Contains("list.txt:2: label 2 is '2'; labels must be 0 or 1 "
                                                                  "(the line is `path l1 ... l3`)"),
                       Error);
  // a path with a space: its second part is read as a label, and the message says why
  CHECK_THROWS_WITH_AS(load_line("my photo.png 1 0 0"),
                       doctest::Contains("label 1 is 'photo.png'; labels must be 0 or 1 (the line is `path l1 ... l3`, "
                                         "separated by spaces, so a path cannot hold one"),
                       Error);
  CHECK_THROWS_WITH_AS(load_line("a.png"), doctest::Contains("found 0 labels"), Error);
  CHECK_THROWS_WITH_AS(load_line("a.png 0 0 0"), doctest::Contains("list.txt:2: the image a.png has no label"), Error);
  CHECK_THROWS_WITH_AS(load_line("missing.png 0 1 0"), doctest::Contains("missing.png does not exist"), Error);
  CHECK_THROWS_WITH_AS(load_image_list(dir + "/none.txt", dir, 3), doctest::Contains("none.txt: cannot open"), Error);
  write_text(list, "\n\n");
  CHECK_THROWS_WITH_AS(load_image_list(list, dir, 3), doctest::Contains("the image list is empty"), Error);

  CHECK_THROWS_WITH_AS(decode_image(dir + "/bad.png"), doctest::Contains("bad.png: cannot decode the image"), Error);
  CHECK_THROWS_WITH_AS(decode_image(dir + "/gone.jpg"), doctest::Contains("gone.jpg: no such image file"), Error);
}

// Found by fuzzing (tests/fuzz/corpus/fuzz_image_list/crash-name-too-long): a file name longer than the
// system allows made std::filesystem throw its own exception instead of the loader's error naming the path.
TEST_CASE("paths the system cannot look up are missing files, named in the error") {
  const std::string dir = write_images("list_long_name");
  const std::string list = dir + "/list.txt", long_name = std::string(300, 'x') + ".png";
  write_text(list, "a.png 1 0 0\n" + long_name + " 0 1 0\n");
  const std::string message = "list.txt:2: the image " + dir + "/" + long_name + " does not exist";
  CHECK_THROWS_WITH_AS(load_image_list(list, dir, 3), doctest::Contains(message.c_str()), Error);
  CHECK_THROWS_WITH_AS(load_image_list(dir + "/" + long_name, dir, 3), doctest::Contains("cannot open the image list"),
                       Error);
  CHECK_THROWS_WITH_AS(decode_image(dir + "/" + long_name), doctest::Contains("no such image file"), Error);
  CHECK_THROWS_WITH_AS(decode_image(dir + "/a.png/b.png"), doctest::Contains("no such image file"), Error);
  CHECK_THROWS_WITH_AS(load_cifar10(dir + "/" + long_name), doctest::Contains("does not exist"), Error);
  CHECK_THROWS_WITH_AS(load_fashion_mnist(dir + "/" + long_name), doctest::Contains("does not exist"), Error);
  CHECK_THROWS_WITH_AS(read_idx(dir + "/" + long_name), doctest::Contains("no such file"), Error);
}

// Found by fuzzing (tests/fuzz/corpus/fuzz_image/): stb_image 2.27 writes past its Huffman table when a
// JPEG's DHT segment declares more than 256 codes (crash-jpeg-dht-over-256-codes.jpg), and decoded a BMP
// header's 5 x 16,776,963 pixels from a 103-byte file, one file seek per row, for minutes
// (timeout-bmp-16m-rows.bmp).
TEST_CASE("decode_image: damaged headers are refused before stb_image decodes them") {
  const std::string dir = temp_dir("damaged_headers");
  // SOI, then a DHT segment of one table (class 0, id 0) whose 16 counts are 17 each: 272 codes.
  std::vector<uint8_t> jpeg{0xff, 0xd8, 0xff, 0xc4, 0x00, 0x13, 0x00};
  jpeg.insert(jpeg.end(), 16, 17);
  write_bytes(dir + "/dht.jpg", jpeg);
  CHECK_THROWS_WITH_AS(decode_image(dir + "/dht.jpg"),
                       doctest::Contains("dht.jpg: cannot decode the image (the JPEG Huffman table at byte 6 declares "
                                         "more than 256 codes"),
                       Error);
  // A 54-byte BMP header (24-bit, uncompressed) declaring width x height pixels, and no pixels.
  const auto bmp_header = [](uint32_t width, uint32_t height) {
    std::vector<uint8_t> bytes{'B', 'M', 54, 0, 0, 0, 0, 0, 0, 0, 54, 0, 0, 0, 40, 0, 0, 0};
    for (uint32_t value : {width, height}) {
      for (int shift : {0, 8, 16, 24}) bytes.push_back(static_cast<uint8_t>(value >> shift));
    }
    const std::vector<uint8_t> rest{1, 0, 24, 0};
    bytes.insert(bytes.end(), rest.begin(), rest.end());
    bytes.resize(54, 0);
    return bytes;
  };
  write_bytes(dir + "/tall.bmp", bmp_header(5, 16776963));
  CHECK_THROWS_WITH_AS(decode_image(dir + "/tall.bmp"), doctest::Contains("5x16776963 pixels, more than the 64 megapixels"),
                       Error);
  write_bytes(dir + "/big.bmp", bmp_header(8193, 8193));
  CHECK_THROWS_WITH_AS(decode_image(dir + "/big.bmp"), doctest::Contains("8193x8193 pixels"), Error);
  CHECK_THROWS_WITH_AS(decode_image(dir), doctest::Contains("not a file"), Error);
  // An RLE TGA header declaring 6149 x 1024 pixels, with 48 bytes of data (timeout-tga-6149x1024-in-66-bytes.tga):
  // stb_image decoded all 6.3 million pixels, from zeros past the end of the file.
  std::vector<uint8_t> tga{0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x05, 0x18, 0x00, 0x04, 24, 0};
  tga.resize(66, 0x7f);
  write_bytes(dir + "/short.tga", tga);
  CHECK_THROWS_WITH_AS(decode_image(dir + "/short.tga"),
                       doctest::Contains("declares 6149x1024 pixels, more than its 66 bytes can hold"), Error);
  // The same header with 403 bytes of data (timeout-tga-6149x1024-in-421-bytes.tga): run-length coding holds
  // under 128 pixels a byte, so this is a damaged file too.
  tga.resize(421, 0x7f);
  write_bytes(dir + "/short.tga", tga);
  CHECK_THROWS_WITH_AS(decode_image(dir + "/short.tga"),
                       doctest::Contains("declares 6149x1024 pixels, more than its 421 bytes can hold"), Error);
  // A PNM header with a 14-digit width (crash-pnm-width-overflows-int.ppm): stb_image 2.27 overflowed an int
  // reading it.
  const std::string ppm = "P6 65655555555555 1 255\n";
  write_bytes(dir + "/wide.ppm", std::vector<uint8_t>(ppm.begin(), ppm.end()));
  CHECK_THROWS_WITH_AS(decode_image(dir + "/wide.ppm"), doctest::Contains("a number in its PNM header has 10 digits"),
                       Error);
  // A 16-bit grey PNM (crash-pnm-16-bit-grey.pgm): stb_image 2.27 read past its buffer converting it.
  const std::string pgm = "P5 3 3 324\n" + std::string(18, '\x40');
  write_bytes(dir + "/deep.pgm", std::vector<uint8_t>(pgm.begin(), pgm.end()));
  CHECK_THROWS_WITH_AS(decode_image(dir + "/deep.pgm"), doctest::Contains("16-bit PNM images (maximum value 324)"),
                       Error);
  const std::string grey = "P5 3 3 255\n" + std::string(9, '\x40');
  write_bytes(dir + "/grey.pgm", std::vector<uint8_t>(grey.begin(), grey.end()));
  CHECK(decode_image(dir + "/grey.pgm").pixels[0] == 0x40);
  // A PNG whose IDAT chunk declares about 1 GB in a 103-byte file (oom-png-idat-1gb.png): stb_image 2.27
  // allocated 2 GB for it before reading.
  const std::vector<uint8_t> rgb(5 * 3 * 3, 100);
  REQUIRE(stbi_write_png((dir + "/ok.png").c_str(), 5, 3, 3, rgb.data(), 5 * 3));
  std::ifstream ok(dir + "/ok.png", std::ios::binary);
  std::vector<uint8_t> png((std::istreambuf_iterator<char>(ok)), std::istreambuf_iterator<char>());
  REQUIRE(png.size() > 41);
  CHECK(decode_image(dir + "/ok.png").width == 5);
  const std::vector<uint8_t> huge{0x3f, 0xff, 0xff, 0x00};  // the IDAT chunk after the 13-byte IHDR, at byte 33
  REQUIRE(std::string(png.begin() + 37, png.begin() + 41) == "IDAT");
  std::copy(huge.begin(), huge.end(), png.begin() + 33);
  write_bytes(dir + "/long_chunk.png", png);
  CHECK_THROWS_WITH_AS(decode_image(dir + "/long_chunk.png"), doctest::Contains("a PNG chunk runs past the end"), Error);
  // a file that compresses very well, a blank 2048 x 2048 page, is still read
  const std::vector<uint8_t> page(2048 * 2048, 255);
  REQUIRE(stbi_write_png((dir + "/page.png").c_str(), 2048, 2048, 1, page.data(), 2048));
  CHECK(decode_image(dir + "/page.png").height == 2048);
}

// Found by a user: a BMP cut short decoded without error (stb_image reads its missing rows as zeros), in
// train_mdff's image lists and in mdff_search's queries alike. Each layout is cut at the last byte that
// still holds a pixel, where it is read, and one byte earlier, where it is refused.
TEST_CASE("decode_image: a BMP shorter than its headers say is refused, naming the file") {
  const std::string dir = temp_dir("truncated_bmp");
  std::vector<uint8_t> rgba(5 * 3 * 4);
  for (size_t i = 0; i < rgba.size(); ++i) rgba[i] = static_cast<uint8_t>(i * 13);
  // stb_image_write's BMP of the 5x3 picture: 24-bit rows of 15 bytes padded to 16 after a 54-byte header,
  // or (4 channels) 32-bit BI_BITFIELDS rows of 20 bytes after a 122-byte one.
  const auto bmp = [&](int channels) {
    const std::string path = dir + "/whole.bmp";
    REQUIRE(stbi_write_bmp(path.c_str(), 5, 3, channels, rgba.data()));
    std::ifstream in(path, std::ios::binary);
    return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  };
  const auto cut = [](std::vector<uint8_t> bytes, size_t size) {
    bytes.resize(size);
    return bytes;
  };
  const std::string path = dir + "/picture.bmp";
  const auto refused = [&](const std::vector<uint8_t>& bytes, const std::string& message) {
    write_bytes(path, bytes);
    CHECK_THROWS_WITH_AS(decode_image(path), doctest::Contains((path + ": cannot decode the image (").c_str()), Error);
    CHECK_THROWS_WITH_AS(decode_image(path), doctest::Contains(message.c_str()), Error);
  };
  const auto width_read = [&](const std::vector<uint8_t>& bytes) {
    write_bytes(path, bytes);
    return decode_image(path).width;
  };

  const std::vector<uint8_t> rgb = bmp(3);
  REQUIRE(rgb.size() == 54 + 3 * 16);
  CHECK(width_read(rgb) == 5);
  CHECK(width_read(cut(rgb, 101)) == 5);  // the last row's padding holds no pixel
  refused(cut(rgb, 100), "the BMP's headers declare 5x3 pixels of 24 bits, 47 bytes from byte 54, but the file has "
                         "100 bytes: it is truncated or damaged");
  refused(cut(rgb, 54), "47 bytes from byte 54, but the file has 54 bytes");
  // top-down rows: a negative height
  std::vector<uint8_t> top_down = rgb;
  top_down[22] = 0xfd;  // -3, little-endian
  top_down[23] = top_down[24] = top_down[25] = 0xff;
  CHECK(width_read(cut(top_down, 101)) == 5);
  refused(cut(top_down, 100), "the BMP's headers declare 5x3 pixels of 24 bits, 47 bytes from byte 54");
  // the pixel data's offset past the end of the file
  std::vector<uint8_t> far = rgb;
  far[10] = 0x88;
  far[11] = 0x13;  // 5000
  refused(far, "the BMP's pixel data starts at byte 5000, past the end of its 102 bytes");

  const std::vector<uint8_t> rgba_file = bmp(4);
  REQUIRE(rgba_file.size() == 122 + 3 * 20);
  CHECK(width_read(rgba_file) == 5);
  refused(cut(rgba_file, 181), "5x3 pixels of 32 bits, 60 bytes from byte 122, but the file has 181 bytes");

  // 1 bit a pixel: two rows of 5 bits, each padded to 4 bytes, after a two-colour palette
  std::vector<uint8_t> mono{'B', 'M', 70, 0, 0, 0, 0, 0, 0, 0, 62, 0, 0, 0, 40, 0, 0, 0, 5, 0, 0, 0, 2, 0, 0, 0, 1, 0, 1, 0};
  mono.resize(54, 0);
  const std::vector<uint8_t> palette_and_rows{0, 0, 0, 0, 255, 255, 255, 0, 0xa8, 0, 0, 0, 0x50, 0, 0, 0};
  mono.insert(mono.end(), palette_and_rows.begin(), palette_and_rows.end());
  CHECK(width_read(cut(mono, 67)) == 5);
  refused(cut(mono, 66), "5x2 pixels of 1 bit, 5 bytes from byte 62, but the file has 66 bytes");
}

// Found by fuzzing (CI, fuzz_image: an index past a Huffman table's 256 symbols): stb_image 2.27 leaves its
// JPEG decoder's state uninitialised, so a scan that uses a Huffman table the file never defines decoded
// with whatever the heap held: here the tables of the image decoded just before.
TEST_CASE("decode_image: a JPEG scan with an undefined Huffman table decodes the same after any other image") {
  const std::string dir = temp_dir("jpeg_tables");
  std::vector<uint8_t> rgb(16 * 16 * 3);
  for (size_t i = 0; i < rgb.size(); ++i) rgb[i] = static_cast<uint8_t>(i * 37 % 251);
  REQUIRE(stbi_write_jpg((dir + "/original.jpg").c_str(), 16, 16, 3, rgb.data(), 95));
  std::ifstream in(dir + "/original.jpg", std::ios::binary);
  const std::vector<uint8_t> original((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  // Copies of the file whose DHT tables (ids 0 and 1, as stb_image_write defines them) and scan selectors are
  // moved to ids 2 and 3, or whose DHT segments are dropped, walking its segments from SOI to SOS.
  const auto edit = [&](bool move_tables, bool move_selectors, bool drop_tables) {
    std::vector<uint8_t> out(original.begin(), original.begin() + 2);
    size_t pos = 2;
    for (; pos + 4 <= original.size() && original[pos] == 0xff; ) {
      const uint8_t marker = original[pos + 1];
      const size_t length = (original[pos + 2] << 8) | original[pos + 3];
      std::vector<uint8_t> segment(original.begin() + pos, original.begin() + pos + 2 + length);
      if (marker == 0xc4 && move_tables) {
        for (size_t table = 4; table < segment.size();) {
          segment[table] |= 2;
          table += 17 + std::accumulate(segment.begin() + table + 1, segment.begin() + table + 17, size_t{0});
        }
      }
      if (marker == 0xda && move_selectors) {
        for (size_t c = 0; c < segment[4]; ++c) segment[6 + 2 * c] |= 0x22;
      }
      if (!(marker == 0xc4 && drop_tables)) out.insert(out.end(), segment.begin(), segment.end());
      pos += 2 + length;
      if (marker == 0xda) break;
    }
    REQUIRE(pos < original.size());  // the scan's header was found
    out.insert(out.end(), original.begin() + pos, original.end());
    return out;
  };
  write_bytes(dir + "/moved.jpg", edit(true, true, false));
  write_bytes(dir + "/undefined.jpg", edit(false, true, false));
  write_bytes(dir + "/no_tables.jpg", edit(false, false, true));

  // what decoding a file gives: its pixels, or the error
  const auto outcome = [](const std::string& path) {
    try {
      const std::vector<uint8_t> pixels = decode_image(path).pixels;
      return std::string(pixels.begin(), pixels.end());
    } catch (const Error& e) {
      return std::string("error: ") + e.what();
    }
  };
  const std::string picture = outcome(dir + "/original.jpg");
  REQUIRE(picture.size() == 16 * 16 * 3);
  const std::string first = outcome(dir + "/undefined.jpg");
  // the edit keeps a valid file, whose decoding leaves its tables 2 and 3 on the heap
  CHECK(outcome(dir + "/moved.jpg") == picture);
  const std::string again = outcome(dir + "/undefined.jpg");
  CHECK(again == first);
  CHECK(again != picture);
  // Empty tables decode no bits, so stb_image then reads the scan's data as markers: this one is refused.
  CHECK(again.find("undefined.jpg: cannot decode the image (Corrupt JPEG)") != std::string::npos);
  CHECK_THROWS_WITH_AS(decode_image(dir + "/no_tables.jpg"),
                       doctest::Contains("no_tables.jpg: cannot decode the image (a JPEG without Huffman tables (no "
                                         "DHT segment), as Motion-JPEG video frames are stored"),
                       Error);
}

TEST_CASE("make_batch: ImageNet normalisation, multi-hot labels, positions and rows") {
  const Dataset d = synthetic(6, 4, 32, 32);
  Rng rng(1);
  const Batch b = make_batch(d, {5, 2}, {7, 3}, BatchOptions{}, rng);
  REQUIRE(b.images.shape() == Shape{2, 3, 32, 32});
  CHECK(b.labels.shape() == Shape{2, 4});
  CHECK(b.labels.to_vector() == std::vector<double>{0, 1, 0, 0, 0, 0, 1, 0});
  CHECK(b.index.dtype() == DType::I32);
  CHECK(b.index.to_vector() == std::vector<double>{7, 3});
  CHECK(b.dataset_rows == std::vector<int64_t>{5, 2});
  // a known pixel: 255 in the green channel becomes (1 - 0.456) / 0.224
  Dataset white = d;
  white.pixels[5 * 3072 + 1024] = 255;
  white.pixels[5 * 3072] = 0;
  const Batch w = make_batch(white, {5}, {0}, BatchOptions{}, rng);
  CHECK(w.images.data<float>()[1024] == doctest::Approx((1 - 0.456) / 0.224));
  CHECK(w.images.data<float>()[0] == doctest::Approx(-0.485 / 0.229));
  // every value
  const float* x = b.images.data<float>();
  int wrong = 0;
  for (int64_t i = 0; i < 3072; ++i) {
    wrong += std::abs(x[i] - normalised(synthetic_pixel(5 * 3072 + i) / 255.0f, int(i / 1024))) > 1e-5f;
  }
  CHECK(wrong == 0);

  CHECK_THROWS_WITH_AS(make_batch(d, {1, 2}, {0}, BatchOptions{}, rng), doctest::Contains("give one position per row"),
                       Error);
  CHECK_THROWS_WITH_AS(make_batch(d, {6}, {0}, BatchOptions{}, rng), doctest::Contains("row 6 is outside"), Error);
}

TEST_CASE("make_batch: random horizontal flip when training, reproducible from the rng") {
  const Dataset d = synthetic(1, 2, 4, 4);
  const std::vector<int64_t> rows(64, 0);
  const std::vector<int32_t> positions(64, 0);
  BatchOptions options;
  options.image_size = 4;
  options.flip = options.train = true;
  Rng rng(7);
  const Batch b = make_batch(d, rows, positions, options, rng);
  // each image is the stored one, or its mirror image
  auto value = [&](int c, int y, int x) { return normalised(d.pixels[(c * 4 + y) * 4 + x] / 255.0f, c); };
  const float* x = b.images.data<float>();
  int flipped = 0, kept = 0;
  for (int i = 0; i < 64; ++i) {
    bool same = true, mirrored = true;
    for (int c = 0; c < 3; ++c) {
      for (int y = 0; y < 4; ++y) {
        for (int xo = 0; xo < 4; ++xo) {
          const float v = x[((i * 3 + c) * 4 + y) * 4 + xo];
          same &= v == value(c, y, xo);
          mirrored &= v == value(c, y, 3 - xo);
        }
      }
    }
    CHECK(same != mirrored);
    flipped += mirrored;
    kept += same;
  }
  CHECK(flipped > 16);
  CHECK(kept > 16);
  Rng same_seed(7);
  CHECK(make_batch(d, rows, positions, options, same_seed).images.to_vector() == b.images.to_vector());
  Rng other_seed(8);
  CHECK(make_batch(d, rows, positions, options, other_seed).images.to_vector() != b.images.to_vector());
  options.train = false;  // evaluation never flips
  const std::vector<double> eval = make_batch(d, rows, positions, options, rng).images.to_vector();
  for (int i = 0; i < 64; ++i) CHECK(eval[i * 48 + 3] == doctest::Approx(value(0, 0, 3)));
}

TEST_CASE("make_batch: bilinear resize with PyTorch's align_corners=False") {
  // a 2x2 image v = 60 x + 120 y (all channels) becomes 4x4; PyTorch samples x, y at 0, .25, .75, 1
  Dataset d = synthetic(1, 2, 2, 2);
  d.pixels = {0, 60, 120, 180, 0, 60, 120, 180, 0, 60, 120, 180};  // (3,2,2)
  BatchOptions options;
  options.image_size = 4;
  Rng rng(0);
  const Batch b = make_batch(d, {0}, {0}, options, rng);
  REQUIRE(b.images.shape() == Shape{1, 3, 4, 4});
  const double at[] = {0, 0.25, 0.75, 1};
  for (int c = 0; c < 3; ++c) {
    for (int y = 0; y < 4; ++y) {
      for (int x = 0; x < 4; ++x) {
        const double expected = normalised(static_cast<float>((60 * at[x] + 120 * at[y]) / 255), c);
        CHECK(b.images.data<float>()[(c * 4 + y) * 4 + x] == doctest::Approx(expected).epsilon(1e-5));
      }
    }
  }
}

TEST_CASE("make_batch: crop mode resizes the shorter side, then crops at random (train) or centred (eval)") {
  // 40x42 -> shorter side 20: 20x21; crop 16: 5 free columns, centred at round-half-even(2.5) = 2, top 2
  Dataset d = synthetic(1, 2, 40, 42);
  Rng noise(5);  // random pixels: no two windows alike
  for (uint8_t& p : d.pixels) p = static_cast<uint8_t>(noise.below(256));
  BatchOptions options;
  options.crop_mode = true;
  options.resize = 20;
  options.crop = 16;
  Tensor source = Tensor::empty({1, 3, 40, 42});
  for (int64_t i = 0; i < source.numel(); ++i) source.data<float>()[i] = d.pixels[i] / 255.0f;
  const Tensor resized = ops::resize_bilinear(source, 20, 21);
  // whether image i of batch b is the 16x16 window of `resized` at (top, left), normalised
  auto is_window = [&](const Batch& b, int i, int64_t top, int64_t left) {
    for (int c = 0; c < 3; ++c) {
      for (int y = 0; y < 16; ++y) {
        for (int x = 0; x < 16; ++x) {
          const float want = normalised(resized.data<float>()[(c * 20 + top + y) * 21 + left + x], c);
          if (std::abs(b.images.data<float>()[((i * 3 + c) * 16 + y) * 16 + x] - want) > 1e-5f) return false;
        }
      }
    }
    return true;
  };
  Rng rng(3);
  const Batch eval = make_batch(d, {0}, {0}, options, rng);
  REQUIRE(eval.images.shape() == Shape{1, 3, 16, 16});
  CHECK(is_window(eval, 0, 2, 2));

  options.train = true;
  const std::vector<int64_t> rows(40, 0);
  const Batch train = make_batch(d, rows, std::vector<int32_t>(40, 0), options, rng);
  std::vector<int> windows_seen(5 * 6, 0);
  for (int i = 0; i < 40; ++i) {
    int matches = 0;
    for (int top = 0; top <= 4; ++top) {
      for (int left = 0; left <= 5; ++left) {
        if (is_window(train, i, top, left)) ++matches, ++windows_seen[top * 6 + left];
      }
    }
    CHECK(matches == 1);
  }
  CHECK(std::count(windows_seen.begin(), windows_seen.end(), 0) < 20);  // the offsets vary

  options.crop = 24;
  CHECK_THROWS_WITH_AS(make_batch(d, {0}, {0}, options, rng), doctest::Contains("crop mode needs 1 <= crop <= resize"),
                       Error);
}

TEST_CASE("BatchLoader: every row once per epoch, shuffled when training, deterministic per seed") {
  const Dataset d = synthetic(100, 5, 8, 8);
  std::vector<int64_t> rows;
  for (int64_t r = 0; r < 100; r += 2) rows.push_back(r);  // 50 rows
  LoaderOptions options;
  options.batch_size = 8;
  options.seed = 11;
  options.batch.image_size = 8;
  options.batch.train = options.batch.flip = true;
  BatchLoader loader(d, rows, options);
  CHECK(loader.batches_per_epoch() == 7);
  CHECK_THROWS_WITH_AS(
      [&] {
        Batch b;
        loader.next(b);
      }(),
      doctest::Contains("call start_epoch() first"), Error);

  const std::vector<Batch> first = epoch(loader);
  REQUIRE(first.size() == 7);
  CHECK(first.back().dataset_rows.size() == 2);  // 50 = 6 x 8 + 2
  for (const Batch& b : first) {
    const std::vector<double> index = b.index.to_vector();
    for (size_t i = 0; i < index.size(); ++i) CHECK(rows.at(static_cast<size_t>(index[i])) == b.dataset_rows[i]);
    CHECK(b.labels.to_vector()[b.dataset_rows[0] % 5] == 1);
  }
  std::vector<int64_t> seen = rows_of(first);
  CHECK(seen != rows);  // shuffled
  std::sort(seen.begin(), seen.end());
  CHECK(seen == rows);  // each row once
  const std::vector<int64_t> second_order = rows_of(epoch(loader));
  CHECK(second_order != rows_of(first));  // a new order every epoch
  Batch after_end;
  CHECK_FALSE(loader.next(after_end));

  BatchLoader same_seed(d, rows, options);
  const std::vector<Batch> replay = epoch(same_seed);
  CHECK(rows_of(replay) == rows_of(first));
  for (size_t b = 0; b < first.size(); ++b) CHECK(replay[b].images.to_vector() == first[b].images.to_vector());
  CHECK(rows_of(epoch(same_seed)) == second_order);
  options.seed = 12;
  BatchLoader other_seed(d, rows, options);
  CHECK(rows_of(epoch(other_seed)) != rows_of(first));

  options.drop_last = true;
  BatchLoader dropping(d, rows, options);
  const std::vector<Batch> full = epoch(dropping);
  CHECK(full.size() == 6);
  std::vector<int64_t> kept = rows_of(full);
  std::sort(kept.begin(), kept.end());
  CHECK(std::unique(kept.begin(), kept.end()) == kept.end());
  CHECK(kept.size() == 48);
  CHECK(BatchLoader(d, std::vector<int64_t>(rows.begin(), rows.begin() + 47), options).batches_per_epoch() == 5);

  // evaluation: the given order, no augmentation; restarting mid-epoch starts over
  options.batch.train = false;
  options.drop_last = false;
  BatchLoader eval(d, rows, options);
  eval.start_epoch();
  Batch b;
  REQUIRE(eval.next(b));
  REQUIRE(eval.next(b));
  CHECK(rows_of(epoch(eval)) == rows);
}

TEST_CASE("BatchLoader: an error on the worker thread is rethrown by next()") {
  const std::string dir = write_images("loader_error");
  write_text(dir + "/list.txt", "a.png 1 0\nsub/b.png 0 1\nc.png 1 1\nbad.png 1 0\na.png 0 1\n");
  const Dataset d = load_image_list(dir + "/list.txt", dir, 2);
  LoaderOptions options;
  options.batch_size = 2;
  options.batch.image_size = 6;
  BatchLoader loader(d, {0, 1, 2, 3, 4}, options);
  loader.start_epoch();
  Batch b;
  REQUIRE(loader.next(b));
  CHECK(b.images.shape() == Shape{2, 3, 6, 6});
  CHECK_THROWS_WITH_AS(loader.next(b), doctest::Contains("bad.png: cannot decode the image"), Error);
  CHECK_FALSE(loader.next(b));  // the epoch ended with the error
  loader.start_epoch();         // a new epoch runs into it again
  REQUIRE(loader.next(b));
  CHECK_THROWS_AS(loader.next(b), Error);
}

TEST_CASE("make_batch timing (batch 32)") {
  if (!fs::exists(std::string(kFashionMnistDir) + "/train-images-idx3-ubyte.gz")) return;
  const Dataset d = load_fashion_mnist(kFashionMnistDir);
  std::vector<int64_t> rows(32);
  std::iota(rows.begin(), rows.end(), 1000);
  for (int size : {32, 224}) {
    BatchOptions options;
    options.image_size = size;
    options.train = options.flip = true;
    Rng rng(0);
    make_batch(d, rows, iota_positions(32), options, rng);  // warm-up
    const int repeats = 10;
    const auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < repeats; ++r) make_batch(d, rows, iota_positions(32), options, rng);
    const double ms = 1e3 * std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / repeats;
    MESSAGE("make_batch, 32 Fashion-MNIST images at ", size, "x", size, ": ", ms, " ms");
  }
}
