// Files written whole or not at all: AtomicFile writes a temporary file next to its path, syncs it and
// renames it over the path on commit(), so an interrupted or failed write never leaves a partial file
// there. Checkpoints, codes, plots and figures are all written this way. Every failure is an
// mdff::Error naming the path and the system's reason.
#pragma once
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace mdff::io {

// A file descriptor closed when it goes out of scope.
struct FileDescriptor {
  int fd = -1;
  FileDescriptor() = default;
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() {
    if (fd >= 0) ::close(fd);
  }
};

// A temporary file next to `path` that commit() syncs and renames over `path`; removed if it never
// gets there (a write error, an exception while producing the data).
class AtomicFile {
 public:
  explicit AtomicFile(const std::string& path);
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile();

  void write(const void* data, size_t bytes);  // appends
  void commit();                               // sync, close, rename over the path

 private:
  std::string path_;
  std::string temp_path_;
  FileDescriptor file_;
  bool committed_ = false;
};

// One piece of a file's contents, written in order after the pieces before it.
struct ByteSpan {
  const void* data;
  size_t size;
};

void write_file_atomic(const std::string& path, const std::vector<ByteSpan>& pieces);
// The same for one piece of text (JSON, SVG, a script).
void write_file_atomic(const std::string& path, const std::string& text);

// The whole contents of the file at `path`.
std::vector<uint8_t> read_file(const std::string& path);

}  // namespace mdff::io
