// Errors with context: MDFF_CHECK(cond, parts...) throws mdff::Error whose message is the parts joined,
// followed by the failed condition and file:line. Used for every user-facing precondition (shapes,
// dtypes, devices, options): a clear exception, never an assert or a crash.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace mdff {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
  Error(const std::string& what, std::string reason) : std::runtime_error(what), reason_(std::move(reason)) {}
  // The message without the failed check and its file:line (MDFF_CHECK's parts alone): what a usage error
  // shows, since the mistake is the user's, not the program's.
  const char* reason() const noexcept { return reason_.empty() ? what() : reason_.c_str(); }

 private:
  std::string reason_;
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
