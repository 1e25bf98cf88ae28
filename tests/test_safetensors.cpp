// Safetensors files (core/safetensors.h): round trips, the header's layout, the dtypes other tools write,
// one hand-made file per rule of the format that the reader must refuse, the writer's atomic rename, random
// damage that must never crash the reader, and files exchanged with PyTorch through tools/safetensors_io.py.
#include <doctest/doctest.h>
#include "tests/doctest_text.h"
#include <sys/resource.h>
#include <unistd.h>

#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/safetensors.h"
#include "tests/source_tree.h"

using namespace mdff;
namespace fs = std::filesystem;

namespace {
// A folder of this process's own, removed at exit, so that listing it shows every file a test left.
struct TestFolder {
  fs::path path = fs::temp_directory_path() / ("mdff_test_safetensors_" + std::to_string(::getpid()));
  TestFolder() { fs::create_directories(path); }
  ~TestFolder() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

std::string temp_path(const std::string& name) {
  static const TestFolder folder;
  return (folder.path / name).string();
}

std::vector<std::string> files_in(const fs::path& folder) {
  std::vector<std::string> names;
  for (const auto& item : fs::directory_iterator(folder)) names.push_back(item.path().filename().string());
  return names;
}

std::string write_bytes(const std::string& name, const std::string& bytes) {
  const std::string path = temp_path(name);
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return path;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

template <class T>
void append_le(std::string& bytes, T value) {
  char raw[sizeof(T)];
  std::memcpy(raw, &value, sizeof(T));
  bytes.append(raw, sizeof(T));
}

// The bytes of a file with `header_bytes` as its header length (normally header.size()), `header` and `data`.
std::string file_bytes(const std::string& header, const std::string& data = "",
                       uint64_t header_bytes = std::numeric_limits<uint64_t>::max()) {
  std::string bytes;
  append_le<uint64_t>(bytes, header_bytes == std::numeric_limits<uint64_t>::max() ? header.size() : header_bytes);
  return bytes + header + data;
}

// The header of a file with one tensor "t".
std::string one_tensor(const std::string& dtype, const std::string& shape, const std::string& offsets) {
  return R"({"t":{"dtype":)" + dtype + R"(,"shape":)" + shape + R"(,"data_offsets":)" + offsets + "}}";
}

// The file must be refused with an mdff::Error that names it and contains `message`.
void check_refused(const std::string& bytes, const std::string& message) {
  const std::string path = write_bytes("refused.safetensors", bytes);
  CHECK_THROWS_WITH_AS(io::load_safetensors(path), doctest::Contains(message.c_str()), Error);
  CHECK_THROWS_WITH_AS(io::load_safetensors(path), doctest::Contains(path.c_str()), Error);
}

std::string error_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}
}  // namespace

TEST_CASE("F32, F64 and I32 tensors and the metadata come back as written") {
  const Tensor weights = Tensor::from_vector(std::vector<float>{0.5f, -1.25f, 3.0f, 1e-30f, -0.0f, 65504.0f}, {2, 3});
  const Tensor scalar = Tensor::from_vector(std::vector<double>{2.5}, {}, DType::F64);
  const Tensor indices = Tensor::from_vector(std::vector<int32_t>{7, -3, std::numeric_limits<int32_t>::max(),
                                                                  std::numeric_limits<int32_t>::min()},
                                             {4});
  const Tensor no_rows = Tensor::zeros({0, 3});
  const Tensor no_indices = Tensor::zeros({0}, DType::I32);
  const std::map<std::string, std::string> metadata{{"format", "pt"}, {"epoch", "3"}, {"note", "\"quoted\" \u00e9"}};
  const std::string path = temp_path("round_trip.safetensors");
  io::save_safetensors(path,
                       {{"layer.weight", weights},
                        {"scalar", scalar},
                        {"indices", indices},
                        {"no_rows", no_rows},
                        {"no_indices", no_indices}},
                       metadata);

  const io::SafetensorsFile file = io::load_safetensors(path);
  CHECK(file.metadata == metadata);
  REQUIRE(file.entries.size() == 5);
  const std::vector<std::string> names{"layer.weight", "scalar", "indices", "no_rows", "no_indices"};
  const std::vector<std::string> dtypes{"F32", "F64", "I32", "F32", "I32"};
  const std::vector<Shape> shapes{{2, 3}, {}, {4}, {0, 3}, {0}};
  for (size_t i = 0; i < names.size(); ++i) {
    CHECK(file.entries[i].name == names[i]);
    CHECK(file.entries[i].dtype == dtypes[i]);
    CHECK(file.entries[i].shape == shapes[i]);
  }
  CHECK(file.find("missing") == nullptr);
  REQUIRE(file.find("scalar") == &file.entries[1]);

  const Tensor weights_back = io::to_tensor(*file.find("layer.weight"));
  CHECK(weights_back.dtype() == DType::F32);
  CHECK(weights_back.shape() == Shape{2, 3});
  CHECK(weights_back.to_vector() == weights.to_vector());
  CHECK(io::to_tensor(*file.find("layer.weight"), DType::F64).to_vector() == weights.to_vector());
  const Tensor scalar_back = io::to_tensor(*file.find("scalar"), DType::F64);
  CHECK(scalar_back.dim() == 0);
  CHECK(scalar_back.item() == 2.5);
  const Tensor indices_back = io::to_tensor(*file.find("indices"), DType::I32);
  CHECK(indices_back.dtype() == DType::I32);
  CHECK(indices_back.to_vector() == indices.to_vector());
  CHECK(io::to_tensor(*file.find("no_rows")).shape() == Shape{0, 3});
  CHECK(io::to_tensor(*file.find("no_indices"), DType::I32).numel() == 0);
}

TEST_CASE("the header lists the tensors in the order given and pads the data section to 8-byte alignment") {
  const Tensor pair = Tensor::from_vector(std::vector<float>{1.5f, -2.0f}, {2});
  const std::string path = temp_path("layout.safetensors");
  io::save_safetensors(path, {{"z", pair}, {"a", Tensor::zeros({1}, DType::I32)}});
  const std::string bytes = read_bytes(path);
  uint64_t header_bytes = 0;
  std::memcpy(&header_bytes, bytes.data(), 8);
  const std::string header = bytes.substr(8, header_bytes);
  const std::string json = R"({"z":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                           R"("a":{"dtype":"I32","shape":[1],"data_offsets":[8,12]}})";
  CHECK(header.substr(0, json.size()) == json);
  CHECK(header.find_first_not_of(' ', json.size()) == std::string::npos);
  CHECK(header_bytes % 8 == 0);
  CHECK(bytes.size() == 8 + header_bytes + 12);
  float first = 0;
  std::memcpy(&first, bytes.data() + 8 + header_bytes, 4);
  CHECK(first == 1.5f);

  // every amount of padding, 0 to 7 spaces, and the metadata first
  for (size_t length = 1; length <= 8; ++length) {
    io::save_safetensors(path, {{std::string(length, 'x'), pair}}, {{"k", "v"}});
    const std::string text = read_bytes(path);
    std::memcpy(&header_bytes, text.data(), 8);
    CHECK(header_bytes % 8 == 0);
    CHECK(text.compare(8, 18, R"({"__metadata__":{")") == 0);
    CHECK(io::load_safetensors(path).entries.at(0).name == std::string(length, 'x'));
  }
}

TEST_CASE("BF16, F16, I64, U8 and BOOL entries written by other tools convert with to_tensor") {
  std::string data;
  for (uint16_t bits : {0x3F80, 0xC020, 0x4049}) append_le(data, bits);          // bf16: 1, -2.5, 3.140625
  for (uint16_t bits : {0x3C00, 0xC000, 0x0001, 0x7C00}) append_le(data, bits);  // f16: 1, -2, 2^-24, inf
  for (int64_t v : {int64_t{-3}, int64_t{2147483647}, int64_t{-2147483648}}) append_le(data, v);
  data += std::string("\x00\xff\x07", 3);  // u8
  data += std::string("\x00\x01", 2);      // bool
  append_le(data, int64_t{1} << 31);       // a 0-dim I64 beyond int32
  // the header lists them out of data order; the entries come back in data order
  const std::string header = R"({"u8":{"dtype":"U8","shape":[3],"data_offsets":[38,41]},)"
                             R"("big":{"dtype":"I64","shape":[],"data_offsets":[43,51]},)"
                             R"("bf16":{"dtype":"BF16","shape":[3],"data_offsets":[0,6]},)"
                             R"("f16":{"dtype":"F16","shape":[2,2],"data_offsets":[6,14]},)"
                             R"("flags":{"dtype":"BOOL","shape":[2],"data_offsets":[41,43]},)"
                             R"("i64":{"dtype":"I64","shape":[3],"data_offsets":[14,38]}})";
  const io::SafetensorsFile file = io::load_safetensors(write_bytes("others.safetensors", file_bytes(header, data)));
  std::vector<std::string> names;
  for (const auto& e : file.entries) names.push_back(e.name);
  CHECK(names == std::vector<std::string>{"bf16", "f16", "i64", "u8", "flags", "big"});
  CHECK(file.metadata.empty());

  const auto& bf16 = *file.find("bf16");
  CHECK(io::to_tensor(bf16).to_vector() == std::vector<double>{1.0, -2.5, 3.140625});
  CHECK(io::to_tensor(bf16, DType::F64).to_vector() == std::vector<double>{1.0, -2.5, 3.140625});
  CHECK_THROWS_WITH_AS(io::to_tensor(bf16, DType::I32), doctest::Contains("cannot become int32"), Error);
  const Tensor f16 = io::to_tensor(*file.find("f16"));
  CHECK(f16.shape() == Shape{2, 2});
  const double inf = std::numeric_limits<double>::infinity();
  CHECK(f16.to_vector() == std::vector<double>{1.0, -2.0, std::ldexp(1.0, -24), inf});
  const std::vector<double> i64_values{-3, 2147483647, -2147483648.0};
  CHECK(io::to_tensor(*file.find("i64"), DType::I32).to_vector() == i64_values);
  CHECK(io::to_tensor(*file.find("i64"), DType::F64).to_vector() == i64_values);
  CHECK(io::to_tensor(*file.find("u8"), DType::I32).to_vector() == std::vector<double>{0, 255, 7});
  CHECK(io::to_tensor(*file.find("u8")).to_vector() == std::vector<double>{0, 255, 7});
  CHECK(io::to_tensor(*file.find("flags"), DType::I32).to_vector() == std::vector<double>{0, 1});
  CHECK_THROWS_WITH_AS(io::to_tensor(*file.find("big"), DType::I32),
                       doctest::Contains("element 0 (2147483648) is outside the int32 range"), Error);
  CHECK(io::to_tensor(*file.find("big"), DType::F64).item() == 2147483648.0);
  std::string below_int32;
  append_le(below_int32, int64_t{-2147483649});
  const io::SafetensorsEntry low{"low", "I64", {1}, std::vector<uint8_t>(below_int32.begin(), below_int32.end())};
  CHECK_THROWS_WITH_AS(io::to_tensor(low, DType::I32),
                       doctest::Contains("element 0 (-2147483649) is outside the int32 range"), Error);

  // entries built by hand are checked too
  io::SafetensorsEntry odd{"odd", "I8", {2}, {1, 2}};
  CHECK_THROWS_WITH_AS(io::to_tensor(odd), doctest::Contains("unknown or unsupported dtype \"I8\""), Error);
  odd.dtype = "I32";
  CHECK_THROWS_WITH_AS(io::to_tensor(odd), doctest::Contains("2 bytes, which do not match shape (2) of I32"), Error);
}

TEST_CASE("valid files at the edges of the format load") {
  CHECK(io::load_safetensors(write_bytes("empty.safetensors", file_bytes("{}"))).entries.empty());
  // whitespace around the object, an unknown key in an entry, two empty tensors at one offset
  const std::string header = R"(  {"b":{"dtype":"F32","shape":[0],"data_offsets":[4,4],"extra":[1]},)"
                             R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                             R"("c":{"dtype":"F32","shape":[0,5],"data_offsets":[4,4]}}   )";
  const auto file = io::load_safetensors(write_bytes("edges.safetensors", file_bytes(header, std::string(4, '\0'))));
  REQUIRE(file.entries.size() == 3);
  CHECK(file.entries[0].name == "a");
  CHECK(file.entries[1].name == "b");
  CHECK(file.entries[2].name == "c");
}

TEST_CASE("files that break a rule of the format are clear errors naming the file") {
  const std::string four = std::string(4, '\0');
  SUBCASE("missing or not a file") {
    CHECK_THROWS_WITH_AS(io::load_safetensors(temp_path("missing.safetensors")),
                         doctest::Contains("cannot open for reading: No such file or directory"), Error);
    CHECK_THROWS_WITH_AS(io::load_safetensors(fs::temp_directory_path().string()),
                         doctest::Contains("not a regular file"), Error);
  }
  SUBCASE("shorter than the 8 bytes of the header length") {
    check_refused("", "too short for a safetensors file (0 bytes");
    check_refused(std::string("\x02\0\0\0\0", 5), "too short for a safetensors file (5 bytes");
  }
  SUBCASE("header length past the end of the file or absurd") {
    check_refused(file_bytes("{}", "", 3), "the header length 3 runs past the end of the file (10 bytes)");
    check_refused(file_bytes("{}", "", 100'000'001), "the header length 100000001 exceeds the 100 MB limit");
    check_refused(file_bytes("{}", "", std::numeric_limits<uint64_t>::max() - 1), "exceeds the 100 MB limit");
  }
  SUBCASE("header not valid JSON") {
    for (const std::string header : {"", "{\"t\":", "{} x", "{\"t\":NaN}", "{\"\xff\":1}", "{'t':1}"}) {
      CAPTURE(header);
      check_refused(file_bytes(header), "the header is not valid JSON");
    }
    check_refused(file_bytes(R"({"t":{},"t":{}})"), "the header repeats the key \"t\" within one object");
    check_refused(file_bytes(R"({"t":{"dtype":"F32","dtype":"F64"}})"), "repeats the key \"dtype\"");
    check_refused(file_bytes("{\"t\":" + std::string(100, '[') + std::string(100, ']') + "}"),
                  "the header nests deeper than 16 levels");
  }
  SUBCASE("header not an object") {
    check_refused(file_bytes("[1,2]"), "the header is array, not a JSON object");
    check_refused(file_bytes("\"t\""), "the header is string, not a JSON object");
  }
  SUBCASE("entry not an object, or missing dtype, shape or data_offsets") {
    check_refused(file_bytes(R"({"t":5})"), "tensor 't': its entry is number, not an object");
    check_refused(file_bytes(R"({"t":{"shape":[1],"data_offsets":[0,4]}})", four), "its entry has no \"dtype\"");
    check_refused(file_bytes(R"({"t":{"dtype":"F32","data_offsets":[0,4]}})", four), "its entry has no \"shape\"");
    check_refused(file_bytes(R"({"t":{"dtype":"F32","shape":[1]}})", four), "its entry has no \"data_offsets\"");
  }
  SUBCASE("dtype not a string, or unknown") {
    check_refused(file_bytes(one_tensor("4", "[1]", "[0,4]"), four), "\"dtype\" is 4, not a string");
    check_refused(file_bytes(one_tensor("\"F33\"", "[1]", "[0,4]"), four), "unknown or unsupported dtype \"F33\"");
    check_refused(file_bytes(one_tensor("\"f32\"", "[1]", "[0,4]"), four), "unknown or unsupported dtype \"f32\"");
  }
  SUBCASE("shape not an array of non-negative integers") {
    check_refused(file_bytes(one_tensor("\"F32\"", "1", "[0,4]"), four), "\"shape\" is 1, not an array");
    for (const std::string dim : {"-1", "1.5", "1.0", "\"1\"", "true", "null", "9223372036854775808", "[1]"}) {
      CAPTURE(dim);
      check_refused(file_bytes(one_tensor("\"F32\"", "[" + dim + "]", "[0,4]"), four),
                    "the shape dimension " + dim + " is not a non-negative integer");
    }
  }
  SUBCASE("data_offsets not [begin, end] with begin <= end") {
    for (const std::string offsets : {"4", "[4]", "[0,4,8]", "[-1,4]", "[0,4.0]", "[\"0\",4]", "{}"}) {
      CAPTURE(offsets);
      check_refused(file_bytes(one_tensor("\"F32\"", "[1]", offsets), four),
                    "\"data_offsets\" is " + offsets + ", not [begin, end] with two non-negative integers");
    }
    check_refused(file_bytes(one_tensor("\"F32\"", "[1]", "[4,0]"), four), "[4, 0] begins after it ends");
  }
  SUBCASE("end beyond the data section") {
    check_refused(file_bytes(one_tensor("\"F32\"", "[2]", "[0,8]"), four),
                  "its data ends at byte 8, past the end of the data section (4 bytes)");
  }
  SUBCASE("byte count not shape times dtype size") {
    check_refused(file_bytes(one_tensor("\"F32\"", "[3]", "[0,8]"), std::string(8, '\0')),
                  "\"data_offsets\" [0, 8] hold 8 bytes, but shape (3) of F32 needs 12");
    check_refused(file_bytes(one_tensor("\"F64\"", "[]", "[0,4]"), four), "shape () of F64 needs 8");
    check_refused(file_bytes(one_tensor("\"U8\"", "[4611686018427387904,4611686018427387904,0]", "[0,0]")),
                  "has too many elements to count");
    check_refused(file_bytes(one_tensor("\"F64\"", "[4611686018427387904]", "[0,0]")), "too many elements to count");
  }
  SUBCASE("overlapping tensors") {
    check_refused(file_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                             std::string(12, '\0')),
                  "tensors 'a' and 'b' overlap in the data section (bytes 4 to 8)");
    check_refused(file_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                             R"("b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                             four),
                  "tensors 'a' and 'b' overlap");
  }
  SUBCASE("holes between tensors") {
    check_refused(file_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                             R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                             std::string(12, '\0')),
                  "bytes 4 to 8 of the data section belong to no tensor (the format allows no holes)");
    check_refused(file_bytes(one_tensor("\"F32\"", "[1]", "[4,8]"), std::string(8, '\0')),
                  "bytes 0 to 4 of the data section belong to no tensor");
  }
  SUBCASE("unused bytes at the end of the data section") {
    check_refused(file_bytes(one_tensor("\"F32\"", "[1]", "[0,4]"), std::string(6, '\0')),
                  "the last 2 of the 6 bytes of the data section belong to no tensor (unused bytes at the end)");
    check_refused(file_bytes("{}", "x"), "the last 1 of the 1 bytes");
  }
  SUBCASE("__metadata__ not an object of strings") {
    check_refused(file_bytes(R"({"__metadata__":"v"})"), "\"__metadata__\" is string, not an object of strings");
    check_refused(file_bytes(R"({"__metadata__":{"a":"b","k":1}})"), "\"__metadata__\" maps \"k\" to 1, not a string");
  }
}

TEST_CASE("save_safetensors refuses names and tensors it cannot write, and writes nothing then") {
  const Tensor one = Tensor::zeros({1});
  const std::string path = temp_path("refused_write.safetensors");
  CHECK_THROWS_WITH_AS(io::save_safetensors(path, {{"w", one}, {"w", one}}),
                       doctest::Contains("the tensor name 'w' is given twice"), Error);
  CHECK_THROWS_WITH_AS(io::save_safetensors(path, {{"__metadata__", one}}),
                       doctest::Contains("\"__metadata__\" names the metadata and cannot name a tensor"), Error);
  CHECK_THROWS_WITH_AS(io::save_safetensors(path, {{"", one}}), doctest::Contains("a tensor has an empty name"), Error);
  CHECK_THROWS_WITH_AS(io::save_safetensors(path, {{"w", Tensor()}}),
                       doctest::Contains("tensor 'w' is an undefined tensor"), Error);
  CHECK_THROWS_WITH_AS(io::save_safetensors(path, {{"w\xff", one}}), doctest::Contains("is not valid UTF-8"), Error);
  CHECK_THROWS_WITH_AS(io::save_safetensors(path, {{"w", one}}, {{"k", "\xc3"}}),
                       doctest::Contains("is not valid UTF-8"), Error);
  CHECK_FALSE(fs::exists(path));
}

TEST_CASE("save_safetensors_entries writes stored dtypes as given and refuses entries that do not add up") {
  std::string words;
  for (uint64_t w : {uint64_t{0xFFFF'FFFF'FFFF'FFFF}, uint64_t{1} << 63, uint64_t{5}}) append_le(words, w);
  const std::vector<io::SafetensorsEntry> entries{
      {"words", "I64", {3}, std::vector<uint8_t>(words.begin(), words.end())},
      {"bytes", "U8", {2, 2}, {0, 255, 'a', '\n'}},
      {"flags", "BOOL", {1}, {1}},
      {"none", "U8", {0}, {}},
      {"values", "F32", {1}, {0, 0, 0xC0, 0x3F}}};  // 1.5f
  const std::string path = temp_path("entries.safetensors");
  io::save_safetensors_entries(path, entries, {{"kind", "raw"}});
  const io::SafetensorsFile file = io::load_safetensors(path);
  CHECK(file.metadata == std::map<std::string, std::string>{{"kind", "raw"}});
  REQUIRE(file.entries.size() == entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    CAPTURE(entries[i].name);
    CHECK(file.entries[i].name == entries[i].name);
    CHECK(file.entries[i].dtype == entries[i].dtype);
    CHECK(file.entries[i].shape == entries[i].shape);
    CHECK(file.entries[i].bytes == entries[i].bytes);
  }
  CHECK(io::to_tensor(*file.find("values")).item() == 1.5);
  CHECK((read_bytes(path).size() - 33) % 8 == 0);  // the length and the padded header, then 33 bytes of data

  const std::string refused = temp_path("entries_refused.safetensors");
  const auto with = [&](io::SafetensorsEntry entry) { return std::vector<io::SafetensorsEntry>{std::move(entry)}; };
  CHECK_THROWS_WITH_AS(io::save_safetensors_entries(refused, with({"w", "U64", {1}, std::vector<uint8_t>(8)})),
                       doctest::Contains("tensor 'w' has the unknown or unsupported dtype \"U64\""), Error);
  CHECK_THROWS_WITH_AS(io::save_safetensors_entries(refused, with({"w", "I64", {2}, std::vector<uint8_t>(8)})),
                       doctest::Contains("tensor 'w' has 8 bytes, which do not match shape (2) of I64"), Error);
  CHECK_THROWS_WITH_AS(io::save_safetensors_entries(refused, {entries[1], entries[1]}),
                       doctest::Contains("the tensor name 'bytes' is given twice"), Error);
  CHECK_THROWS_WITH_AS(io::save_safetensors_entries(refused, with({"", "U8", {0}, {}})),
                       doctest::Contains("a tensor has an empty name"), Error);
  CHECK_FALSE(fs::exists(refused));
}

TEST_CASE("writing goes through a temporary file that is renamed into place or removed") {
  const fs::path folder = fs::path(temp_path("atomic"));
  fs::create_directories(folder);
  const std::string path = (folder / "model.safetensors").string();
  const Tensor small = Tensor::from_vector(std::vector<float>{1, 2, 3}, {3});
  io::save_safetensors(path, {{"small", small}});
  CHECK(files_in(folder) == std::vector<std::string>{"model.safetensors"});

  SUBCASE("a folder that does not exist") {
    const std::string nowhere = (folder / "no" / "such" / "folder" / "m.safetensors").string();
    const std::string message = error_of([&] { io::save_safetensors(nowhere, {{"small", small}}); });
    CHECK(message.find("cannot write " + nowhere + ": No such file or directory") != std::string::npos);
    CHECK_FALSE(fs::exists(folder / "no"));
  }
  SUBCASE("a write that fails half-way (the file-size limit stands in for a full disk)") {
    const Tensor large = Tensor::zeros({1 << 20});
    rlimit saved{};
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &saved) == 0);
    rlimit limited = saved;
    limited.rlim_cur = 1 << 16;
    const auto previous_handler = std::signal(SIGXFSZ, SIG_IGN);
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &limited) == 0);
    const std::string message = error_of([&] { io::save_safetensors(path, {{"large", large}}); });
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &saved) == 0);
    std::signal(SIGXFSZ, previous_handler);
    CHECK(message.find("cannot write " + path + ": File too large") != std::string::npos);
    CHECK(files_in(folder) == std::vector<std::string>{"model.safetensors"});
    CHECK(io::load_safetensors(path).entries.at(0).name == "small");  // the previous file is intact
  }
  SUBCASE("a path that is a folder") {
    fs::create_directories(folder / "taken");
    const std::string message = error_of([&] { io::save_safetensors((folder / "taken").string(), {{"s", small}}); });
    CHECK(message.find("Is a directory (renaming the temporary file") != std::string::npos);
    CHECK(fs::is_empty(folder / "taken"));
    fs::remove(folder / "taken");
    CHECK(files_in(folder) == std::vector<std::string>{"model.safetensors"});
  }
}

TEST_CASE("damaged files are refused with mdff::Error, never a crash or another exception") {
  const std::string good_path = temp_path("fuzz_source.safetensors");
  io::save_safetensors(good_path,
                       {{"w", Tensor::from_vector(std::vector<float>{1, 2, 3, 4, 5, 6}, {2, 3})},
                        {"b", Tensor::from_vector(std::vector<double>{0.5}, {})},
                        {"i", Tensor::from_vector(std::vector<int32_t>{1, 2}, {2})},
                        {"none", Tensor::zeros({0, 4})}},
                       {{"k", "v"}});
  const std::string good = read_bytes(good_path);
  const std::string path = temp_path("fuzz.safetensors");
  // Loads `bytes`; when they pass, converts every entry to every dtype. Only mdff::Error may escape.
  const auto try_load = [&](const std::string& bytes) {
    write_bytes("fuzz.safetensors", bytes);
    try {
      for (const auto& entry : io::load_safetensors(path).entries) {
        for (DType want : {DType::F32, DType::F64, DType::I32}) {
          try {
            io::to_tensor(entry, want);
          } catch (const Error&) {
          }
        }
      }
    } catch (const Error&) {
    }
  };
  for (size_t length = 0; length < good.size(); ++length) try_load(good.substr(0, length));
  std::mt19937 rng(12345);
  for (int trial = 0; trial < 3000; ++trial) {
    std::string bytes = good;
    const int changes = 1 + static_cast<int>(rng() % 4);
    for (int c = 0; c < changes; ++c) {
      const size_t at = rng() % bytes.size();
      switch (rng() % 3) {
        case 0: bytes[at] = static_cast<char>(rng()); break;  // any byte
        case 1: bytes[at] = "0123456789[]{},:\"-.e"[rng() % 20]; break;  // a JSON character
        case 2: bytes.erase(at, 1 + rng() % 8); break;  // a few bytes gone
      }
    }
    try_load(bytes);
  }
}

TEST_CASE("PyTorch reads what the engine writes, and the engine reads what PyTorch writes") {
  if (std::system("/usr/bin/python3 -c 'import torch' > /dev/null 2>&1") != 0) {
    MESSAGE("skipped: /usr/bin/python3 cannot import torch (Debian's python3-torch)");
    return;
  }
  const Tensor weights = Tensor::from_vector(std::vector<float>{0.25f, -1.5f, 3.0f, 4.0f, 5.0f, -6.0f}, {3, 2});
  const Tensor scalar = Tensor::from_vector(std::vector<double>{-0.125}, {}, DType::F64);
  const Tensor indices = Tensor::from_vector(std::vector<int32_t>{9, -8}, {2});
  const Tensor nothing = Tensor::zeros({2, 0});
  const std::string from_engine = temp_path("from_engine.safetensors");
  const std::string from_torch = temp_path("from_torch.safetensors");
  const std::string log = temp_path("safetensors_io.log");
  io::save_safetensors(from_engine, {{"w", weights}, {"s", scalar}, {"i", indices}, {"nothing", nothing}},
                       {{"source", "mdff"}});

  const std::string command = "/usr/bin/python3 '" + test::source_file("tools/safetensors_io.py") + "' '" +
                              from_engine + "' '" + from_torch + "' > '" + log + "' 2>&1";
  const int status = std::system(command.c_str());
  REQUIRE_MESSAGE(status == 0, (command + "\n" + read_bytes(log)));

  const io::SafetensorsFile file = io::load_safetensors(from_torch);
  CHECK(file.metadata == std::map<std::string, std::string>{{"source", "mdff"}, {"written_by", "safetensors_io.py"}});
  std::vector<std::string> names;
  for (const auto& e : file.entries) names.push_back(e.name);
  CHECK(names == std::vector<std::string>{"w", "s", "i", "nothing", "py_bf16", "py_i64", "py_u8"});
  CHECK(io::to_tensor(*file.find("w")).to_vector() == weights.to_vector());
  CHECK(io::to_tensor(*file.find("w")).shape() == Shape{3, 2});
  CHECK(io::to_tensor(*file.find("s"), DType::F64).item() == -0.125);
  CHECK(io::to_tensor(*file.find("s"), DType::F64).dim() == 0);
  CHECK(io::to_tensor(*file.find("i"), DType::I32).to_vector() == indices.to_vector());
  CHECK(file.find("nothing")->shape == Shape{2, 0});
  CHECK(file.find("py_bf16")->dtype == "BF16");
  CHECK(io::to_tensor(*file.find("py_bf16")).to_vector() == std::vector<double>{1.0, -2.5, 3.140625});
  CHECK(file.find("py_i64")->dtype == "I64");
  CHECK(io::to_tensor(*file.find("py_i64"), DType::I32).to_vector() ==
        std::vector<double>{-3, 2147483647, 5, -2147483648.0});
  CHECK(file.find("py_u8")->dtype == "U8");
  CHECK(io::to_tensor(*file.find("py_u8"), DType::I32).to_vector() == std::vector<double>{0, 255, 7});
}
