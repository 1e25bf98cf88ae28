// IDX reader (see idx.h). Reads through zlib, which passes uncompressed files through unchanged.
#include "data/idx.h"

#include <zlib.h>

#include <algorithm>
#include <filesystem>
#include <memory>
#include <system_error>

#include "core/error.h"

namespace mdff::data {

namespace {
struct GzCloser {
  void operator()(gzFile f) const { gzclose(f); }
};

// Reads bytes [from, to) of the `total` bytes of `what` into dst[from, to), or throws naming what was being read.
void read_exact(gzFile file, uint8_t* dst, size_t from, size_t to, size_t total, const std::string& path,
                const char* what) {
  size_t done = from;
  while (done < to) {
    const unsigned chunk = static_cast<unsigned>(std::min<size_t>(to - done, 1u << 30));
    const int got = gzread(file, dst + done, chunk);
    if (got < 0) {
      int code = 0;
      MDFF_FAIL(path, ": corrupt compressed data while reading ", what, " (", gzerror(file, &code), ")");
    }
    MDFF_CHECK(got > 0, path, ": truncated: the file ends after ", done, " of the ", total, " bytes of ", what);
    done += static_cast<size_t>(got);
  }
}

// The values are read into memory that grows by at most this much at a time, so that a header declaring
// more values than the file holds is reported as truncated instead of allocating the declared size.
constexpr size_t kValuesChunk = size_t{1} << 26;
}  // namespace

IdxArray read_idx(const std::string& path) {
  std::error_code unreadable;  // a path the system cannot look up (too long, through a file) is missing too
  MDFF_CHECK(std::filesystem::exists(path, unreadable), path, ": no such file");
  std::unique_ptr<gzFile_s, GzCloser> file(gzopen(path.c_str(), "rb"));
  MDFF_CHECK(file, path, ": cannot open for reading");
  uint8_t magic[4];
  read_exact(file.get(), magic, 0, 4, 4, path, "the header");
  MDFF_CHECK(magic[0] == 0 && magic[1] == 0 && magic[3] >= 1 && magic[3] <= 4, path,
             ": not an IDX file (the magic number is wrong)");
  MDFF_CHECK(magic[2] == 0x08, path, ": IDX value type 0x", std::hex, int(magic[2]),
             " is not supported (only unsigned bytes, 0x08)");
  IdxArray array;
  int64_t count = 1;
  for (int d = 0; d < magic[3]; ++d) {
    uint8_t be[4];
    read_exact(file.get(), be, 0, 4, 4, path, "the dimensions");
    const int64_t size = (int64_t(be[0]) << 24) | (be[1] << 16) | (be[2] << 8) | be[3];
    MDFF_CHECK(size > 0 && size <= (int64_t{1} << 31), path, ": dimension ", d, " has an invalid size ", size);
    array.shape.push_back(size);
    MDFF_CHECK(count <= (int64_t{1} << 34) / size, path, ": the declared array is implausibly large");
    count *= size;
  }
  while (array.values.size() < static_cast<size_t>(count)) {
    const size_t from = array.values.size();
    array.values.resize(std::min(static_cast<size_t>(count), from + kValuesChunk));
    read_exact(file.get(), array.values.data(), from, array.values.size(), static_cast<size_t>(count), path,
               "the values");
  }
  char extra;
  MDFF_CHECK(gzread(file.get(), &extra, 1) == 0, path, ": trailing bytes after the ", count, " values");
  return array;
}

}  // namespace mdff::data
