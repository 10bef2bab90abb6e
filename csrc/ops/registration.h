#pragma once
// One registration of the `nad` operators per process.
//
// The same sources build two libraries: the Python extension nad_ext._C (setup.py) and the
// LibTorch library libnad (CMake). A process may load both: a C++ program linking libnad that
// embeds Python and imports nad_ext, or a Python process that loads libnad with
// torch.ops.load_library. PyTorch allows one TORCH_LIBRARY per namespace and process (a second
// one throws from a static initialiser, which ends the process), so every registration block of
// these sources is a NAD_LIBRARY / NAD_LIBRARY_IMPL block instead: the first library to load
// registers the schemas and all of its kernels; a library that loads after it registers nothing
// (its blocks are skipped), so the operators run the first library's kernels, whichever it was.
// A skipped library checks that the registered operators are the ones it would have registered
// (same version, same schemas) and warns (TORCH_WARN) when they are not; nad::library_info() in
// C++ and nad_ext._extension.library_info() in Python name the library that registered them.
//
//   NAD_LIBRARY(m) { m.def(...); }                 // instead of TORCH_LIBRARY(nad, m)
//   NAD_LIBRARY_IMPL(CPU, m) { m.impl(...); }      // instead of TORCH_LIBRARY_IMPL(nad, CPU, m)
//
// Which library registers is decided once per library, by a function of hidden visibility: each
// library asks its own copy, also where a program's global symbols would otherwise stand in for
// a later library's (a C++ program linking libnad that loads nad_ext._C).
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <c10/util/ArrayRef.h>
#include <torch/library.h>

#if defined(_WIN32)
#define NAD_HIDDEN
#else
#define NAD_HIDDEN __attribute__((visibility("hidden")))
#endif

namespace nad::registration {

// True when this shared library registers the `nad` operators: decided the first time one of its
// registration blocks runs (when it loads); false when another library of this process had
// registered the namespace before.
NAD_HIDDEN bool this_library_registers();

// What the library that registered the operators says about itself, as the op
// nad::_library_info() returns it: "version=0.1.0;cuda=1;torch=2.14.1;abi=1;path=/.../libnad.so".
NAD_HIDDEN std::string library_info();

// The value of `key` in a library_info() string ("" when it has none).
NAD_HIDDEN std::string info_field(const std::string& info, std::string_view key);

// The schemas of NAD_LIBRARY (csrc/ops/schemas.cpp), as declared there.
NAD_HIDDEN c10::ArrayRef<const char*> schemas();

// A registration block that runs only in the library that registers the operators.
class NAD_HIDDEN Block {
 public:
  using Init = void (*)(torch::Library&);
  Block(torch::Library::Kind kind, Init init, std::optional<c10::DispatchKey> key, const char* file,
        uint32_t line);

 private:
  std::optional<torch::Library> library_;
};

}  // namespace nad::registration

#define NAD_LIBRARY(m) NAD_LIBRARY_BLOCK_(DEF, std::nullopt, m, C10_UID)
#define NAD_LIBRARY_IMPL(key, m) NAD_LIBRARY_BLOCK_(IMPL, c10::DispatchKey::key, m, C10_UID)
#define NAD_LIBRARY_BLOCK_(kind, key, m, uid)                                                   \
  static void C10_CONCATENATE(nad_library_init_, uid)(torch::Library&);                          \
  static const ::nad::registration::Block C10_CONCATENATE(nad_library_block_, uid)(             \
      torch::Library::kind, &C10_CONCATENATE(nad_library_init_, uid), key, __FILE__, __LINE__); \
  void C10_CONCATENATE(nad_library_init_, uid)(torch::Library & m)
