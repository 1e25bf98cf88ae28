// Whole-file writes and folder locks: a failed write (a full disk, through /dev/full; a file-size
// limit, in a child process) is an io::WriteError naming the file and saying why in words, and leaves
// the previous file as it was; the temporary files of killed writers are removed, and nothing else; a
// locked folder is refused naming the holder's pid until the lock goes.
#include <doctest/doctest.h>
#include "tests/doctest_text.h"
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/file_io.h"
#include "tests/temp_folder.h"

using namespace mdff;
namespace fs = std::filesystem;

namespace {
std::string text_of(const fs::path& path) {
  const std::vector<uint8_t> bytes = io::read_file(path.string());
  return std::string(bytes.begin(), bytes.end());
}
}  // namespace

TEST_CASE("a write into a full disk fails naming the file and the full disk, and keeps the previous file") {
  const test::TempFolder folder("mdff_file_io_full");
  const std::string path = folder.file("checkpoint.safetensors");
  io::write_file_atomic(path, "previous");
  // The temporary file this process would write is /dev/full, where every write fails with ENOSPC.
  const std::string temporary = path + ".tmp-" + std::to_string(::getpid());
  fs::create_symlink("/dev/full", temporary);
  CHECK_THROWS_WITH_AS(io::write_file_atomic(path, std::string(1 << 16, 'x')),
                       ("cannot write " + path + ": No space left on device: the disk is full (writing the "
                        "temporary file " + temporary + ")").c_str(),
                       io::WriteError);
  CHECK(text_of(path) == "previous");
  CHECK_FALSE(fs::exists(fs::symlink_status(temporary)));  // the failed write removes its temporary file
}

TEST_CASE("a write past the file-size limit fails naming the limit, and keeps the previous file") {
  const test::TempFolder folder("mdff_file_io_limit");
  const std::string path = folder.file("codes.npy");
  io::write_file_atomic(path, "previous");
  // In a child process, so that the limit stays there: 0 when the error is the expected one.
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    std::signal(SIGXFSZ, SIG_IGN);  // as train_mdff does: EFBIG instead of death
    const rlimit limit{4096, 4096};
    ::setrlimit(RLIMIT_FSIZE, &limit);
    try {
      io::write_file_atomic(path, std::string(1 << 16, 'x'));
    } catch (const io::WriteError& e) {
      const std::string expected = "cannot write " + path + ": File too large: it would exceed the largest file "
                                   "this process may write (ulimit -f) or the file system allows (writing the "
                                   "temporary file " + path + ".tmp-" + std::to_string(::getpid()) + ")";
      ::_exit(e.what() == expected ? 0 : 1);
    }
    ::_exit(2);
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK(text_of(path) == "previous");
  CHECK(std::distance(fs::directory_iterator(folder.path), fs::directory_iterator()) == 1);  // no temporary left
}

TEST_CASE("the temporary files of killed writers are removed, and nothing else") {
  const test::TempFolder folder("mdff_file_io_stale");
  fs::create_directories(folder.path / "codes" / "8");
  const std::vector<std::string> stale{"checkpoint_8bits.safetensors.tmp-123", "codes/8/query.npy.tmp-45"};
  const std::vector<std::string> kept{"metrics.json", "notes.tmp-12a", "x.tmp-", ".tmp-77",
                                      "config.json.tmp-" + std::to_string(::getpid())};  // this process's own
  for (const auto& name : stale) std::ofstream(folder.path / name) << "partial";
  for (const auto& name : kept) std::ofstream(folder.path / name) << "kept";
  fs::create_symlink("/dev/null", folder.path / "link.tmp-99");  // not a regular file
  const std::vector<std::string> removed = io::remove_stale_temporaries(folder.path.string());
  CHECK(removed.size() == 2);
  for (const auto& name : stale) CHECK_FALSE(fs::exists(folder.path / name));
  for (const auto& name : kept) CHECK(fs::exists(folder.path / name));
  CHECK(fs::is_symlink(folder.path / "link.tmp-99"));
}

TEST_CASE("a locked folder is refused naming the process that holds it, until the lock goes") {
  const test::TempFolder folder("mdff_file_io_lock");
  const std::string lock_file = folder.file(".lock"), pid = std::to_string(::getpid());
  {
    const io::FolderLock held(folder.path.string());
    CHECK(text_of(lock_file) == pid + "\n");
    // flock locks belong to an open file: a second open, even in this process, is refused.
    const std::string refusal = "another process (pid " + pid + ") is using " + folder.path.string() + ": it holds " +
                                lock_file + ". Wait for it to end, or stop it";
    CHECK_THROWS_WITH_AS(io::FolderLock(folder.path.string()), doctest::Contains(refusal.c_str()), Error);
  }
  CHECK_NOTHROW(io::FolderLock(folder.path.string()));
}
