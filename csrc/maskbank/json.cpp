#include "json.h"

#include <charconv>
#include <unordered_set>

namespace nad::json {
namespace {

constexpr int kMaxDepth = 64;
constexpr size_t kLinearKeys = 16;

// The length of the valid UTF-8 sequence that starts at s[i] (a byte >= 0x80), or 0: its length
// from the lead byte, continuation bytes 10xxxxxx, no overlong forms, no surrogates, nothing
// above U+10FFFF. `cp` receives the code point.
int utf8_sequence(std::string_view s, size_t i, unsigned& cp) {
  const auto c = static_cast<unsigned char>(s[i]);
  const int len = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
  if (len == 0 || len > static_cast<int64_t>(s.size() - i)) return 0;
  cp = c & (0xFF >> (len + 1));
  for (int k = 1; k < len; ++k) {
    const auto cont = static_cast<unsigned char>(s[i + k]);
    if ((cont & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (cont & 0x3F);
  }
  const unsigned min = len == 2 ? 0x80 : len == 3 ? 0x800 : 0x10000;
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp < 0xE000)) return 0;
  return len;
}

class Parser {
 public:
  explicit Parser(std::string_view text) : s_(text) {}

  Value document() {
    Value v = value(0);
    skip_space();
    if (pos_ != s_.size()) fail("unexpected text after the JSON value");
    return v;
  }

 private:
  // A byte for a message: 'c' when it is printable ASCII, else its value (a NUL, a control
  // character or a UTF-8 fragment would make the message unreadable or cut it short).
  static std::string describe(char c) {
    const auto b = static_cast<unsigned char>(c);
    if (b >= 0x20 && b < 0x7F) return std::string("'") + c + "'";
    static constexpr char kHex[] = "0123456789abcdef";
    return std::string("byte 0x") + kHex[b >> 4] + kHex[b & 0xF];
  }

  // quote()'s output for a message: DEL escaped too (quote keeps it raw, as Python's json.dumps
  // does; a message holds printable ASCII only).
  static std::string printable(const std::string& quoted) {
    std::string out;
    for (const char c : quoted) out += c == '\x7f' ? std::string("\\u007f") : std::string(1, c);
    return out;
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error(what + " at byte " + std::to_string(pos_));
  }

  void skip_space() {
    while (pos_ < s_.size() &&
           (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r'))
      ++pos_;
  }

  bool eat(char c) {
    skip_space();
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }

  void expect(char c) {
    if (!eat(c)) fail(std::string("expected '") + c + "'");
  }

  bool literal(std::string_view word) {
    if (s_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }

  Value value(int depth) {
    if (depth > kMaxDepth) fail("JSON nested too deeply");
    skip_space();
    if (pos_ >= s_.size()) fail("unexpected end of JSON");
    Value v;
    const char c = s_[pos_];
    if (c == '{') {
      v.kind = Value::Kind::Object;
      ++pos_;
      if (eat('}')) return v;
      // Duplicate keys: a linear search while the object is small, then a hash set (a linear
      // search per key would make an object of n keys cost n^2: minutes for a megabyte).
      std::unordered_set<std::string> keys;
      do {
        skip_space();
        if (pos_ >= s_.size() || s_[pos_] != '"') fail("expected a string key");
        std::string key = string();
        bool duplicate = false;
        if (v.members.size() < kLinearKeys) {
          duplicate = v.find(key) != nullptr;
        } else {
          if (keys.empty())
            for (const auto& member : v.members) keys.insert(member.first);
          duplicate = !keys.insert(key).second;
        }
        if (duplicate) fail("duplicate key " + printable(quote(key)));
        expect(':');
        v.members.emplace_back(std::move(key), value(depth + 1));
      } while (eat(','));
      expect('}');
    } else if (c == '[') {
      v.kind = Value::Kind::Array;
      ++pos_;
      if (eat(']')) return v;
      do v.items.push_back(value(depth + 1));
      while (eat(','));
      expect(']');
    } else if (c == '"') {
      v.kind = Value::Kind::String;
      v.text = string();
    } else if (literal("true") || literal("false")) {
      v.kind = Value::Kind::Bool;
      v.boolean = c == 't';
    } else if (literal("null")) {
      v.kind = Value::Kind::Null;
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      v.kind = Value::Kind::Number;
      v.text = number();
    } else {
      fail("unexpected character " + describe(c));
    }
    return v;
  }

  std::string number() {
    const size_t start = pos_;
    auto digits = [&] {
      const size_t from = pos_;
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
      if (pos_ == from) fail("expected a digit");
      return pos_ - from;
    };
    if (s_[pos_] == '-') ++pos_;
    const bool leading_zero = pos_ < s_.size() && s_[pos_] == '0';
    if (digits() > 1 && leading_zero) fail("number with a leading zero");
    if (pos_ < s_.size() && s_[pos_] == '.') {
      ++pos_;
      digits();
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      digits();
    }
    return std::string(s_.substr(start, pos_ - start));
  }

  unsigned hex4() {
    if (pos_ + 4 > s_.size()) fail("truncated \\u escape");
    unsigned code = 0;
    for (int i = 0; i < 4; ++i) {
      const char h = s_[pos_++];
      code <<= 4;
      if (h >= '0' && h <= '9') code |= h - '0';
      else if (h >= 'a' && h <= 'f') code |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') code |= h - 'A' + 10;
      else fail("bad hex digit in \\u escape");
    }
    return code;
  }

  static void append_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  std::string string() {
    ++pos_;  // the opening quote
    std::string out;
    while (true) {
      if (pos_ >= s_.size()) fail("unterminated string");
      const char c = s_[pos_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in a string");
      if (static_cast<unsigned char>(c) >= 0x80) {  // JSON text is UTF-8 (RFC 8259, section 8.1)
        unsigned cp = 0;
        const int len = utf8_sequence(s_, pos_ - 1, cp);
        if (len == 0) {
          --pos_;
          fail("invalid UTF-8 in a string");
        }
        out.append(s_.substr(pos_ - 1, len));
        pos_ += len - 1;
        continue;
      }
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= s_.size()) fail("unterminated string");
      switch (const char e = s_[pos_++]) {
        case '"': case '\\': case '/': out += e; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00) {  // a surrogate pair encodes one code point
            if (!literal("\\u")) fail("unpaired surrogate in \\u escape");
            const unsigned low = hex4();
            if (low < 0xDC00 || low >= 0xE000) fail("unpaired surrogate in \\u escape");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          } else if (cp >= 0xDC00 && cp < 0xE000) {
            fail("unpaired surrogate in \\u escape");
          }
          append_utf8(out, cp);
          break;
        }
        default:
          if (describe(e)[0] == '\'') fail(std::string("bad escape '\\") + e + "'");
          fail("bad escape: a backslash, then " + describe(e));
      }
    }
  }

  std::string_view s_;
  size_t pos_ = 0;
};

}  // namespace

Value::Value() = default;
Value::Value(const Value&) = default;
Value::Value(Value&&) noexcept = default;
Value& Value::operator=(const Value&) = default;
Value& Value::operator=(Value&&) noexcept = default;
Value::~Value() = default;

const Value* Value::find(std::string_view key) const {
  for (const auto& [k, v] : members)
    if (k == key) return &v;
  return nullptr;
}

int64_t Value::as_int(const std::string& what) const {
  int64_t out = 0;
  if (kind == Kind::Number) {
    const auto [end, err] = std::from_chars(text.data(), text.data() + text.size(), out);
    if (err == std::errc() && end == text.data() + text.size()) return out;
  }
  throw std::runtime_error(what + " must be an integer, got " +
                           (kind == Kind::Number ? text : std::string(kind_name(kind))));
}

const char* kind_name(Value::Kind kind) {
  switch (kind) {
    case Value::Kind::Null: return "null";
    case Value::Kind::Bool: return "a boolean";
    case Value::Kind::Number: return "a number";
    case Value::Kind::String: return "a string";
    case Value::Kind::Array: return "a list";
    case Value::Kind::Object: return "an object";
  }
  return "?";
}

Value parse(std::string_view text) { return Parser(text).document(); }

std::string quote(std::string_view utf8) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "\"";
  auto escape = [&](unsigned unit) {
    out += "\\u";
    for (int shift = 12; shift >= 0; shift -= 4) out += kHex[(unit >> shift) & 0xF];
  };
  for (size_t i = 0; i < utf8.size();) {
    const auto c = static_cast<unsigned char>(utf8[i]);
    if (c < 0x80) {
      switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        case '\b': out += "\\b"; break;
        case '\f': out += "\\f"; break;
        default:
          if (c < 0x20) escape(c);
          else out += static_cast<char>(c);
      }
      ++i;
      continue;
    }
    // A multi-byte sequence (utf8_sequence says what is valid).
    unsigned cp = 0;
    const int len = utf8_sequence(utf8, i, cp);
    if (len == 0) throw std::runtime_error("invalid UTF-8 at byte " + std::to_string(i));
    if (cp < 0x10000) {
      escape(cp);
    } else {
      escape(0xD800 + ((cp - 0x10000) >> 10));
      escape(0xDC00 + ((cp - 0x10000) & 0x3FF));
    }
    i += len;
  }
  return out + "\"";
}

}  // namespace nad::json
