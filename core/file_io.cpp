// AtomicFile, whole-file writes and reads, stale temporaries and folder locks (see file_io.h).
#include "core/file_io.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

namespace fs = std::filesystem;

namespace mdff::io {

namespace {
constexpr const char* kTemporaryInfix = ".tmp-";

// The system's reason for `error`, with what it means in words for the errors of a full disk.
std::string reason(int error) {
  std::string text = std::strerror(error);
  if (error == ENOSPC) text += ": the disk is full";
  if (error == EDQUOT) text += ": the disk quota is used up";
  if (error == EFBIG)
    text += ": it would exceed the largest file this process may write (ulimit -f) or the file system allows";
  return text;
}

[[noreturn]] void fail_write(const std::string& path, const std::string& step, int error) {
  throw WriteError(detail::concat("cannot write ", path, ": ", reason(error), " (", step, ")"));
}
}  // namespace

AtomicFile::AtomicFile(const std::string& path)
    : path_(path), temp_path_(path + kTemporaryInfix + std::to_string(::getpid())) {
  file_.fd = ::open(temp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (file_.fd < 0) fail_write(path_, "creating the temporary file " + temp_path_, errno);
}

AtomicFile::~AtomicFile() {
  if (!committed_) ::unlink(temp_path_.c_str());
}

void AtomicFile::write(const void* data, size_t bytes) {
  const char* next = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t written = ::write(file_.fd, next, std::min<size_t>(bytes, size_t{1} << 30));
    if (written < 0 && errno == EINTR) continue;
    // write() returns 0 only when nothing can be written; the kernel says ENOSPC for it on a retry
    if (written <= 0) fail_write(path_, "writing the temporary file " + temp_path_, written < 0 ? errno : ENOSPC);
    next += written;
    bytes -= static_cast<size_t>(written);
  }
}

void AtomicFile::commit() {
  // A full disk can surface only here, when the file system allocates the blocks it promised.
  if (::fsync(file_.fd) != 0) fail_write(path_, "syncing the temporary file " + temp_path_, errno);
  const int fd = file_.fd;
  file_.fd = -1;
  if (::close(fd) != 0) fail_write(path_, "closing the temporary file " + temp_path_, errno);
  if (::rename(temp_path_.c_str(), path_.c_str()) != 0)
    fail_write(path_, "renaming the temporary file " + temp_path_ + " over it", errno);
  committed_ = true;
  // The rename is durable once the folder is synced; some file systems cannot sync a folder (EINVAL).
  const std::string folder = fs::path(path_).has_parent_path() ? fs::path(path_).parent_path().string() : ".";
  FileDescriptor directory;
  directory.fd = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (directory.fd < 0) fail_write(path_, "opening its folder to sync the rename", errno);
  if (::fsync(directory.fd) != 0 && errno != EINVAL) fail_write(path_, "syncing its folder after the rename", errno);
}

void write_file_atomic(const std::string& path, const std::vector<ByteSpan>& pieces) {
  AtomicFile file(path);
  for (const ByteSpan& piece : pieces) file.write(piece.data, piece.size);
  file.commit();
}

void write_file_atomic(const std::string& path, const std::string& text) {
  write_file_atomic(path, {{text.data(), text.size()}});
}

void check_writable(const std::string& path) { AtomicFile probe(path); }

std::vector<std::string> remove_stale_temporaries(const std::string& folder) {
  const std::string own_suffix = kTemporaryInfix + std::to_string(::getpid());
  std::vector<std::string> removed;
  std::error_code error;
  for (auto it = fs::recursive_directory_iterator(folder, error); !error && it != fs::recursive_directory_iterator();
       it.increment(error)) {
    if (it->symlink_status().type() != fs::file_type::regular) continue;
    const std::string name = it->path().filename().string();
    const size_t at = name.rfind(kTemporaryInfix);
    if (at == std::string::npos || at == 0) continue;
    const std::string pid = name.substr(at + std::strlen(kTemporaryInfix));
    const bool digits = std::all_of(pid.begin(), pid.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (pid.empty() || !digits || name.substr(at) == own_suffix) continue;
    MDFF_CHECK(fs::remove(it->path(), error), "cannot remove ", it->path().string(), ", a temporary file that a "
               "killed process left: ", error.message());
    removed.push_back(it->path().string());
  }
  MDFF_CHECK(!error, "cannot list ", folder, " to remove the temporary files killed processes left: ", error.message());
  return removed;
}

FolderLock::FolderLock(const std::string& folder) {
  const std::string path = (fs::path(folder) / ".lock").string();
  // A run that gives a folder up may remove its lock file while another process has it open: a lock on that
  // file would then guard nothing. So the lock holds only on the file the path still names; else try again.
  for (int attempt = 0;; ++attempt) {
    if (file_.fd >= 0) ::close(file_.fd);  // the file that was replaced
    file_.fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    MDFF_CHECK(file_.fd >= 0, "cannot lock ", folder, ": ", std::strerror(errno), " (creating ", path, ")");
    if (::flock(file_.fd, LOCK_EX | LOCK_NB) != 0) {
      MDFF_CHECK(errno == EWOULDBLOCK, "cannot lock ", folder, ": ", std::strerror(errno), " (flock on ", path, ")");
      char text[24] = {};
      const ssize_t got = ::pread(file_.fd, text, sizeof text - 1, 0);
      std::string pid = got > 0 ? std::string(text, static_cast<size_t>(got)) : "";
      pid.erase(std::remove(pid.begin(), pid.end(), '\n'), pid.end());
      MDFF_FAIL("another process (pid ", pid.empty() ? "not yet written" : pid, ") is using ", folder, ": it holds ",
                path, ". Wait for it to end, or stop it, before running here");
    }
    struct stat locked {}, named {};
    if (::fstat(file_.fd, &locked) == 0 && ::stat(path.c_str(), &named) == 0 && locked.st_dev == named.st_dev &&
        locked.st_ino == named.st_ino)
      break;
    MDFF_CHECK(attempt < 100, "cannot lock ", folder, ": its lock file ", path, " keeps being replaced");
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  MDFF_CHECK(::ftruncate(file_.fd, 0) == 0 && ::pwrite(file_.fd, pid.data(), pid.size(), 0) ==
                 static_cast<ssize_t>(pid.size()),
             "cannot write ", path, " (this process's pid, for others to name): ", std::strerror(errno));
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
