// doctest prints a const char* in a check's or a message's output as its address (0x55f9...): its option
// to print the text, DOCTEST_CONFIG_TREAT_CHAR_STAR_AS_STRING, does not compile with Debian's doctest
// 2.4.9 and would also make == compare the texts. These specialisations print the text and change nothing
// else: CHECK(p == q) on two char pointers still compares the addresses (two equal texts at different
// addresses fail, printed alike), and a pointer to bytes without a terminating NUL would be read past
// them. Included by every test file, right after doctest.
#pragma once
#include <doctest/doctest.h>

namespace doctest {
template <>
struct StringMaker<const char*> {
  static String convert(const char* text) { return text ? String(text) : String("(null)"); }
};
template <>
struct StringMaker<char*> {
  static String convert(const char* text) { return StringMaker<const char*>::convert(text); }
};
}  // namespace doctest
