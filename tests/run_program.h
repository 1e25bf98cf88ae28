// Running a program as a user does, for the tests of train_mdff and mdff_search: its exit status and
// everything it printed (stdout and stderr).
#pragma once
#include <doctest/doctest.h>
#include <sys/wait.h>

#include <cstdio>
#include <memory>
#include <string>

namespace mdff::test {

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

}  // namespace mdff::test
