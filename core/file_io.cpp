// AtomicFile, whole-file writes and reads (see file_io.h).
#include "core/file_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "core/error.h"

namespace mdff::io {

AtomicFile::AtomicFile(const std::string& path)
    : path_(path), temp_path_(path + ".tmp-" + std::to_string(::getpid())) {
  file_.fd = ::open(temp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  MDFF_CHECK(file_.fd >= 0, "cannot write ", path_, ": ", std::strerror(errno), " (creating the temporary file ",
             temp_path_, ")");
}

AtomicFile::~AtomicFile() {
  if (!committed_) ::unlink(temp_path_.c_str());
}

void AtomicFile::write(const void* data, size_t bytes) {
  const char* next = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t written = ::write(file_.fd, next, std::min<size_t>(bytes, size_t{1} << 30));
    if (written < 0 && errno == EINTR) continue;
    MDFF_CHECK(written > 0, "cannot write ", path_, ": ", written < 0 ? std::strerror(errno) : "no progress",
               " (writing the temporary file ", temp_path_, ")");
    next += written;
    bytes -= static_cast<size_t>(written);
  }
}

void AtomicFile::commit() {
  MDFF_CHECK(::fsync(file_.fd) == 0, "cannot write ", path_, ": ", std::strerror(errno),
             " (syncing the temporary file ", temp_path_, ")");
  const int fd = file_.fd;
  file_.fd = -1;
  MDFF_CHECK(::close(fd) == 0, "cannot write ", path_, ": ", std::strerror(errno), " (closing the temporary file ",
             temp_path_, ")");
  MDFF_CHECK(::rename(temp_path_.c_str(), path_.c_str()) == 0, "cannot write ", path_, ": ", std::strerror(errno),
             " (renaming the temporary file ", temp_path_, " over it)");
  committed_ = true;
}

void write_file_atomic(const std::string& path, const std::vector<ByteSpan>& pieces) {
  AtomicFile file(path);
  for (const ByteSpan& piece : pieces) file.write(piece.data, piece.size);
  file.commit();
}

void write_file_atomic(const std::string& path, const std::string& text) {
  write_file_atomic(path, {{text.data(), text.size()}});
}

std::vector<uint8_t> read_file(const std::string& path) {
  FileDescriptor file;
  file.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  MDFF_CHECK(file.fd >= 0, "cannot read ", path, ": ", std::strerror(errno));
  struct stat info {};
  MDFF_CHECK(::fstat(file.fd, &info) == 0, "cannot read ", path, ": ", std::strerror(errno));
  MDFF_CHECK(S_ISREG(info.st_mode), "cannot read ", path, ": not a regular file");
  std::vector<uint8_t> bytes(static_cast<size_t>(info.st_size));
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t got = ::read(file.fd, bytes.data() + done, std::min<size_t>(bytes.size() - done, size_t{1} << 30));
    if (got < 0 && errno == EINTR) continue;
    MDFF_CHECK(got >= 0, "cannot read ", path, ": ", std::strerror(errno));
    MDFF_CHECK(got > 0, "cannot read ", path, ": the file ends after ", done, " of its ", bytes.size(),
               " bytes (it shrank while being read)");
    done += static_cast<size_t>(got);
  }
  return bytes;
}

}  // namespace mdff::io
