// .npy writing (version 1.0, 64-byte aligned data) and a strict reader of the header's Python dict
// literal: magic, version, header length, the keys 'descr', 'fortran_order' and 'shape', and a data
// size that matches the shape exactly (see npy.h).
#include "retrieval/npy.h"

#include <cctype>
#include <cstring>
#include <limits>

#include "core/error.h"
#include "core/file_io.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, ".npy I/O writes '<f4' and assumes a little-endian host");

namespace mdff::retrieval {

namespace {
constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicBytes = 6;
constexpr size_t kAlignment = 64;

struct DTypeInfo {
  NpyDType dtype;
  const char* descr;
  const char* name;
  size_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {NpyDType::Int8, "|i1", "int8", 1},
    {NpyDType::UInt8, "|u1", "uint8", 1},
    {NpyDType::Float32, "<f4", "float32", 4},
};

const DTypeInfo& info(NpyDType dtype) {
  for (const DTypeInfo& entry : kDTypes) {
    if (entry.dtype == dtype) return entry;
  }
  MDFF_FAIL("unknown NpyDType ", static_cast<int>(dtype));
}

std::string shape_tuple(const Shape& shape) {
  std::string text = "(";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + (shape.size() == 1 ? ",)" : ")");
}

void write_array(const std::string& path, NpyDType dtype, const void* values, size_t count, const Shape& shape) {
  MDFF_CHECK(!shape.empty(), "write_npy ", path, ": the shape must have at least one dimension");
  for (int64_t d : shape) MDFF_CHECK(d >= 0, "write_npy ", path, ": negative dimension in shape ", shape_str(shape));
  MDFF_CHECK(numel(shape) == static_cast<int64_t>(count), "write_npy ", path, ": shape ", shape_str(shape), " holds ",
             numel(shape), " values but ", count, " were given");
  const DTypeInfo& type = info(dtype);
  std::string header = std::string("{'descr': '") + type.descr + "', 'fortran_order': False, 'shape': " +
                       shape_tuple(shape) + ", }";
  // magic (6) + version (2) + header length (2) + header, padded with spaces and ended by '\n'.
  const size_t unpadded = kMagicBytes + 4 + header.size() + 1;
  header.append((kAlignment - unpadded % kAlignment) % kAlignment, ' ');
  header += '\n';
  MDFF_CHECK(header.size() <= std::numeric_limits<uint16_t>::max(), "write_npy ", path, ": the header of shape ",
             shape_str(shape), " is too long for format version 1.0");
  const uint8_t preamble[4] = {1, 0, static_cast<uint8_t>(header.size() & 0xff), static_cast<uint8_t>(header.size() >> 8)};
  io::write_file_atomic(path, {{kMagic, kMagicBytes}, {preamble, sizeof preamble}, {header.data(), header.size()},
                           {values, count * type.size}});
}

// A recursive-descent reader of the header dict, e.g. {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
class HeaderParser {
 public:
  HeaderParser(const std::string& path, const std::string& text) : path_(path), text_(text) {}

  NpyArray parse() {
    NpyArray array;
    bool have_descr = false, have_order = false, have_shape = false;
    expect('{');
    while (!accept('}')) {
      const std::string key = quoted();
      expect(':');
      if (key == "descr") {
        array.dtype = dtype_of(quoted());
        have_descr = true;
      } else if (key == "fortran_order") {
        const bool fortran = boolean();
        if (fortran) fail("the array is in Fortran order; only C-order arrays are read");
        have_order = true;
      } else if (key == "shape") {
        array.shape = tuple();
        have_shape = true;
      } else {
        fail("unexpected key '" + key + "'");
      }
      if (!accept(',')) {
        expect('}');
        break;
      }
    }
    skip_space();
    if (pos_ != text_.size()) fail("unexpected text after the dict");
    if (!have_descr || !have_order || !have_shape) fail("the dict needs the keys 'descr', 'fortran_order' and 'shape'");
    return array;
  }

 private:
  [[noreturn]] void fail(const std::string& problem) const {
    MDFF_FAIL(path_, ": not a valid .npy header: ", problem, " (header: ", text_.substr(0, 200), ")");
  }
  void skip_space() {
    while (pos_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[pos_]))) ++pos_;
  }
  bool accept(char c) {
    skip_space();
    if (pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  void expect(char c) {
    if (!accept(c)) fail(std::string("expected '") + c + "' at offset " + std::to_string(pos_));
  }
  std::string quoted() {
    skip_space();
    if (pos_ >= text_.size() || (text_[pos_] != '\'' && text_[pos_] != '"')) {
      fail("expected a quoted string at offset " + std::to_string(pos_));
    }
    const char quote = text_[pos_++];
    const size_t end = text_.find(quote, pos_);
    if (end == std::string::npos) fail("unterminated string");
    std::string value = text_.substr(pos_, end - pos_);
    pos_ = end + 1;
    return value;
  }
  bool boolean() {
    skip_space();
    for (const auto& [word, value] : {std::pair<const char*, bool>{"True", true}, {"False", false}}) {
      if (text_.compare(pos_, std::strlen(word), word) == 0) {
        pos_ += std::strlen(word);
        return value;
      }
    }
    fail("'fortran_order' must be True or False");
  }
  Shape tuple() {
    Shape shape;
    expect('(');
    while (!accept(')')) {
      skip_space();
      if (pos_ >= text_.size() || !std::isdigit(static_cast<unsigned char>(text_[pos_]))) {
        fail("the shape must be a tuple of non-negative integers");
      }
      int64_t d = 0;
      while (pos_ < text_.size() && std::isdigit(static_cast<unsigned char>(text_[pos_]))) {
        if (d > (std::numeric_limits<int64_t>::max() - 9) / 10) fail("a dimension of the shape is too large");
        d = d * 10 + (text_[pos_++] - '0');
      }
      shape.push_back(d);
      if (!accept(',')) {
        expect(')');
        break;
      }
    }
    return shape;
  }
  NpyDType dtype_of(const std::string& descr) const {
    for (const DTypeInfo& entry : kDTypes) {
      if (descr == entry.descr) return entry.dtype;
    }
    fail("dtype '" + descr + "' is not supported; this reader handles '|i1' (int8), '|u1' (uint8) and '<f4' (float32)");
  }

  const std::string& path_;
  const std::string& text_;
  size_t pos_ = 0;
};

uint32_t little_endian(const uint8_t* bytes, size_t count) {
  uint32_t value = 0;
  for (size_t i = 0; i < count; ++i) value |= static_cast<uint32_t>(bytes[i]) << (8 * i);
  return value;
}

template <class T>
std::vector<T> typed_values(const NpyArray& array, NpyDType want) {
  MDFF_CHECK(array.dtype == want, "the .npy array holds ", info(array.dtype).name, " values, not ", info(want).name);
  std::vector<T> values(array.bytes.size() / sizeof(T));
  if (!values.empty())  // an empty array's buffers may be null, which memcpy must not get even for 0 bytes
    std::memcpy(values.data(), array.bytes.data(), values.size() * sizeof(T));
  return values;
}
}  // namespace

void write_npy(const std::string& path, const std::vector<int8_t>& values, const Shape& shape) {
  write_array(path, NpyDType::Int8, values.data(), values.size(), shape);
}
void write_npy(const std::string& path, const std::vector<uint8_t>& values, const Shape& shape) {
  write_array(path, NpyDType::UInt8, values.data(), values.size(), shape);
}
void write_npy(const std::string& path, const std::vector<float>& values, const Shape& shape) {
  write_array(path, NpyDType::Float32, values.data(), values.size(), shape);
}

void write_npy_codes(const std::string& path, const PackedCodes& codes) {
  write_npy(path, unpack_codes(codes), {codes.count, codes.bits});
}

std::vector<int8_t> NpyArray::int8_values() const { return typed_values<int8_t>(*this, NpyDType::Int8); }
std::vector<uint8_t> NpyArray::uint8_values() const { return typed_values<uint8_t>(*this, NpyDType::UInt8); }
std::vector<float> NpyArray::float32_values() const { return typed_values<float>(*this, NpyDType::Float32); }

NpyArray read_npy(const std::string& path) {
  std::vector<uint8_t> file = io::read_file(path);
  MDFF_CHECK(file.size() >= kMagicBytes + 2 && std::memcmp(file.data(), kMagic, kMagicBytes) == 0, path,
             ": not a .npy file (it does not start with the magic string \\x93NUMPY)");
  const int major = file[kMagicBytes], minor = file[kMagicBytes + 1];
  MDFF_CHECK(major >= 1 && major <= 3 && minor == 0, path, ": .npy format version ", major, ".", minor,
             " is not supported (1.0, 2.0 and 3.0 are)");
  const size_t length_bytes = major == 1 ? 2 : 4;
  const size_t header_start = kMagicBytes + 2 + length_bytes;
  MDFF_CHECK(file.size() >= header_start, path, ": truncated .npy file: it ends inside the header length");
  const size_t header_length = little_endian(file.data() + kMagicBytes + 2, length_bytes);
  MDFF_CHECK(file.size() - header_start >= header_length, path, ": truncated .npy file: the header should have ",
             header_length, " bytes but the file ends after ", file.size() - header_start);
  const std::string header(reinterpret_cast<const char*>(file.data()) + header_start, header_length);
  NpyArray array = HeaderParser(path, header).parse();

  const size_t data_start = header_start + header_length;
  uint64_t expected = info(array.dtype).size;
  for (int64_t d : array.shape) {
    MDFF_CHECK(d == 0 || expected <= std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(d), path,
               ": the shape ", shape_str(array.shape), " is too large");
    expected *= static_cast<uint64_t>(d);
  }
  const uint64_t actual = file.size() - data_start;
  MDFF_CHECK(actual == expected, path, ": the data of a ", info(array.dtype).name, " array of shape ",
             shape_str(array.shape), " should have ", expected, " bytes but the file holds ", actual,
             actual < expected ? " (truncated)" : " (trailing bytes)");
  array.bytes.assign(file.begin() + static_cast<std::ptrdiff_t>(data_start), file.end());
  return array;
}

}  // namespace mdff::retrieval
