#pragma once
// Reading safetensors files without Python (https://github.com/huggingface/safetensors):
// an 8-byte little-endian header length N, N bytes of JSON header, then the raw little-endian
// tensor data. The reader is strict: a truncated file, a bad header length, malformed JSON, an
// unknown dtype or offsets outside the data are refused with a c10::Error naming the file and
// what is wrong. Files that nad-ext writes carry checksums (metadata "crc32": a JSON object
// {tensor name: 8 hex digits}, the CRC-32 of each tensor's bytes as stored); the reader
// verifies them and refuses a file whose tensor fails, naming the tensor.
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <ATen/ATen.h>

namespace nad {

struct SafetensorsFile {
  std::string path;                             // where it was read from
  std::map<std::string, std::string> metadata;  // the header's "__metadata__" (string values)
  std::vector<std::string> names;               // tensor names, in header order
  std::map<std::string, at::Tensor> tensors;    // CPU tensors owning their data
  bool verified = false;                        // had checksums, and every tensor matched

  // The tensor `name`; throws naming the file when there is none.
  const at::Tensor& tensor(const std::string& name) const;
};

// Reads the whole file. Supported dtypes: BOOL, U8, I8, I16, I32, I64, F16, BF16, F32, F64.
SafetensorsFile read_safetensors(const std::string& path);

// CRC-32 (ISO-HDLC: zlib's and Python's zlib.crc32) of `size` bytes, continuing from `crc`.
uint32_t crc32(const void* data, size_t size, uint32_t crc = 0);

}  // namespace nad
