// Dataset loaders (see dataset.h): CIFAR-10 binary batches, Fashion-MNIST IDX files, image lists, and
// image decoding with stb_image (its implementation is compiled here, once for the whole library).
#include "data/dataset.h"

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <system_error>

#include "core/error.h"
#include "data/idx.h"

// A damaged header must not make stb_image allocate gigabytes or loop over millions of rows: it refuses
// sides over 32768 itself, and decode_image refuses images over kMaxImagePixels before decoding.
#define STB_IMAGE_IMPLEMENTATION
#define STBI_FAILURE_USERMSG
#define STBI_MAX_DIMENSIONS (1 << 15)
// Two kinds of undefined behaviour in stb_image 2.27 that no check of the file can catch beforehand, both
// harmless on x86-64 and fixed in stb_image 2.28: memcpy(NULL, p, 0) for a PNG whose first IDAT chunk is
// empty (a valid file), and, on corrupt JPEG entropy-coded data, a 32-bit shift by more than 31 bits
// (stbi__grow_buffer_unsafe) that yields garbage pixels. Its functions alone are exempt from those two
// checks of the fuzzing build (clang, tests/fuzz); a newer stb_image would make this unnecessary.
// And stb_image 2.27 leaves its JPEG decoder's state uninitialised (2.28 zeroes it), so a scan that uses a
// Huffman table the file never defines reads whatever the heap held: a table left by an earlier image, or a
// torn one that indexes past its 256 symbols (found by fuzzing). Every block stb_image allocates is zeroed
// here (its reallocations, which keep their contents, are not), so such a table is empty, as in 2.28: it
// decodes every coefficient as 0, the same on every run.
#define STBI_MALLOC(size) calloc(1, size)
#define STBI_REALLOC(pointer, size) realloc(pointer, size)
#define STBI_FREE(pointer) free(pointer)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((no_sanitize("nonnull-attribute", "shift"))), apply_to = function)
#endif
#include <stb/stb_image.h>
#if defined(__clang__)
#pragma clang attribute pop
#endif

namespace mdff::data {

namespace fs = std::filesystem;

namespace {
constexpr int64_t kMaxImagePixels = int64_t{1} << 26;  // 64 megapixels, e.g. 8192x8192
// stb_image 2.27 also reads the numbers of a PNM header into an int without checking for overflow
// (undefined behaviour), and reads past its buffer converting a 16-bit grey PNM (both fixed in 2.28). In a
// P5 or P6 file, the width, height and maximum value are found as stb_image finds them (whitespace and
// # comments before each); returns why the header is refused, or "" when it is not.
std::string pnm_header_problem(const std::vector<uint8_t>& bytes) {
  if (bytes.size() < 2 || bytes[0] != 'P' || (bytes[1] != '5' && bytes[1] != '6')) return "";
  const auto space = [](uint8_t c) { return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r'; };
  size_t pos = 2;
  int64_t value = 0;
  for (int number = 0; number < 3; ++number) {
    for (;;) {
      while (pos < bytes.size() && space(bytes[pos])) ++pos;
      if (pos >= bytes.size() || bytes[pos] != '#') break;
      while (pos < bytes.size() && bytes[pos] != '\n' && bytes[pos] != '\r') ++pos;
    }
    size_t digits = 0;
    for (value = 0; pos < bytes.size() && bytes[pos] >= '0' && bytes[pos] <= '9'; ++pos, ++digits) {
      if (digits >= 9) return "a number in its PNM header has 10 digits or more: the file is damaged";
      value = value * 10 + (bytes[pos] - '0');
    }
  }
  if (value > 255) return "16-bit PNM images (maximum value " + std::to_string(value) + ") are not read";
  return "";
}

// stb_image 2.27 also grows its PNG data buffer to a chunk's declared length before reading the chunk
// (doubling up to 2 GB for a 100-byte file). So in a PNG every chunk up to IEND must fit in the file, as
// it does in any PNG that is not truncated.
bool png_chunk_past_end(const std::vector<uint8_t>& bytes) {
  static const uint8_t kSignature[] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (bytes.size() < 8 || !std::equal(kSignature, kSignature + 8, bytes.begin())) return false;
  for (size_t pos = 8; pos + 8 <= bytes.size();) {
    const uint64_t length = (uint64_t{bytes[pos]} << 24) | (bytes[pos + 1] << 16) | (bytes[pos + 2] << 8) | bytes[pos + 3];
    if (length + 12 > bytes.size() - pos) return true;  // length, type, data, CRC
    if (std::equal(bytes.begin() + pos + 4, bytes.begin() + pos + 8, "IEND")) return false;
    pos += 12 + length;
  }
  return false;
}

// The most pixels a byte of each format can hold, with room to spare: a 1-bit PNG at deflate's best ratio
// about 8,300, a GIF's LZW about 2,700, a progressive JPEG's end-of-band runs a few hundred, and the
// run-length codings of the others (TGA, PSD, HDR, ...) under 128. A header declaring more is a truncated or
// damaged file, which stb_image would otherwise decode in full from zeros read past its end.
int64_t max_pixels_per_byte(const std::vector<uint8_t>& bytes) {
  const auto starts_with = [&](const char* magic, size_t n) {
    return bytes.size() >= n && std::equal(magic, magic + n, bytes.begin(), [](char a, uint8_t b) {
             return static_cast<uint8_t>(a) == b;
           });
  };
  if (starts_with("\x89PNG", 4)) return 16384;
  if (starts_with("GIF8", 4)) return 4096;
  if (starts_with("\xff\xd8", 2)) return 1024;
  return 128;
}
// stb_image reads a BMP's pixel rows without noticing the end of the file (it reads zeros past it), so a
// truncated BMP decoded without error, its missing rows black. So a BMP must reach as far as its headers
// say: the pixel data's offset (in the 14-byte file header) lies inside the file, and in the uncompressed
// layouts (BI_RGB, BI_BITFIELDS) every row, padded to 4 bytes, follows it; only the last row's padding,
// which holds no pixel, may be missing. The size of compressed pixel data (RLE, embedded JPEG or PNG) is not
// in the header, and stb_image refuses those layouts anyway. The width and height are read as stb_image
// reads them: 16-bit in the 12-byte OS/2 header, else 32-bit with a negative height for top-down rows.
// Returns why the file is refused, or "" when it is not (or is not a BMP whose header stb_image reads).
std::string bmp_truncation_problem(const std::vector<uint8_t>& bytes) {
  if (bytes.size() < 18 || bytes[0] != 'B' || bytes[1] != 'M') return "";
  const auto le = [&](size_t pos, int n) {  // an n-byte little-endian number, 0 read past the end
    uint32_t value = 0;
    for (int i = n - 1; i >= 0; --i) value = (value << 8) | (pos + i < bytes.size() ? bytes[pos + i] : 0);
    return value;
  };
  const uint32_t offset = le(10, 4), header_size = le(14, 4);
  if (header_size != 12 && header_size != 40 && header_size != 56 && header_size != 108 && header_size != 124) return "";
  const std::string size = std::to_string(bytes.size());
  if (offset > bytes.size()) {
    return "the BMP's pixel data starts at byte " + std::to_string(offset) + ", past the end of its " + size +
           " bytes: the file is truncated or damaged";
  }
  const bool os2 = header_size == 12;
  const int64_t width = os2 ? le(18, 2) : le(18, 4);
  const int64_t height = os2 ? le(20, 2) : std::abs(int64_t{static_cast<int32_t>(le(22, 4))});
  const int64_t bits = os2 ? le(24, 2) : le(28, 2), compression = os2 ? 0 : le(30, 4);
  if (compression != 0 && compression != 3) return "";
  if (width > STBI_MAX_DIMENSIONS || height > STBI_MAX_DIMENSIONS) return "";  // stb_image refuses them itself
  const int64_t row_bytes = (width * bits + 31) / 32 * 4, last_row_bytes = (width * bits + 7) / 8;
  const int64_t needed = height == 0 ? 0 : row_bytes * (height - 1) + last_row_bytes;
  if (needed <= static_cast<int64_t>(bytes.size()) - offset) return "";
  return "the BMP's headers declare " + std::to_string(width) + "x" + std::to_string(height) + " pixels of " +
         std::to_string(bits) + (bits == 1 ? " bit, " : " bits, ") + std::to_string(needed) + " bytes from byte " +
         std::to_string(offset) + ", but the file has " + size + " bytes: it is truncated or damaged";
}

constexpr const char* kImageFormats = "formats read: JPEG, PNG, BMP, GIF, TGA, PSD, PNM, HDR";

constexpr const char* kCifar10Hint =
    "get CIFAR-10's binary version with scripts/download_cifar10.sh (it downloads cifar-10-binary.tar.gz "
    "and unpacks cifar-10-batches-bin/), then pass that folder";

// The file system's answers without its exceptions: a path it cannot look up (too long, or through a
// file) counts as missing, so that the caller's error names the path.
bool path_exists(const std::string& path) {
  std::error_code ignored;
  return fs::exists(path, ignored);
}
bool is_file(const std::string& path) {
  std::error_code ignored;
  return fs::is_regular_file(path, ignored);
}
bool is_folder(const std::string& path) {
  std::error_code ignored;
  return fs::is_directory(path, ignored);
}

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  MDFF_CHECK(in, path, ": cannot open for reading");
  std::vector<uint8_t> bytes(fs::file_size(path));
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  MDFF_CHECK(in.gcount() == static_cast<std::streamsize>(bytes.size()), path, ": read error");
  return bytes;
}

// Non-empty, whitespace-trimmed lines of batches.meta.txt, or the standard names when it is absent.
std::vector<std::string> cifar10_class_names(const std::string& dir) {
  const std::string path = dir + "/batches.meta.txt";
  if (!path_exists(path)) {
    return {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"};
  }
  std::ifstream in(path);
  std::vector<std::string> names;
  for (std::string line, name; std::getline(in, line);) {
    if (std::istringstream(line) >> name) names.push_back(name);
  }
  MDFF_CHECK(names.size() == 10, path, ": expected 10 class names (one a line), found ", names.size(),
             "; restore the file from cifar-10-binary.tar.gz or delete it to use the standard names");
  return names;
}

void set_one_hot(Dataset& d, int64_t row, int label) { d.labels[row * d.classes + label] = 1; }

// stb_image 2.27 (Debian 12's libstb-dev) builds a JPEG Huffman table without checking that the 16 code
// counts of a DHT segment add up to at most 256 (stb_image 2.28 does), and writes past the table when they
// do not. So in a JPEG (0xFF, any 0xFF fill bytes, then 0xD8, as stb_image recognises one), every place
// stb_image could read a DHT segment from (each 0xFF 0xC4) is checked first, table by table as stb_image
// reads them (reading 0 past the end, as it does). A JPEG with no DHT segment at all is refused too: its
// scans could only use tables it never defines, which stb_image (with the zeroed allocations above) takes
// as empty: a flat grey picture, or an error where the scan's data then reads as markers. Motion-JPEG
// video frames are stored so, relying on the standard's tables.
// Returns why the file is refused, or "" when it is not (or is not a JPEG).
std::string jpeg_huffman_problem(const std::vector<uint8_t>& bytes) {
  size_t start = 0;
  while (start < bytes.size() && bytes[start] == 0xff) ++start;
  if (start == 0 || start == bytes.size() || bytes[start] != 0xd8) return "";  // not a JPEG
  const auto at = [&](size_t i) -> int { return i < bytes.size() ? bytes[i] : 0; };
  bool has_dht = false;
  for (size_t marker = start; marker + 1 < bytes.size(); ++marker) {
    if (bytes[marker] != 0xff || bytes[marker + 1] != 0xc4) continue;
    has_dht = true;
    int64_t left = ((at(marker + 2) << 8) | at(marker + 3)) - 2;  // the segment's length after its length field
    size_t table = marker + 4;
    while (left > 0 && (at(table) >> 4) <= 1 && (at(table) & 15) <= 3) {  // stb_image stops at a bad class or id
      int codes = 0;
      for (size_t i = 1; i <= 16; ++i) codes += at(table + i);
      if (codes > 256) {
        return "the JPEG Huffman table at byte " + std::to_string(table) + " declares more than 256 codes: the file "
               "is damaged";
      }
      table += 17 + codes;
      left -= 17 + codes;
    }
  }
  if (!has_dht) {
    return "a JPEG without Huffman tables (no DHT segment), as Motion-JPEG video frames are stored; extract the "
           "frames with ffmpeg's -bsf:v mjpeg2jpeg, or convert the file to PNG";
  }
  return "";
}
}  // namespace

Dataset load_cifar10(const std::string& dir_arg, int64_t records_per_file) {
  MDFF_CHECK(records_per_file > 0, "load_cifar10: records_per_file must be positive, got ", records_per_file);
  MDFF_CHECK(is_folder(dir_arg), "CIFAR-10: the folder ", dir_arg, " does not exist; ", kCifar10Hint);
  // Accept the folder that holds cifar-10-batches-bin/ (where the download script unpacks it).
  std::string dir = dir_arg;
  if (!path_exists(dir + "/data_batch_1.bin") && path_exists(dir + "/cifar-10-batches-bin/data_batch_1.bin")) {
    dir += "/cifar-10-batches-bin";
  }
  constexpr int64_t kImageBytes = 3 * 32 * 32, kRecordBytes = 1 + kImageBytes;
  const std::vector<std::string> files{"data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin",
                                       "data_batch_4.bin", "data_batch_5.bin", "test_batch.bin"};
  Dataset d;
  d.name = "cifar10";
  d.classes = 10;
  d.class_names = cifar10_class_names(dir);
  d.channels = 3;
  d.height = d.width = 32;
  const int64_t n = records_per_file * static_cast<int64_t>(files.size());
  d.pixels.resize(static_cast<size_t>(n * kImageBytes));
  d.labels.assign(static_cast<size_t>(n * d.classes), 0);
  int64_t row = 0;
  for (const std::string& file : files) {
    const std::string path = dir + "/" + file;
    MDFF_CHECK(is_file(path), "CIFAR-10: ", path, " is missing or not a file (looked in ", dir, "); ",
               kCifar10Hint);
    const int64_t expected = records_per_file * kRecordBytes;
    const auto actual = static_cast<int64_t>(fs::file_size(path));
    MDFF_CHECK(actual == expected, path, ": ", actual, " bytes, expected ", expected, " (", records_per_file,
               " records of 1 label byte + 3072 pixel bytes); the file is truncated or not from CIFAR-10's binary "
               "version (the Python and MATLAB versions do not work here); ",
               kCifar10Hint);
    const std::vector<uint8_t> bytes = read_file(path);
    for (int64_t r = 0; r < records_per_file; ++r, ++row) {
      const uint8_t* record = bytes.data() + r * kRecordBytes;
      MDFF_CHECK(record[0] < 10, path, ": record ", r, " (byte offset ", r * kRecordBytes, ") has label ",
                 int(record[0]), ", outside 0..9; the file is damaged: ", kCifar10Hint);
      set_one_hot(d, row, record[0]);
      std::copy(record + 1, record + kRecordBytes, d.pixels.begin() + row * kImageBytes);
    }
  }
  return d;
}

Dataset load_fashion_mnist(const std::string& dir) {
  constexpr int kIn = 28, kPad = 2, kOut = kIn + 2 * kPad;
  const std::string hint = " (Fashion-MNIST: install Debian's dataset-fashion-mnist, which puts the files in " +
                           std::string(kFashionMnistDir) +
                           ", or pass the folder that holds train-images-idx3-ubyte.gz and the others)";
  MDFF_CHECK(is_folder(dir), "Fashion-MNIST: the folder ", dir, " does not exist", hint);
  // `name`.gz, else the uncompressed `name`.
  auto find = [&](const std::string& name) {
    const std::string gz = dir + "/" + name + ".gz", plain = dir + "/" + name;
    if (path_exists(gz) || !path_exists(plain)) {
      MDFF_CHECK(path_exists(gz), "Fashion-MNIST: neither ", gz, " nor ", plain, " exists", hint);
      return gz;
    }
    return plain;
  };
  Dataset d;
  d.name = "fashion-mnist";
  d.classes = 10;
  d.class_names = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};
  d.channels = 3;
  d.height = d.width = kOut;
  for (const std::string prefix : {"train", "t10k"}) {
    const std::string images_path = find(prefix + "-images-idx3-ubyte");
    const std::string labels_path = find(prefix + "-labels-idx1-ubyte");
    const IdxArray images = read_idx(images_path), labels = read_idx(labels_path);
    std::ostringstream shape;
    for (int64_t size : images.shape) shape << (shape.tellp() ? "," : "(") << size;
    MDFF_CHECK(images.shape.size() == 3 && images.shape[1] == kIn && images.shape[2] == kIn, images_path,
               ": expected images of shape (n,28,28), found ", shape.str(), ")");
    MDFF_CHECK(labels.shape.size() == 1 && labels.shape[0] == images.shape[0], labels_path, ": holds ",
               labels.values.size(), " labels but ", images_path, " holds ", images.shape[0],
               " images; the two files must come from the same release");
    const int64_t first = d.size(), count = images.shape[0];
    d.labels.resize(static_cast<size_t>((first + count) * d.classes), 0);
    d.pixels.resize(static_cast<size_t>((first + count) * 3 * kOut * kOut), 0);
    for (int64_t i = 0; i < count; ++i) {
      const uint8_t label = labels.values[i];
      MDFF_CHECK(label < 10, labels_path, ": label ", i, " is ", int(label), ", outside 0..9; the file is damaged");
      set_one_hot(d, first + i, label);
      const uint8_t* src = images.values.data() + i * kIn * kIn;
      uint8_t* dst = d.pixels.data() + (first + i) * 3 * kOut * kOut;
      for (int c = 0; c < 3; ++c) {
        for (int y = 0; y < kIn; ++y) {
          std::copy(src + y * kIn, src + (y + 1) * kIn, dst + (c * kOut + y + kPad) * kOut + kPad);
        }
      }
    }
  }
  return d;
}

Dataset load_image_list(const std::string& list_file, const std::string& root, int classes) {
  MDFF_CHECK(classes > 0, "load_image_list: the number of classes must be positive, got ", classes);
  std::ifstream in(list_file);
  MDFF_CHECK(path_exists(list_file) && in, list_file, ": cannot open the image list (no such file?)");
  Dataset d;
  d.name = list_file;
  d.classes = classes;
  d.multi_label = true;
  for (int k = 0; k < classes; ++k) d.class_names.push_back(std::to_string(k));
  int64_t line_number = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_number;
    std::istringstream fields(line);
    std::string path;
    if (!(fields >> path)) continue;  // blank line
    const std::string where = list_file + ":" + std::to_string(line_number) + ": ";
    std::vector<uint8_t> row;
    for (std::string value; fields >> value;) {
      // A first "label" that is not a number is most likely the rest of a path with a space.
      const bool path_with_space = row.empty() && value.find_first_not_of("0123456789") != std::string::npos;
      MDFF_CHECK(value == "0" || value == "1", where, "label ", row.size() + 1, " is '", value,
                 "'; labels must be 0 or 1 (the line is `path l1 ... l", classes, "`",
                 path_with_space ? ", separated by spaces, so a path cannot hold one: rename such files" : "", ")");
      row.push_back(value == "1");
    }
    MDFF_CHECK(static_cast<int>(row.size()) == classes, where, "found ", row.size(),
               " labels after the path, expected ", classes, " (the line is `path l1 ... l", classes,
               "`; is the number of classes right?)");
    MDFF_CHECK(std::find(row.begin(), row.end(), 1) != row.end(), where, "the image ", path, " has no label (all ",
               classes, " are 0); remove the line from the list");
    const std::string resolved = fs::path(path).is_absolute() ? path : (fs::path(root) / path).string();
    MDFF_CHECK(path_exists(resolved), where, "the image ", resolved,
               " does not exist (relative paths are taken from the "
               "root folder '",
               root, "'; is it right?)");
    d.image_paths.push_back(resolved);
    d.labels.insert(d.labels.end(), row.begin(), row.end());
  }
  MDFF_CHECK(!d.image_paths.empty(), list_file, ": the image list is empty");
  return d;
}

Image decode_image(const std::string& path) {
  MDFF_CHECK(path_exists(path), path, ": no such image file");
  MDFF_CHECK(is_file(path), path, ": not a file (a folder?), so not an image");
  MDFF_CHECK(fs::file_size(path) <= static_cast<uintmax_t>(std::numeric_limits<int>::max()), path, ": ",
             fs::file_size(path), " bytes, too large for an image file (stb_image reads up to 2 GB)");
  const std::vector<uint8_t> bytes = read_file(path);
  for (const std::string& problem :
       {jpeg_huffman_problem(bytes), pnm_header_problem(bytes), bmp_truncation_problem(bytes)}) {
    MDFF_CHECK(problem.empty(), path, ": cannot decode the image (", problem, ")");
  }
  MDFF_CHECK(!png_chunk_past_end(bytes), path, ": cannot decode the image (a PNG chunk runs past the end of the "
             "file: it is truncated or damaged)");
  const int size = static_cast<int>(bytes.size());
  int width = 0, height = 0, channels_in_file = 0;
  MDFF_CHECK(stbi_info_from_memory(bytes.data(), size, &width, &height, &channels_in_file), path,
             ": cannot decode the image (", stbi_failure_reason(), "); ", kImageFormats);
  MDFF_CHECK(int64_t{width} * height <= kMaxImagePixels, path, ": the image is ", width, "x", height,
             " pixels, more than the ", kMaxImagePixels >> 20, " megapixels read here (a damaged header, or resize "
             "the image first)");
  MDFF_CHECK(int64_t{width} * height <= max_pixels_per_byte(bytes) * size, path, ": the image declares ", width, "x", height,
             " pixels, more than its ", size, " bytes can hold: the file is truncated or damaged");
  uint8_t* pixels = stbi_load_from_memory(bytes.data(), size, &width, &height, &channels_in_file, 3);
  MDFF_CHECK(pixels, path, ": cannot decode the image (", stbi_failure_reason(), "); ", kImageFormats);
  Image image;
  image.height = height;
  image.width = width;
  image.pixels.assign(pixels, pixels + int64_t(height) * width * 3);
  stbi_image_free(pixels);
  return image;
}

}  // namespace mdff::data
