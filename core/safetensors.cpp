// Safetensors reading and writing (see safetensors.h): the writer's temporary file that is renamed into
// place, the reader's check of every rule of the format, and the dtype conversions of to_tensor.
#include "core/safetensors.h"

#include "core/file_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"

// Tensor bytes are copied between memory and the file as they are; the format stores them little-endian.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors I/O assumes a little-endian host");

namespace mdff::io {

namespace {
// ordered_json keeps the header's keys in file order: the writer's keys come out in the order given,
// and the reader breaks ties between empty tensors at the same offset by their order in the header.
using Json = nlohmann::ordered_json;

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the reference implementation's limit
constexpr int kMaxJsonDepth = 16;                  // a valid header nests 2 deep (tensor entry, shape)

// The safetensors dtypes this reader understands.
enum class StoredType { F64, F32, BF16, F16, I64, I32, U8, BOOL };
struct StoredTypeInfo {
  StoredType type;
  const char* name;
  size_t size;
  bool floating;
};
constexpr StoredTypeInfo kStoredTypes[] = {
    {StoredType::F64, "F64", 8, true},  {StoredType::F32, "F32", 4, true},  {StoredType::BF16, "BF16", 2, true},
    {StoredType::F16, "F16", 2, true},  {StoredType::I64, "I64", 8, false}, {StoredType::I32, "I32", 4, false},
    {StoredType::U8, "U8", 1, false},   {StoredType::BOOL, "BOOL", 1, false},
};
constexpr const char* kStoredTypeList = "F64, F32, BF16, F16, I64, I32, U8, BOOL";

const StoredTypeInfo* find_stored_type(const std::string& name) {
  for (const StoredTypeInfo& info : kStoredTypes) {
    if (name == info.name) return &info;
  }
  return nullptr;
}

const char* stored_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "F32";
    case DType::F64: return "F64";
    case DType::I32: return "I32";
  }
  return "?";
}

// The byte count of `shape` with `element_size`-byte elements; false when a dimension is negative or the
// count does not fit in 64 bits (multiplied left to right, as the reference implementation does).
bool checked_byte_count(const Shape& shape, size_t element_size, uint64_t& bytes) {
  uint64_t count = 1;
  for (int64_t d : shape) {
    if (d < 0) return false;
    if (d != 0 && count > std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(d)) return false;
    count *= static_cast<uint64_t>(d);
  }
  if (count > std::numeric_limits<uint64_t>::max() / element_size) return false;
  bytes = count * element_size;
  return true;
}

// ---- reading ----

// Reads exactly `bytes` bytes or throws, naming what was being read.
void read_exact(int fd, void* dst, uint64_t bytes, const std::string& path, const char* what) {
  char* next = static_cast<char*>(dst);
  uint64_t done = 0;
  while (done < bytes) {
    const ssize_t got = ::read(fd, next + done, std::min<uint64_t>(bytes - done, uint64_t{1} << 30));
    if (got < 0 && errno == EINTR) continue;
    MDFF_CHECK(got >= 0, path, ": cannot read ", what, ": ", std::strerror(errno));
    MDFF_CHECK(got > 0, path, ": the file ends after ", done, " of the ", bytes, " bytes of ", what,
               " (it shrank while being read)");
    done += static_cast<uint64_t>(got);
  }
}

// Parses the header, also rejecting what nlohmann::json would let through: a key repeated within one
// object (it would keep one of them silently) and nesting far deeper than a header has.
Json parse_header(const std::string& text, const std::string& path) {
  std::vector<std::set<std::string>> open_objects;  // the keys seen so far in each enclosing object
  const Json::parser_callback_t check = [&](int depth, Json::parse_event_t event, Json& parsed) {
    MDFF_CHECK(depth <= kMaxJsonDepth, path, ": the header nests deeper than ", kMaxJsonDepth,
               " levels (a safetensors header needs 2)");
    if (event == Json::parse_event_t::object_start) {
      open_objects.emplace_back();
    } else if (event == Json::parse_event_t::object_end) {
      open_objects.pop_back();
    } else if (event == Json::parse_event_t::key) {
      const std::string& key = parsed.get_ref<const std::string&>();
      MDFF_CHECK(open_objects.back().insert(key).second, path, ": the header repeats the key \"", key,
                 "\" within one object");
    }
    return true;
  };
  try {
    return Json::parse(text, check);
  } catch (const Json::exception& e) {
    MDFF_FAIL(path, ": the header is not valid JSON (", e.what(), ")");
  }
}

// A JSON integer that fits an int64 and is not negative (dimensions, offsets).
bool is_count(const Json& value) {
  return value.is_number_unsigned() &&
         value.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
}

// One tensor of the header, checked on its own, and where its bytes are.
struct PlacedEntry {
  SafetensorsEntry entry;
  uint64_t begin = 0;
  uint64_t end = 0;
};

PlacedEntry parse_entry(const std::string& name, const Json& info, uint64_t data_bytes, const std::string& path) {
  const std::string where = path + ": tensor '" + name + "'";
  MDFF_CHECK(info.is_object(), where, ": its entry is ", info.type_name(), ", not an object");
  for (const char* key : {"dtype", "shape", "data_offsets"}) {
    MDFF_CHECK(info.contains(key), where, ": its entry has no \"", key, "\"");
  }
  PlacedEntry placed;
  placed.entry.name = name;

  const Json& dtype = info["dtype"];
  MDFF_CHECK(dtype.is_string(), where, ": \"dtype\" is ", dtype.dump(), ", not a string");
  placed.entry.dtype = dtype.get<std::string>();
  const StoredTypeInfo* type = find_stored_type(placed.entry.dtype);
  MDFF_CHECK(type, where, ": unknown or unsupported dtype \"", placed.entry.dtype, "\" (supported: ", kStoredTypeList,
             ")");

  const Json& shape = info["shape"];
  MDFF_CHECK(shape.is_array(), where, ": \"shape\" is ", shape.dump(), ", not an array");
  for (const Json& d : shape) {
    MDFF_CHECK(is_count(d), where, ": the shape dimension ", d.dump(), " is not a non-negative integer");
    placed.entry.shape.push_back(d.get<int64_t>());
  }

  const Json& offsets = info["data_offsets"];
  MDFF_CHECK(offsets.is_array() && offsets.size() == 2 && is_count(offsets[0]) && is_count(offsets[1]), where,
             ": \"data_offsets\" is ", offsets.dump(), ", not [begin, end] with two non-negative integers");
  placed.begin = offsets[0].get<uint64_t>();
  placed.end = offsets[1].get<uint64_t>();
  MDFF_CHECK(placed.begin <= placed.end, where, ": \"data_offsets\" [", placed.begin, ", ", placed.end,
             "] begins after it ends");
  MDFF_CHECK(placed.end <= data_bytes, where, ": its data ends at byte ", placed.end,
             ", past the end of the data section (", data_bytes, " bytes)");

  uint64_t needed = 0;
  MDFF_CHECK(checked_byte_count(placed.entry.shape, type->size, needed), where, ": shape ",
             shape_str(placed.entry.shape), " has too many elements to count");
  MDFF_CHECK(placed.end - placed.begin == needed, where, ": \"data_offsets\" [", placed.begin, ", ", placed.end,
             "] hold ", placed.end - placed.begin, " bytes, but shape ", shape_str(placed.entry.shape), " of ",
             type->name, " needs ", needed);
  return placed;
}

std::map<std::string, std::string> parse_metadata(const Json& value, const std::string& path) {
  MDFF_CHECK(value.is_object(), path, ": \"__metadata__\" is ", value.type_name(), ", not an object of strings");
  std::map<std::string, std::string> metadata;
  for (const auto& item : value.items()) {
    MDFF_CHECK(item.value().is_string(), path, ": \"__metadata__\" maps \"", item.key(), "\" to ", item.value().dump(),
               ", not a string");
    metadata[item.key()] = item.value().get<std::string>();
  }
  return metadata;
}

// ---- conversion ----

template <class T>
T load(const uint8_t* bytes) {
  T value;
  std::memcpy(&value, bytes, sizeof value);
  return value;
}

float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// bfloat16 is the upper half of a float32.
float load_bf16(const uint8_t* bytes) { return bits_to_float(uint32_t{load<uint16_t>(bytes)} << 16); }

// IEEE half precision: 1 sign bit, 5 exponent bits (bias 15), 10 mantissa bits.
float load_f16(const uint8_t* bytes) {
  const uint16_t half = load<uint16_t>(bytes);
  const bool negative = half & 0x8000u;
  const uint32_t exponent = (half >> 10) & 0x1fu;
  const uint32_t mantissa = half & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return negative ? -magnitude : magnitude;
  }
  const uint32_t sign = negative ? 0x80000000u : 0u;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // infinity, NaN
  return bits_to_float(sign | ((exponent + 127 - 15) << 23) | (mantissa << 13));
}

int32_t load_bool(const uint8_t* bytes) { return *bytes != 0 ? 1 : 0; }

// Decodes `count` elements of `type` from `src` into `out`.
template <class Dst>
void decode(const uint8_t* src, size_t count, const StoredTypeInfo& type, Dst* out) {
  const auto each = [&](auto value_at) {
    for (size_t i = 0; i < count; ++i) out[i] = static_cast<Dst>(value_at(src + i * type.size));
  };
  switch (type.type) {
    case StoredType::F64: each(load<double>); break;
    case StoredType::F32: each(load<float>); break;
    case StoredType::BF16: each(load_bf16); break;
    case StoredType::F16: each(load_f16); break;
    case StoredType::I64: each(load<int64_t>); break;
    case StoredType::I32: each(load<int32_t>); break;
    case StoredType::U8: each(load<uint8_t>); break;
    case StoredType::BOOL: each(load_bool); break;
  }
}

// ---- writing ----

// One tensor as the header describes it.
struct TensorLayout {
  const std::string& name;
  const char* dtype;
  Shape shape;
  uint64_t bytes;
};

// Writes the header of `layouts` (checking their names) and then each tensor's bytes through
// write_data(i, file), in order, to a temporary file renamed over `path`.
void write_file(const std::string& path, const std::vector<TensorLayout>& layouts,
                const std::map<std::string, std::string>& metadata,
                const std::function<void(size_t, AtomicFile&)>& write_data) {
  Json header = Json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::set<std::string> names;
  uint64_t offset = 0;
  for (const TensorLayout& layout : layouts) {
    MDFF_CHECK(!layout.name.empty(), path, ": a tensor has an empty name");
    MDFF_CHECK(layout.name != "__metadata__", path, ": \"__metadata__\" names the metadata and cannot name a tensor");
    MDFF_CHECK(names.insert(layout.name).second, path, ": the tensor name '", layout.name, "' is given twice");
    const uint64_t end = offset + layout.bytes;
    header[layout.name] = Json{{"dtype", layout.dtype}, {"shape", layout.shape}, {"data_offsets", Json::array({offset, end})}};
    offset = end;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const Json::exception& e) {
    MDFF_FAIL(path, ": a tensor name or metadata string is not valid UTF-8 (", e.what(), ")");
  }
  text.append((8 - text.size() % 8) % 8, ' ');  // the data section starts 8-byte aligned
  const uint64_t header_bytes = text.size();

  AtomicFile file(path);
  file.write(&header_bytes, sizeof header_bytes);
  file.write(text.data(), text.size());
  for (size_t i = 0; i < layouts.size(); ++i) write_data(i, file);
  file.commit();
}
}  // namespace

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<TensorLayout> layouts;
  for (const auto& [name, tensor] : tensors) {
    MDFF_CHECK(tensor.defined(), path, ": tensor '", name, "' is an undefined tensor");
    layouts.push_back({name, stored_name(tensor.dtype()), tensor.shape(), tensor.nbytes()});
  }
  write_file(path, layouts, metadata, [&](size_t i, AtomicFile& file) {
    const Tensor host = tensors[i].second.cpu();  // one at a time: a model on the GPU is not copied whole
    file.write(host.raw(), host.nbytes());
  });
}

void save_safetensors_entries(const std::string& path, const std::vector<SafetensorsEntry>& entries,
                              const std::map<std::string, std::string>& metadata) {
  std::vector<TensorLayout> layouts;
  for (const SafetensorsEntry& entry : entries) {
    const StoredTypeInfo* type = find_stored_type(entry.dtype);
    MDFF_CHECK(type, path, ": tensor '", entry.name, "' has the unknown or unsupported dtype \"", entry.dtype,
               "\" (supported: ", kStoredTypeList, ")");
    uint64_t needed = 0;
    MDFF_CHECK(checked_byte_count(entry.shape, type->size, needed) && needed == entry.bytes.size(), path,
               ": tensor '", entry.name, "' has ", entry.bytes.size(), " bytes, which do not match shape ",
               shape_str(entry.shape), " of ", type->name);
    layouts.push_back({entry.name, type->name, entry.shape, entry.bytes.size()});
  }
  write_file(path, layouts, metadata,
             [&](size_t i, AtomicFile& file) { file.write(entries[i].bytes.data(), entries[i].bytes.size()); });
}

const SafetensorsEntry* SafetensorsFile::find(const std::string& name) const {
  for (const SafetensorsEntry& entry : entries) {
    if (entry.name == name) return &entry;
  }
  return nullptr;
}

SafetensorsFile load_safetensors(const std::string& path) {
  FileDescriptor file;
  file.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  MDFF_CHECK(file.fd >= 0, path, ": cannot open for reading: ", std::strerror(errno));
  struct stat info {};
  MDFF_CHECK(::fstat(file.fd, &info) == 0, path, ": cannot read its size: ", std::strerror(errno));
  MDFF_CHECK(S_ISREG(info.st_mode), path, ": not a regular file");
  const uint64_t file_bytes = static_cast<uint64_t>(info.st_size);

  MDFF_CHECK(file_bytes >= 8, path, ": too short for a safetensors file (", file_bytes,
             " bytes; the header length alone takes 8)");
  uint64_t header_bytes = 0;
  read_exact(file.fd, &header_bytes, sizeof header_bytes, path, "the header length");
  MDFF_CHECK(header_bytes <= kMaxHeaderBytes, path, ": the header length ", header_bytes,
             " exceeds the 100 MB limit (not a safetensors file, or a damaged one)");
  MDFF_CHECK(header_bytes <= file_bytes - 8, path, ": the header length ", header_bytes,
             " runs past the end of the file (", file_bytes, " bytes)");
  std::string text(header_bytes, '\0');
  read_exact(file.fd, text.data(), header_bytes, path, "the header");
  const Json header = parse_header(text, path);
  MDFF_CHECK(header.is_object(), path, ": the header is ", header.type_name(), ", not a JSON object");

  const uint64_t data_bytes = file_bytes - 8 - header_bytes;
  SafetensorsFile result;
  std::vector<PlacedEntry> placed;
  for (const auto& item : header.items()) {
    if (item.key() == "__metadata__") result.metadata = parse_metadata(item.value(), path);
    else placed.push_back(parse_entry(item.key(), item.value(), data_bytes, path));
  }

  // The tensors must cover the data section exactly: no overlaps, no holes, nothing left at the end.
  std::stable_sort(placed.begin(), placed.end(), [](const PlacedEntry& a, const PlacedEntry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t covered = 0;
  for (size_t i = 0; i < placed.size(); ++i) {
    MDFF_CHECK(placed[i].begin >= covered, path, ": tensors '", placed[i - 1].entry.name, "' and '",
               placed[i].entry.name, "' overlap in the data section (bytes ", placed[i].begin, " to ", covered, ")");
    MDFF_CHECK(placed[i].begin == covered, path, ": bytes ", covered, " to ", placed[i].begin,
               " of the data section belong to no tensor (the format allows no holes)");
    covered = placed[i].end;
  }
  MDFF_CHECK(covered == data_bytes, path, ": the last ", data_bytes - covered, " of the ", data_bytes,
             " bytes of the data section belong to no tensor (unused bytes at the end)");

  for (PlacedEntry& p : placed) {
    p.entry.bytes.resize(p.end - p.begin);
    read_exact(file.fd, p.entry.bytes.data(), p.entry.bytes.size(), path, ("tensor '" + p.entry.name + "'").c_str());
    result.entries.push_back(std::move(p.entry));
  }
  return result;
}

Tensor to_tensor(const SafetensorsEntry& entry, DType want) {
  const StoredTypeInfo* type = find_stored_type(entry.dtype);
  MDFF_CHECK(type, "to_tensor: tensor '", entry.name, "' has the unknown or unsupported dtype \"", entry.dtype,
             "\" (supported: ", kStoredTypeList, ")");
  uint64_t needed = 0;
  MDFF_CHECK(checked_byte_count(entry.shape, type->size, needed) && needed == entry.bytes.size(), "to_tensor: tensor '",
             entry.name, "' has ", entry.bytes.size(), " bytes, which do not match shape ", shape_str(entry.shape),
             " of ", type->name);
  MDFF_CHECK(!type->floating || is_floating(want), "to_tensor: tensor '", entry.name, "' holds floating-point values (",
             type->name, ") and cannot become ", dtype_name(want), "; ask for F32 or F64");
  const size_t count = entry.bytes.size() / type->size;
  const uint8_t* src = entry.bytes.data();
  if (type->type == StoredType::I64 && want == DType::I32) {
    for (size_t i = 0; i < count; ++i) {
      const int64_t value = load<int64_t>(src + 8 * i);
      MDFF_CHECK(value >= std::numeric_limits<int32_t>::min() && value <= std::numeric_limits<int32_t>::max(),
                 "to_tensor: tensor '", entry.name, "': element ", i, " (", value,
                 ") is outside the int32 range; ask for F64 instead");
    }
  }
  Tensor out = Tensor::empty(entry.shape, want);
  switch (want) {
    case DType::F32: decode(src, count, *type, out.data<float>()); break;
    case DType::F64: decode(src, count, *type, out.data<double>()); break;
    case DType::I32: decode(src, count, *type, out.data<int32_t>()); break;
  }
  return out;
}

}  // namespace mdff::io
