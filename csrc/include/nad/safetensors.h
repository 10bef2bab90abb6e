#pragma once
// Reading safetensors files without Python (https://github.com/huggingface/safetensors):
// an 8-byte little-endian header length N, N bytes of JSON header, then the raw little-endian
// tensor data. The reader is strict: a truncated file, a bad header length, malformed JSON, an
// unknown dtype or offsets outside the data are refused with a c10::Error naming the file and
// what is wrong.
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

  // The tensor `name`; throws naming the file when there is none.
  const at::Tensor& tensor(const std::string& name) const;
};

// Reads the whole file. Supported dtypes: BOOL, U8, I8, I16, I32, I64, F16, BF16, F32, F64.
SafetensorsFile read_safetensors(const std::string& path);

}  // namespace nad
