// The IDX reader on small generated files: plain and gzip, and every kind of damage a user's file can
// have (missing, wrong magic, unsupported type, truncated header or values, trailing bytes, corrupt gzip).
#include <doctest/doctest.h>
#include "tests/doctest_text.h"
#include <sys/resource.h>
#include <zlib.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "data/idx.h"

using namespace mdff;

namespace {
std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("mdff_test_idx_" + name)).string();
}

std::vector<uint8_t> idx_bytes(const std::vector<uint32_t>& dims, size_t values, uint8_t type = 0x08) {
  std::vector<uint8_t> bytes{0, 0, type, static_cast<uint8_t>(dims.size())};

  for (uint32_t d : dims) {
    for (int shift : {24, 16, 8, 0}) bytes.push_back(static_cast<uint8_t>(d >> shift));
  }
  for (size_t i = 0; i < values; ++i) bytes.push_back(static_cast<uint8_t>(i * 7));
  return bytes;
}

std::string write_plain(const std::string& name, const std::vector<uint8_t>& bytes) {
  const std::string path = temp_path(name);
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  return path;
}

std::string write_gz(const std::string& name, const std::vector<uint8_t>& bytes) {
  const std::string path = temp_path(name);
  gzFile f = gzopen(path.c_str(), "wb");
  gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
  gzclose(f);
  return path;
}
}  // namespace

TEST_CASE("reads plain and gzip IDX files") {
  const auto bytes = idx_bytes({3, 2, 4}, 24);
  for (const std::string& path : {write_plain("ok.idx", bytes), write_gz("ok.idx.gz", bytes)}) {
    const data::IdxArray a = data::read_idx(path);
    CHECK(a.shape == std::vector<int64_t>{3, 2, 4});
    REQUIRE(a.values.size() == 24);
    CHECK(a.values[5] == 35);
  }
}

TEST_CASE("damaged IDX files are clear errors naming the file") {
  CHECK_THROWS_WITH_AS(data::read_idx(temp_path("missing.gz")), doctest::Contains("no such file"), Error);
  auto bad_magic = idx_bytes({4}, 4);
  bad_magic[0] = 0x1f;
  CHECK_THROWS_WITH_AS(data::read_idx(write_plain("magic.idx", bad_magic)), doctest::Contains("magic number is wrong"),
                       Error);
  CHECK_THROWS_WITH_AS(data::read_idx(write_plain("type.idx", idx_bytes({4}, 16, 0x0D))),
                       doctest::Contains("not supported"), Error);
  CHECK_THROWS_WITH_AS(data::read_idx(write_gz("short.idx.gz", idx_bytes({10, 10}, 99))),
                       doctest::Contains("truncated: the file ends after 99 of the 100 bytes of the values"), Error);
  auto header_only = idx_bytes({10, 10}, 0);
  header_only.resize(6);
  CHECK_THROWS_WITH_AS(data::read_idx(write_plain("header.idx", header_only)),
                       doctest::Contains("bytes of the dimensions"), Error);
  CHECK_THROWS_WITH_AS(data::read_idx(write_plain("trailing.idx", idx_bytes({4}, 5))),
                       doctest::Contains("trailing bytes"), Error);
  CHECK_THROWS_WITH_AS(data::read_idx(write_plain("zero.idx", idx_bytes({0}, 0))), doctest::Contains("invalid size"),
                       Error);
  // a gzip stream whose compressed body is damaged
  const std::string gz = write_gz("corrupt.idx.gz", idx_bytes({64, 64}, 4096));
  std::vector<char> raw(std::filesystem::file_size(gz));
  std::ifstream(gz, std::ios::binary).read(raw.data(), raw.size());
  for (size_t i = 20; i < raw.size() - 8; i += 3) raw[i] = static_cast<char>(raw[i] ^ 0x5a);
  std::ofstream(gz, std::ios::binary).write(raw.data(), raw.size());
  CHECK_THROWS_AS(data::read_idx(gz), Error);
}

namespace {
// The process's peak resident memory so far, in MiB (Linux reports kilobytes).
int64_t peak_rss_mib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss / 1024;
}
}  // namespace

// Found by fuzzing (tests/fuzz/corpus/fuzz_idx/oom-declares-12g-values.idx): the reader allocated the
// declared values before reading them, so a 20-byte file declaring 12 G values took 12 GB.
TEST_CASE("an IDX header declaring more values than the file holds is truncation, not an allocation of them all") {
  const int64_t before = peak_rss_mib();
  CHECK_THROWS_WITH_AS(data::read_idx(write_plain("declares_1g.idx", idx_bytes({1u << 15, 1u << 15}, 10))),
                       doctest::Contains("truncated: the file ends after 10 of the 1073741824 bytes of the values"),
                       Error);
  CHECK(peak_rss_mib() - before < 512);  // at most one 64 MiB chunk is allocated ahead of the data
}

TEST_CASE("IDX dimensions whose product overflows 64 bits are refused, not wrapped around") {
  CHECK_THROWS_WITH_AS(data::read_idx(write_plain("overflow.idx", idx_bytes({1u << 31, 8, 1u << 31}, 0))),
                       doctest::Contains("implausibly large"), Error);
}
