// The doctest main shared by the test executables. An executable that defines
// mdff_test_skip_reason() returning a non-empty string (test_cuda without a GPU) prints it and exits
// with 77, which CTest reports as "skipped" together with that reason.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <string>

std::string mdff_test_skip_reason() __attribute__((weak));

int main(int argc, char** argv) {
  if (mdff_test_skip_reason) {
    std::string why = mdff_test_skip_reason();
    if (!why.empty()) {
      std::printf("SKIPPED: %s\n", why.c_str());
      return 77;
    }
  }
  doctest::Context context(argc, argv);
  return context.run();
}
