#pragma once
// Reading and writing safetensors files without Python (https://github.com/huggingface/safetensors):
// an 8-byte little-endian header length N, N bytes of JSON header, then the raw little-endian
// tensor data. The reader is strict: a truncated file, a bad header length, malformed JSON, an
// unknown dtype or offsets outside the data are refused with a c10::Error naming the file and
// what is wrong. Files that nad-ext writes carry checksums (metadata "crc32": a JSON object
// {tensor name: 8 hex digits}, the CRC-32 of each tensor's bytes as stored); the reader
// verifies them and refuses a file whose tensor fails, naming the tensor; the writer adds them.
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include <nad/export.h>

namespace nad {

struct NAD_API SafetensorsFile {
  std::string path;                             // where it was read from
  std::map<std::string, std::string> metadata;  // the header's "__metadata__" (string values)
  std::vector<std::string> names;               // tensor names, in header order
  std::map<std::string, at::Tensor> tensors;    // CPU tensors owning their data
  bool verified = false;                        // had checksums, and every tensor matched

  // The tensor `name`; throws naming the file when there is none.
  const at::Tensor& tensor(const std::string& name) const;
};

// Reads the whole file. Supported dtypes: BOOL, U8, I8, I16, I32, I64, F16, BF16, F32, F64.
NAD_API SafetensorsFile read_safetensors(const std::string& path);

// CRC-32 (ISO-HDLC: zlib's and Python's zlib.crc32) of `size` bytes, continuing from `crc`.
NAD_API uint32_t crc32(const void* data, size_t size, uint32_t crc = 0);

// Writes `tensors` (their bytes as CPU, contiguous tensors: little-endian, row-major; in name
// order) with `metadata` plus the "crc32" checksum of each tensor, atomically: a temporary file
// ".<name>.<random>.tmp" beside `path`, flushed to disk and renamed over it (the names Python's
// writer uses, so a run folder's clean-up recognises them). Missing parent folders are created.
// Dtypes: those read_safetensors reads. Throws c10::Error naming the file and the cause (a full
// disk, a folder in the way...), leaving `path` as it was and no temporary file behind.
NAD_API void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                              const std::map<std::string, std::string>& metadata);

}  // namespace nad
