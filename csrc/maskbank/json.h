#pragma once
// A small, strict JSON parser (RFC 8259), enough for safetensors headers and the mask bank's
// metadata strings. Not part of the public API.
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

  // The member `key` of an object, or nullptr.
  const Value* find(std::string_view key) const;
  // The number as an integer; throws std::runtime_error naming `what` if it is not one.
  int64_t as_int(const std::string& what) const;
};

const char* kind_name(Value::Kind kind);

// Parses `text` (one JSON value, surrounding whitespace allowed). Throws std::runtime_error
// with the byte offset and what was expected.
Value parse(std::string_view text);

}  // namespace nad::json
