#include <nad/safetensors.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>

#include "json.h"

static_assert(std::endian::native == std::endian::little,
              "the safetensors reader assumes a little-endian host");

namespace nad {
namespace {

// Bigger headers are refused before allocating (safetensors' own limit is 100 MB).
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

const std::map<std::string, at::ScalarType>& dtypes() {
  static const std::map<std::string, at::ScalarType> table = {
      {"BOOL", at::kBool}, {"U8", at::kByte},   {"I8", at::kChar},      {"I16", at::kShort},
      {"I32", at::kInt},   {"I64", at::kLong},  {"F16", at::kHalf},     {"BF16", at::kBFloat16},
      {"F32", at::kFloat}, {"F64", at::kDouble}};
  return table;
}

at::ScalarType dtype_of(const std::string& name, const std::string& where) {
  const auto it = dtypes().find(name);
  TORCH_CHECK(it != dtypes().end(), where, ": unknown dtype \"", name, "\"");
  return it->second;
}

std::string dtype_name(at::ScalarType type, const std::string& where) {
  for (const auto& [name, t] : dtypes())
    if (t == type) return name;
  TORCH_CHECK(false, where, ": dtype ", type, " cannot be stored (supported: bool, uint8, int8, int16, int32, ",
              "int64, float16, bfloat16, float32, float64)");
}

// The process's umask without changing it where Linux allows (/proc/self/status), as Python's
// writer reads it; elsewhere by setting and restoring it.
mode_t current_umask() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("Umask:", 0) == 0) return static_cast<mode_t>(std::stoul(line.substr(6), nullptr, 8));
  }
  const mode_t mask = ::umask(022);
  ::umask(mask);
  return mask;
}

// Writes the byte ranges `chunks` to `path` atomically (see save_safetensors).
void write_atomically(const std::string& path, const std::vector<std::pair<const char*, size_t>>& chunks) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  fs::path folder = target.parent_path();
  if (folder.empty()) folder = ".";
  std::error_code error;
  fs::create_directories(folder, error);
  TORCH_CHECK(!error, "cannot write ", path, ": cannot create its folder: ", error.message());
  std::string name = (folder / ("." + target.filename().string() + ".XXXXXX.tmp")).string();
  const int fd = ::mkstemps(name.data(), 4);
  TORCH_CHECK(fd >= 0, "cannot write ", path, ": ", std::strerror(errno));
  // Removes the temporary file (and closes it) on every way out but the rename.
  struct Temporary {
    std::string name;
    int fd;
    bool renamed = false;
    ~Temporary() {
      if (fd >= 0) ::close(fd);
      if (!renamed) ::unlink(name.c_str());
    }
  } tmp{name, fd};
  const auto fail = [&](int err) { TORCH_CHECK(false, "cannot write ", path, ": ", std::strerror(err)); };
  for (const auto& [data, size] : chunks) {
    for (size_t done = 0; done < size;) {
      const ssize_t n = ::write(tmp.fd, data + done, size - done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) fail(errno);
      done += static_cast<size_t>(n);
    }
  }
  // As open() would create it (not mkstemp's 0600), then on disk before the rename.
  if (::fchmod(tmp.fd, 0666 & ~current_umask()) != 0) fail(errno);
  if (::fsync(tmp.fd) != 0) fail(errno);
  const int closing = tmp.fd;
  tmp.fd = -1;
  if (::close(closing) != 0) fail(errno);
  if (::rename(tmp.name.c_str(), path.c_str()) != 0) fail(errno);
  tmp.renamed = true;
  const int dir = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY);
  if (dir >= 0) {  // the rename itself on disk (best effort, as Python's writer)
    ::fsync(dir);
    ::close(dir);
  }
}

std::vector<char> read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  TORCH_CHECK(in, path, ": cannot open the file");
  const auto size = static_cast<size_t>(in.tellg());
  std::vector<char> bytes(size);
  in.seekg(0);
  TORCH_CHECK(in.read(bytes.data(), static_cast<std::streamsize>(size)), path,
              ": cannot read the file");
  return bytes;
}

std::string hex8(uint32_t v) {
  char buf[9];
  std::snprintf(buf, sizeof(buf), "%08x", v);
  return buf;
}

// Checks every tensor's bytes against the "crc32" metadata, if there is one.
bool verify_checksums(const SafetensorsFile& file, const char* data,
                      const std::map<std::string, std::pair<uint64_t, uint64_t>>& ranges) {
  const auto it = file.metadata.find("crc32");
  if (it == file.metadata.end()) return false;
  json::Value sums;
  try {
    sums = json::parse(it->second);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, file.path, ": metadata \"crc32\" is not valid JSON: ", e.what());
  }
  TORCH_CHECK(sums.kind == json::Value::Kind::Object, file.path,
              ": metadata \"crc32\" must be a JSON object");
  std::map<std::string_view, const json::Value*> stored_of;  // not Value::find: linear per tensor
  for (const auto& [name, value] : sums.members) stored_of.emplace(name, &value);
  for (const auto& [name, range] : ranges) {
    const auto found = stored_of.find(name);
    const json::Value* stored = found == stored_of.end() ? nullptr : found->second;
    TORCH_CHECK(stored && stored->kind == json::Value::Kind::String, file.path, ": tensor \"",
                name, "\" has no checksum");
    const std::string actual = hex8(crc32(data + range.first, range.second - range.first));
    TORCH_CHECK(stored->text == actual, file.path, ": tensor \"", name,
                "\" fails its CRC-32 check (stored ", stored->text, ", computed ", actual,
                "): the file is corrupted");
  }
  for (const auto& [name, value] : sums.members)
    TORCH_CHECK(ranges.count(name), file.path, ": tensor \"", name,
                "\" has a checksum but is missing: the file is corrupted");
  return true;
}

}  // namespace

uint32_t crc32(const void* data, size_t size, uint32_t crc) {
  // Slicing-by-8 (8 lookup tables, 8 bytes per step; little-endian host, asserted above):
  // measured 550-650 MB/s on the 2-core CI VM under load, against 135-145 MB/s for the
  // byte-wise loop, so a bank of 1,000 tasks x 15,168 channels (61 MB) is checked in ~0.1 s.
  // cpp_tests pin it to Python's zlib.crc32 on every fixture.
  static const auto tables = [] {
    std::array<std::array<uint32_t, 256>, 8> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[0][i] = c;
    }
    for (int s = 1; s < 8; ++s)
      for (uint32_t i = 0; i < 256; ++i) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFFu];
    return t;
  }();
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  for (; size >= 8; size -= 8, p += 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    lo ^= crc;
    crc = tables[7][lo & 0xFF] ^ tables[6][(lo >> 8) & 0xFF] ^ tables[5][(lo >> 16) & 0xFF] ^
          tables[4][lo >> 24] ^ tables[3][hi & 0xFF] ^ tables[2][(hi >> 8) & 0xFF] ^
          tables[1][(hi >> 16) & 0xFF] ^ tables[0][hi >> 24];
  }
  for (; size; --size, ++p) crc = tables[0][(crc ^ *p) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

const at::Tensor& SafetensorsFile::tensor(const std::string& name) const {
  const auto it = tensors.find(name);
  TORCH_CHECK(it != tensors.end(), path, ": no tensor \"", name, "\"");
  return it->second;
}

SafetensorsFile read_safetensors(const std::string& path) {
  const std::vector<char> bytes = read_all(path);
  TORCH_CHECK(bytes.size() >= 8, path, ": truncated file (", bytes.size(),
              " bytes; a safetensors file starts with an 8-byte header length)");
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  TORCH_CHECK(header_len >= 2 && header_len <= kMaxHeaderBytes, path, ": bad header length ",
              header_len, " (not a safetensors file?)");
  TORCH_CHECK(header_len <= bytes.size() - 8, path, ": truncated file (header of ", header_len,
              " bytes but only ", bytes.size() - 8, " bytes follow the length)");
  const std::string_view header_text(bytes.data() + 8, header_len);
  const char* data = bytes.data() + 8 + header_len;
  const uint64_t data_size = bytes.size() - 8 - header_len;

  json::Value header;
  try {
    header = json::parse(header_text);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, path, ": bad JSON in the header: ", e.what());
  }
  TORCH_CHECK(header.kind == json::Value::Kind::Object, path,
              ": the header must be a JSON object, got ", json::kind_name(header.kind));

  SafetensorsFile file;
  file.path = path;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  std::map<std::string, std::pair<uint64_t, uint64_t>> ranges_of;
  for (const auto& [name, entry] : header.members) {
    const std::string where = path + ": \"" + name + "\"";
    TORCH_CHECK(entry.kind == json::Value::Kind::Object, where, " must be a JSON object");
    if (name == "__metadata__") {
      for (const auto& [key, value] : entry.members) {
        TORCH_CHECK(value.kind == json::Value::Kind::String, path, ": metadata \"", key,
                    "\" must be a string, got ", json::kind_name(value.kind));
        file.metadata[key] = value.text;
      }
      continue;
    }
    const auto* dtype = entry.find("dtype");
    const auto* shape = entry.find("shape");
    const auto* offsets = entry.find("data_offsets");
    TORCH_CHECK(dtype && shape && offsets && entry.members.size() == 3, where,
                " must have exactly the keys dtype, shape and data_offsets");
    TORCH_CHECK(dtype->kind == json::Value::Kind::String, where, ": dtype must be a string");
    const auto scalar_type = dtype_of(dtype->text, where);
    TORCH_CHECK(shape->kind == json::Value::Kind::Array, where, ": shape must be a list");
    TORCH_CHECK(offsets->kind == json::Value::Kind::Array && offsets->items.size() == 2, where,
                ": data_offsets must be a list [begin, end]");
    std::vector<int64_t> sizes;
    uint64_t begin = 0, end = 0;
    try {
      for (const auto& dim : shape->items) {
        sizes.push_back(dim.as_int("a dimension of shape"));
        TORCH_CHECK(sizes.back() >= 0, where, ": negative dimension in shape");
      }
      const int64_t b = offsets->items[0].as_int("data_offsets[0]");
      const int64_t e = offsets->items[1].as_int("data_offsets[1]");
      TORCH_CHECK(b >= 0 && e >= 0, where, ": negative data_offsets");
      begin = static_cast<uint64_t>(b);
      end = static_cast<uint64_t>(e);
    } catch (const std::runtime_error& e) {
      TORCH_CHECK(false, where, ": ", e.what());
    }
    TORCH_CHECK(begin <= end && end <= data_size, where, ": data_offsets [", begin, ", ", end,
                "] out of range (the data section has ", data_size, " bytes: truncated file?)");
    // The element count and byte size, without overflow: a product of the dimensions (the zero
    // ones aside, which LibTorch's strides still multiply) past int64 is no tensor at all.
    uint64_t extent = 1, nbytes = 0;
    bool empty = false;
    for (const int64_t d : sizes) {
      empty = empty || d == 0;
      TORCH_CHECK(d == 0 || (!__builtin_mul_overflow(extent, static_cast<uint64_t>(d), &extent) &&
                             extent <= static_cast<uint64_t>(INT64_MAX)),
                  where, ": shape ", sizes, " is too large (its dimensions multiply to 2^63 or more)");
    }
    TORCH_CHECK(!__builtin_mul_overflow(empty ? 0 : extent, c10::elementSize(scalar_type), &nbytes) &&
                    nbytes <= static_cast<uint64_t>(INT64_MAX),
                where, ": shape ", sizes, " of dtype ", dtype->text, " is too large (2^63 bytes or more)");
    TORCH_CHECK(end - begin == nbytes, where, ": data_offsets [", begin, ", ", end, "] hold ",
                end - begin, " bytes but dtype ", dtype->text, " and shape ", sizes, " need ",
                nbytes);
    auto tensor = at::empty(sizes, at::TensorOptions().dtype(scalar_type));
    if (nbytes) std::memcpy(tensor.data_ptr(), data + begin, nbytes);
    file.names.push_back(name);
    file.tensors.emplace(name, std::move(tensor));
    ranges.emplace_back(begin, end);
    ranges_of[name] = {begin, end};
  }
  // The data section must be covered exactly, without overlaps or holes (the format's rule).
  std::sort(ranges.begin(), ranges.end());
  uint64_t covered = 0;
  for (const auto& [begin, end] : ranges) {
    TORCH_CHECK(begin == covered, path, ": tensor data ",
                begin < covered ? "overlaps" : "leaves a hole", " at byte ", begin,
                " of the data section");
    covered = end;
  }
  TORCH_CHECK(covered == data_size, path, ": ", data_size - covered,
              " unused bytes at the end of the data section (truncated or corrupted file?)");
  file.verified = verify_checksums(file, data, ranges_of);
  return file;
}

void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  TORCH_CHECK(!metadata.count("crc32"), "cannot write ", path,
              ": metadata \"crc32\" is the checksums the writer adds; do not pass it");
  std::vector<at::Tensor> data;
  std::map<std::string, std::string> sums;
  std::ostringstream entries;
  uint64_t offset = 0;
  try {
    for (const auto& [name, tensor] : tensors) {
      const std::string where = path + ": tensor \"" + name + "\"";
      TORCH_CHECK(tensor.defined(), where, " is an undefined tensor");
      const auto t = tensor.detach().to(at::kCPU).contiguous();
      const auto nbytes = static_cast<uint64_t>(t.numel()) * t.element_size();
      entries << "," << json::quote(name) << ":{\"dtype\":\"" << dtype_name(t.scalar_type(), where)
              << "\",\"shape\":[";
      for (int64_t d = 0; d < t.dim(); ++d) entries << (d ? "," : "") << t.size(d);
      entries << "],\"data_offsets\":[" << offset << "," << offset + nbytes << "]}";
      sums[name] = hex8(crc32(t.const_data_ptr(), nbytes));
      offset += nbytes;
      data.push_back(t);
    }
  } catch (const std::runtime_error& e) {  // json::quote: a name that is not UTF-8 (c10::Error is no runtime_error)
    TORCH_CHECK(false, "cannot write ", path, ": a tensor name: ", e.what());
  }
  std::ostringstream header;
  header << "{\"__metadata__\":{";
  auto all = metadata;
  std::string crc = "{";
  for (const auto& [name, sum] : sums) crc += (crc.size() > 1 ? ", " : "") + json::quote(name) + ": \"" + sum + "\"";
  all["crc32"] = crc + "}";
  bool first = true;
  for (const auto& [key, value] : all) {
    try {
      header << (first ? "" : ",") << json::quote(key) << ":" << json::quote(value);
    } catch (const std::runtime_error& e) {
      TORCH_CHECK(false, "cannot write ", path, ": metadata \"", key, "\": ", e.what());
    }
    first = false;
  }
  header << "}" << entries.str() << "}";
  std::string text = header.str();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data starts 8-byte aligned, as safetensors writes it
  const uint64_t length = text.size();
  char prefix[8];
  std::memcpy(prefix, &length, 8);
  std::vector<std::pair<const char*, size_t>> chunks = {{prefix, 8}, {text.data(), text.size()}};
  for (const auto& t : data)
    chunks.emplace_back(static_cast<const char*>(t.const_data_ptr()), static_cast<size_t>(t.numel()) * t.element_size());
  write_atomically(path, chunks);
}

}  // namespace nad
