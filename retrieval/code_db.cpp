// The code database file and the Hamming search over it (see code_db.h).
#include "retrieval/code_db.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>

#include "core/error.h"
#include "core/ops.h"
#include "core/safetensors.h"

// The words are copied to and from the file as they are; the format stores them little-endian.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the code database assumes a little-endian host");

namespace mdff::retrieval {

namespace {
constexpr const char* kFormat = "mdff-code-db";
constexpr const char* kVersion = "1";
constexpr int kMaxBits = 1 << 20;

bool is_crc32_text(const std::string& text) {
  return text.size() == 8 && std::all_of(text.begin(), text.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

template <class T>
std::vector<uint8_t> bytes_of(const std::vector<T>& values) {
  std::vector<uint8_t> bytes(values.size() * sizeof(T));
  if (!bytes.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
  return bytes;
}

template <class T>
std::vector<T> values_of(const io::SafetensorsEntry& entry) {
  std::vector<T> values(entry.bytes.size() / sizeof(T));
  if (!values.empty()) std::memcpy(values.data(), entry.bytes.data(), entry.bytes.size());
  return values;
}

const std::string& metadata_value(const io::SafetensorsFile& file, const char* key, const std::string& path) {
  const auto it = file.metadata.find(key);
  MDFF_CHECK(it != file.metadata.end(), path, ": the code database has no \"", key, "\" metadata");
  return it->second;
}

// The tensor `name`, which must be there with `dtype` and `rank` dimensions.
const io::SafetensorsEntry& tensor(const io::SafetensorsFile& file, const char* name, const char* dtype, size_t rank,
                                   const std::string& path) {
  const io::SafetensorsEntry* entry = file.find(name);
  MDFF_CHECK(entry, path, ": the code database has no tensor '", name, "'");
  MDFF_CHECK(entry->dtype == dtype && entry->shape.size() == rank, path, ": tensor '", name, "' is ", entry->dtype,
             " ", shape_str(entry->shape), "; a code database stores it as ", dtype, " with ", rank, " dimension",
             rank == 1 ? "" : "s");
  return *entry;
}

void check_labels(const std::vector<uint8_t>& labels, int classes, const std::string& where) {
  for (size_t i = 0; i < labels.size(); ++i) {
    MDFF_CHECK(labels[i] <= 1, where, ": label ", i % classes, " of image ", i / classes, " is ", int{labels[i]},
               "; labels are 0 or 1");
  }
}

std::vector<Match> matches_of(const std::vector<int>& distances, int bits, int64_t top_k) {
  std::vector<Match> matches;
  for (int32_t i : order_by_distance(distances, bits, top_k)) matches.push_back({i, distances[i]});
  return matches;
}
}  // namespace

void write_code_database(const std::string& path, const CodeDatabase& db) {
  const std::string where = "write_code_database: " + path;
  check_codes(db.codes, (where + ": the codes").c_str());
  const int64_t count = db.codes.count;
  MDFF_CHECK(static_cast<int64_t>(db.paths.size()) == count, where, ": ", count, " codes but ", db.paths.size(),
             " paths");
  MDFF_CHECK(db.classes >= 0 && static_cast<int64_t>(db.labels.size()) == count * db.classes, where, ": ",
             db.labels.size(), " label bytes for ", count, " images of ", db.classes, " classes");
  check_labels(db.labels, db.classes, where);
  MDFF_CHECK(!db.checkpoint.empty() && is_crc32_text(db.checkpoint_crc32), where,
             ": the database needs its checkpoint's path and CRC-32 (8 hex digits), got '", db.checkpoint, "' and '",
             db.checkpoint_crc32, "'");

  std::vector<int64_t> offsets{0};
  std::vector<uint8_t> path_bytes;
  for (const std::string& p : db.paths) {
    path_bytes.insert(path_bytes.end(), p.begin(), p.end());
    offsets.push_back(static_cast<int64_t>(path_bytes.size()));
  }
  std::vector<io::SafetensorsEntry> entries{
      {"codes", "I64", {count, db.codes.words}, bytes_of(db.codes.data)},
      {"path_offsets", "I64", {count + 1}, bytes_of(offsets)},
      {"path_bytes", "U8", {static_cast<int64_t>(path_bytes.size())}, std::move(path_bytes)}};
  if (db.classes > 0) entries.push_back({"labels", "U8", {count, db.classes}, db.labels});
  io::save_safetensors_entries(path, entries,
                               {{"format", kFormat},
                                {"version", kVersion},
                                {"bits", std::to_string(db.codes.bits)},
                                {"checkpoint", db.checkpoint},
                                {"checkpoint_crc32", db.checkpoint_crc32}});
}

CodeDatabase read_code_database(const std::string& path) {
  const io::SafetensorsFile file = io::load_safetensors(path);
  const auto format = file.metadata.find("format");
  MDFF_CHECK(format != file.metadata.end() && format->second == kFormat, path,
             " is not an mdff code database (its metadata has no \"format\": \"", kFormat,
             "\"); make one with mdff_search index");
  const std::string& version = metadata_value(file, "version", path);
  MDFF_CHECK(version == kVersion, path, ": code database version '", version, "' is not supported (this build reads ",
             kVersion, ")");
  for (const io::SafetensorsEntry& entry : file.entries) {
    static const std::set<std::string> known{"codes", "path_offsets", "path_bytes", "labels"};
    MDFF_CHECK(known.count(entry.name), path, ": the code database holds an unknown tensor '", entry.name, "'");
  }

  CodeDatabase db;
  const std::string& bits_text = metadata_value(file, "bits", path);
  size_t used = 0;
  try {
    db.codes.bits = std::stoi(bits_text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  MDFF_CHECK(used > 0 && used == bits_text.size() && db.codes.bits >= 1 && db.codes.bits <= kMaxBits, path,
             ": the \"bits\" metadata is '", bits_text, "', not a code length in 1..", kMaxBits);
  db.codes.words = (db.codes.bits + 63) / 64;

  const io::SafetensorsEntry& codes = tensor(file, "codes", "I64", 2, path);
  MDFF_CHECK(codes.shape[1] == db.codes.words, path, ": tensor 'codes' has ", codes.shape[1], " words per code, but ",
             db.codes.bits, "-bit codes take ", db.codes.words);
  MDFF_CHECK(codes.shape[0] <= std::numeric_limits<int32_t>::max(), path, ": ", codes.shape[0],
             " codes are more than a ranking can index");
  db.codes.count = codes.shape[0];
  db.codes.data = values_of<uint64_t>(codes);
  if (db.codes.bits % 64 != 0) {
    const uint64_t unused = ~uint64_t{0} << (db.codes.bits % 64);
    for (int64_t i = 0; i < db.codes.count; ++i) {
      MDFF_CHECK((db.codes.code(i)[db.codes.words - 1] & unused) == 0, path, ": code ", i, " has bits set beyond its ",
                 db.codes.bits, " bits (the file is damaged, or its \"bits\" metadata is wrong)");
    }
  }

  const io::SafetensorsEntry& offsets_entry = tensor(file, "path_offsets", "I64", 1, path);
  const io::SafetensorsEntry& path_bytes = tensor(file, "path_bytes", "U8", 1, path);
  MDFF_CHECK(offsets_entry.shape[0] == db.codes.count + 1, path, ": tensor 'path_offsets' has ",
             offsets_entry.shape[0], " entries, but ", db.codes.count, " codes need ", db.codes.count + 1);
  const std::vector<int64_t> offsets = values_of<int64_t>(offsets_entry);
  MDFF_CHECK(offsets[0] == 0 && offsets.back() == path_bytes.shape[0], path, ": tensor 'path_offsets' runs from ",
             offsets[0], " to ", offsets.back(), ", not from 0 to the ", path_bytes.shape[0], " bytes of 'path_bytes'");
  for (int64_t i = 0; i < db.codes.count; ++i) {
    MDFF_CHECK(offsets[i] <= offsets[i + 1], path, ": tensor 'path_offsets' decreases at entry ", i + 1, " (",
               offsets[i], " then ", offsets[i + 1], ")");
    MDFF_CHECK(offsets[i + 1] <= path_bytes.shape[0], path, ": tensor 'path_offsets' entry ", i + 1, " (",
               offsets[i + 1], ") runs past the ", path_bytes.shape[0], " bytes of 'path_bytes'");
    db.paths.emplace_back(reinterpret_cast<const char*>(path_bytes.bytes.data()) + offsets[i],
                          static_cast<size_t>(offsets[i + 1] - offsets[i]));
  }

  if (file.find("labels")) {
    const io::SafetensorsEntry& labels = tensor(file, "labels", "U8", 2, path);
    MDFF_CHECK(labels.shape[0] == db.codes.count && labels.shape[1] >= 1 &&
                   labels.shape[1] <= std::numeric_limits<int>::max(),
               path, ": tensor 'labels' is ", shape_str(labels.shape), ", but ", db.codes.count,
               " codes need (", db.codes.count, ", K) with K >= 1");
    db.classes = static_cast<int>(labels.shape[1]);
    db.labels = labels.bytes;
    check_labels(db.labels, db.classes, path);
  }

  db.checkpoint = metadata_value(file, "checkpoint", path);
  db.checkpoint_crc32 = metadata_value(file, "checkpoint_crc32", path);
  MDFF_CHECK(!db.checkpoint.empty() && is_crc32_text(db.checkpoint_crc32), path,
             ": the \"checkpoint\" and \"checkpoint_crc32\" metadata must be a path and 8 hex digits, got '",
             db.checkpoint, "' and '", db.checkpoint_crc32, "'");
  return db;
}

std::string file_crc32(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  MDFF_CHECK(in, path, ": cannot open for reading: ", std::strerror(errno));
  uLong crc = crc32(0L, Z_NULL, 0);
  std::vector<char> buffer(1 << 20);
  while (in) {
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    crc = crc32(crc, reinterpret_cast<const Bytef*>(buffer.data()), static_cast<uInt>(in.gcount()));
  }
  MDFF_CHECK(in.eof(), path, ": cannot read: ", std::strerror(errno));
  char text[9];
  std::snprintf(text, sizeof text, "%08lx", static_cast<unsigned long>(crc));
  return text;
}

std::vector<Match> nearest(const PackedCodes& database, const PackedCodes& queries, int64_t q, int64_t top_k) {
  MDFF_CHECK(top_k >= 0, "nearest: top_k must be a count, got ", top_k);
  return matches_of(distances(database, queries, q), database.bits, top_k);
}

std::vector<Match> within_radius(const PackedCodes& database, const PackedCodes& queries, int64_t q, int radius) {
  MDFF_CHECK(radius >= 0, "within_radius: the radius must be >= 0, got ", radius);
  const std::vector<int> d = distances(database, queries, q);
  // The items within the radius are exactly the first `inside` of the ranking.
  const int64_t inside = std::count_if(d.begin(), d.end(), [&](int distance) { return distance <= radius; });
  return matches_of(d, database.bits, inside);
}

Tensor codes_tensor(const PackedCodes& codes) {
  Tensor t = Tensor::empty({codes.count, 2 * static_cast<int64_t>(codes.words)}, DType::I32);
  if (t.numel() > 0) std::memcpy(t.data<int32_t>(), codes.data.data(), codes.data.size() * sizeof(uint64_t));
  return t;
}

std::vector<std::vector<Match>> nearest_all(const PackedCodes& database, const PackedCodes& queries, int64_t top_k,
                                            Device device) {
  MDFF_CHECK(top_k >= 0, "nearest_all: top_k must be a count, got ", top_k);
  MDFF_CHECK(database.words == queries.words, "nearest_all: ", queries.bits, "-bit queries against ", database.bits,
             "-bit codes");
  std::vector<std::vector<Match>> all(static_cast<size_t>(queries.count));
  if (device == Device::CPU || top_k == 0 || database.count == 0) {
    for (int64_t q = 0; q < queries.count; ++q) all[q] = nearest(database, queries, q, top_k);
    return all;
  }
  const auto [indices, distances] =
      ops::hamming_top_k(codes_tensor(queries).to(device), codes_tensor(database).to(device), top_k);
  const Tensor index_host = indices.cpu(), distance_host = distances.cpu();
  const int64_t k = index_host.size(1);
  for (int64_t q = 0; q < queries.count; ++q)
    for (int64_t r = 0; r < k; ++r)
      all[q].push_back({index_host.data<int32_t>()[q * k + r], distance_host.data<int32_t>()[q * k + r]});
  return all;
}

}  // namespace mdff::retrieval
