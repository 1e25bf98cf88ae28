// Files written whole or not at all: AtomicFile writes a temporary file next to its path, syncs it,
// renames it over the path on commit() and syncs the folder, so an interrupted or failed write (a
// SIGKILL, a full disk, a power cut) never leaves a partial file there. Checkpoints, codes, plots and
// figures are all written this way. A failed write is an io::WriteError naming the path, the step and
// the system's reason (a full disk and a file-size limit are said in words). FolderLock keeps two
// processes from writing into one folder at once.
#pragma once
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/error.h"

namespace mdff::io {

// A file that could not be written (no space, a size limit, a read-only folder, ...); what was at its
// path before is unchanged.
struct WriteError : Error {
  using Error::Error;
};

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

// A temporary file next to `path` (PATH.tmp-PID) that commit() syncs and renames over `path`; removed
// if it never gets there (a write error, an exception while producing the data). Only a process killed
// mid-write leaves it behind: remove_stale_temporaries clears those.
class AtomicFile {
 public:
  explicit AtomicFile(const std::string& path);
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile();

  void write(const void* data, size_t bytes);  // appends
  void commit();                               // sync, close, rename over the path, sync the folder

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
// Throws io::WriteError (naming the path and the reason: a missing folder, no permission) when write_file_atomic
// could not write `path`: its temporary file is created and removed at once. For a program that writes its
// results after a long run, so that it fails before the run.
void check_writable(const std::string& path);

// Deletes the temporary files that processes killed while writing left in `folder` and its
// subfolders (regular files named NAME.tmp-PID with a PID other than this process's), and returns
// their names. Only safe while no other process writes there: hold the folder's FolderLock.
std::vector<std::string> remove_stale_temporaries(const std::string& folder);

// An exclusive lock on a folder for as long as the object lives: flock on FOLDER/.lock, which holds
// the owner's pid. The kernel releases it when the process ends, however it ends (SIGKILL too), so a
// lock is never left stale. A folder another process holds is an Error naming the folder and its pid.
class FolderLock {
 public:
  explicit FolderLock(const std::string& folder);
  FolderLock(const FolderLock&) = delete;
  FolderLock& operator=(const FolderLock&) = delete;

 private:
  FileDescriptor file_;
};

// The whole contents of the file at `path`.
std::vector<uint8_t> read_file(const std::string& path);

}  // namespace mdff::io
