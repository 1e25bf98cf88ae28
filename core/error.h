// Errors with context: MDFF_CHECK(cond, parts...) throws mdff::Error whose message is the parts joined,
// followed by the failed condition and file:line. Used for every user-facing precondition (shapes,
// dtypes, devices, options): a clear exception, never an assert or a crash.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace mdff {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A device ran out of memory: the caller may add what it was doing (batch size, image size) and retry
// smaller.
struct OutOfMemory : Error {
  using Error::Error;
};

namespace detail {
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}
[[noreturn]] void fail(const char* file, int line, const char* condition, const std::string& message);
}  // namespace detail

}  // namespace mdff

#define MDFF_CHECK(cond, ...)                                                               \
  do {                                                                                      \
    if (!(cond)) ::mdff::detail::fail(__FILE__, __LINE__, #cond, ::mdff::detail::concat(__VA_ARGS__)); \
  } while (0)

#define MDFF_FAIL(...) ::mdff::detail::fail(__FILE__, __LINE__, nullptr, ::mdff::detail::concat(__VA_ARGS__))
