// Running a program as a user does, for the tests of train_mdff and mdff_search: its exit status and
// everything it printed (stdout and stderr); or in the background, for tests that stop or kill it.
#pragma once
#include "tests/doctest_text.h"
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>

namespace mdff::test {

// A program the tests run (`built`: where the build put it, an absolute path compiled in), else the one of
// that name beside the running test executable: scripts/gpu_check.sh carries tests and programs to another
// machine in one folder, where the build's paths do not exist.
inline std::string program(const char* built) {
  namespace fs = std::filesystem;
  if (fs::exists(built)) return built;
  const fs::path beside = fs::read_symlink("/proc/self/exe").parent_path() / fs::path(built).filename();
  return fs::exists(beside) ? beside.string() : built;
}

struct Run {
  int exit_code;
  std::string output;  // stdout and stderr
};

inline Run run_program(const std::string& binary, const std::string& arguments) {
  const std::string command = binary + " " + arguments + " 2>&1";
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(command.c_str(), "r"), pclose);
  REQUIRE(pipe);
  std::string output;
  char buffer[4096];
  while (size_t n = fread(buffer, 1, sizeof buffer, pipe.get())) output.append(buffer, n);
  const int status = pclose(pipe.release());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
}

// Starts `binary arguments` (through the shell, which execs it: the pid is the program's), with its
// stdout and stderr going to the file `log`.
inline pid_t start_program(const std::string& binary, const std::string& arguments, const std::string& log) {
  const std::string command = "exec " + binary + " " + arguments + " >" + log + " 2>&1";
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::execl("/bin/sh", "sh", "-c", command.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  return pid;
}

// Whether a program start_program started has ended (it is left to wait_program to collect).
inline bool has_exited(pid_t pid) {
  siginfo_t info{};
  return ::waitid(P_PID, pid, &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid == pid;
}

// Waits for a program start_program started: its exit status, or minus the signal that ended it.
inline int wait_program(pid_t pid) {
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
}

}  // namespace mdff::test
