// libFuzzer target: the JSON parser and quoting of csrc/maskbank/json.{h,cpp} alone (no LibTorch),
// built under -fsanitize=fuzzer,address,undefined (cpp_tests/fuzz/README.md).
//
// What counts as a bug (the fuzzer then stops with a crash report):
//  - anything a sanitizer reports, or an exception other than std::runtime_error;
//  - a parse error whose message lacks the byte offset, or holds a byte that is not printable
//    ASCII (the input's bytes must appear escaped: a raw NUL cuts what() short);
//  - parse(text) succeeding on a document that, written back (strings with quote(), numbers as
//    written), does not parse to the same value;
//  - quote(bytes) succeeding with output that is not ASCII without control characters (DEL
//    passes, as in Python's json.dumps), or that does not parse
//    back to exactly `bytes`;
//  - parse accepting a string that is not valid UTF-8 (RFC 8259: JSON text is UTF-8), i.e.
//    quote refusing a string that parse returned.
#include "maskbank/json.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <string_view>

namespace {

using nad::json::Value;

[[noreturn]] void bug(const std::string& what) {
  std::fprintf(stderr, "json_fuzzer: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

// The value as JSON text: strings through quote(), numbers as written.
std::string write(const Value& v) {
  switch (v.kind) {
    case Value::Kind::Null: return "null";
    case Value::Kind::Bool: return v.boolean ? "true" : "false";
    case Value::Kind::Number: return v.text;
    case Value::Kind::String: return nad::json::quote(v.text);
    case Value::Kind::Array: {
      std::string out = "[";
      for (size_t i = 0; i < v.items.size(); ++i) out += (i ? "," : "") + write(v.items[i]);
      return out + "]";
    }
    case Value::Kind::Object: {
      std::string out = "{";
      for (size_t i = 0; i < v.members.size(); ++i)
        out += (i ? "," : "") + nad::json::quote(v.members[i].first) + ":" + write(v.members[i].second);
      return out + "}";
    }
  }
  bug("unknown kind");
}

bool same(const Value& a, const Value& b) {
  if (a.kind != b.kind || a.boolean != b.boolean || a.text != b.text || a.items.size() != b.items.size() ||
      a.members.size() != b.members.size())
    return false;
  for (size_t i = 0; i < a.items.size(); ++i)
    if (!same(a.items[i], b.items[i])) return false;
  for (size_t i = 0; i < a.members.size(); ++i)
    if (a.members[i].first != b.members[i].first || !same(a.members[i].second, b.members[i].second)) return false;
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);

  // parse, and the round trip of what it accepts.
  Value value;
  bool parsed = false;
  try {
    value = nad::json::parse(text);
    parsed = true;
  } catch (const std::runtime_error& e) {
    const std::string_view message(e.what());
    if (message.find(" at byte ") == std::string_view::npos)
      bug(std::string("a parse error without its byte offset: ") + e.what());
    for (const char c : message)  // the input's bytes appear escaped, never raw
      if (c < 0x20 || static_cast<unsigned char>(c) >= 0x7F) bug(std::string("a parse error with a raw byte: ") + e.what());
  }
  if (parsed) {
    std::string again;
    try {
      again = write(value);
    } catch (const std::runtime_error& e) {
      bug(std::string("parse accepted a string that quote refuses: ") + e.what());
    }
    Value reparsed;
    try {
      reparsed = nad::json::parse(again);
    } catch (const std::runtime_error& e) {
      bug(std::string("a parsed document, written back, does not parse: ") + e.what() + "\n" + again);
    }
    if (!same(value, reparsed)) bug("a parsed document, written back, parses to another value:\n" + again);
    if (value.kind == Value::Kind::Object)  // find() sees every member
      for (const auto& [key, member] : value.members)
        if (value.find(key) != &member) bug("find() does not find member \"" + key + "\"");
    if (value.kind == Value::Kind::Number) {
      try {
        const int64_t n = value.as_int("the number");
        if (std::to_string(n) != value.text && value.text != "-0") bug("as_int(" + value.text + ") = " + std::to_string(n));
      } catch (const std::runtime_error&) {
      }
    }
  }

  // quote: ASCII out, and parse(quote(s)) == s.
  std::string quoted;
  try {
    quoted = nad::json::quote(text);
  } catch (const std::runtime_error&) {
    return 0;  // not UTF-8
  }
  for (const char c : quoted)
    if (c < 0x20 || static_cast<unsigned char>(c) > 0x7F) bug("quote wrote a control character or a byte that is not ASCII");
  Value back;
  try {
    back = nad::json::parse(quoted);
  } catch (const std::runtime_error& e) {
    bug(std::string("quote wrote what parse refuses: ") + e.what());
  }
  if (back.kind != Value::Kind::String || back.text != text) bug("parse(quote(s)) != s");
  return 0;
}
