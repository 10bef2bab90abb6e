#pragma once
// The check of the C++ tests (nad_tests.cpp, cudasim/): REQUIRE(cond, what << ...) throws a
// Failure naming the file, the line, the condition and what differs; the test's runner prints it.
#include <sstream>
#include <stdexcept>

namespace nad_test {

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace nad_test

#define REQUIRE(cond, ...)                                                                  \
  do {                                                                                      \
    if (!(cond)) {                                                                          \
      std::ostringstream msg_;                                                              \
      msg_ << __FILE__ << ":" << __LINE__ << ": check failed: " #cond " " << __VA_ARGS__; \
      throw ::nad_test::Failure(msg_.str());                                                \
    }                                                                                       \
  } while (0)
