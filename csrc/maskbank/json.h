#pragma once
// A small, strict JSON parser (RFC 8259), enough for safetensors headers and the mask bank's
// metadata strings, and the string quoting their writers need. Not part of the public API.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace nad::json {

struct Value {
  enum class Kind { Null, Bool, Number, String, Array, Object };
  Kind kind = Kind::Null;
  bool boolean = false;
  std::string text;  // String: the decoded string; Number: the number as written
  std::vector<Value> items;                            // Array
  std::vector<std::pair<std::string, Value>> members;  // Object, in file order, unique keys

  // Declared here, defined (defaulted) in json.cpp: where Value is complete. Implicit ones would
  // instantiate std::pair<std::string, Value> while Value is still incomplete, which clang with
  // libstdc++ refuses (the fuzz targets build with clang, cpp_tests/fuzz).
  Value();
  Value(const Value&);
  Value(Value&&) noexcept;
  Value& operator=(const Value&);
  Value& operator=(Value&&) noexcept;
  ~Value();

  // The member `key` of an object, or nullptr.
  const Value* find(std::string_view key) const;
  // The number as an integer; throws std::runtime_error naming `what` if it is not one.
  int64_t as_int(const std::string& what) const;
};

const char* kind_name(Value::Kind kind);

// Parses `text` (one JSON value, surrounding whitespace allowed). Throws std::runtime_error
// with the byte offset and what was expected.
Value parse(std::string_view text);

// `utf8` as a JSON string, in ASCII: quotes, backslashes and control characters escaped, every
// other non-ASCII character written \uXXXX (a surrogate pair above U+FFFF), as Python's
// json.dumps writes it. Throws std::runtime_error when `utf8` is not valid UTF-8.
std::string quote(std::string_view utf8);

}  // namespace nad::json
