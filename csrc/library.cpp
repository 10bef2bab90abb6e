// Library-level facts and settings for C++ users (csrc/include/nad/nad.h), and, in a build without
// the CUDA kernels, CUDA kernels that say so. Compiled into both the Python extension and the
// LibTorch library.
#include <cstring>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <nad/nad.h>

#include "ops/registration.h"

namespace nad {
namespace {

std::string registered_info() {
  static const auto handle =
      c10::Dispatcher::singleton().findSchemaOrThrow("nad::_library_info", "").typed<std::string()>();
  return handle.call();
}

}  // namespace

const char* version() { return NAD_VERSION_STRING; }

LibraryInfo library_info() {
  const std::string info = registered_info();
  LibraryInfo out;
  out.version = registration::info_field(info, "version");
  out.cuda_kernels = registration::info_field(info, "cuda") == "1";
  out.torch_version = registration::info_field(info, "torch");
  out.cxx11_abi = registration::info_field(info, "abi") != "0";
  out.path = registration::info_field(info, "path");
  return out;
}

bool has_cuda_kernels() { return library_info().cuda_kernels; }

bool set_check_task_ids(bool enable) {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("nad::_check_task_ids", "")
                                 .typed<bool(std::optional<bool>)>();
  return handle.call(enable);
}

bool check_task_ids_enabled() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("nad::_check_task_ids", "")
                                 .typed<bool(std::optional<bool>)>();
  return handle.call(std::nullopt);
}

namespace detail {

void check_library(const char* header_version) {
  TORCH_CHECK(std::strcmp(header_version, NAD_VERSION_STRING) == 0, "nad: these headers are version ",
              header_version, " but the linked library (",
              registration::info_field(registration::library_info(), "path"), ") is version ",
              NAD_VERSION_STRING, ": build with the headers of the library you link");
  static const LibraryInfo registered = library_info();
  TORCH_CHECK(registered.version == NAD_VERSION_STRING, "nad: the nad operators of this process were registered by ",
              registered.path, " (nad-ext ", registered.version, "), which loaded before this library (nad-ext ",
              NAD_VERSION_STRING, "); load one version of nad-ext per process");
}

}  // namespace detail

#ifndef NAD_WITH_CUDA
namespace {

// The CUDA kernel of every operator in a build without CUDA kernels: an error that names the
// operator, the CUDA argument and what to do, instead of the dispatcher's "Could not run ... with
// arguments from the 'CUDA' backend".
void no_cuda_kernels(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const auto inputs = torch::jit::last(*stack, args.size());
  std::string which;
  for (size_t i = 0; i < args.size() && which.empty(); ++i) {
    const auto& value = inputs[i];
    if (value.isTensor() && value.toTensor().defined() && value.toTensor().is_cuda()) {
      which = args[i].name() + " is on " + value.toTensor().device().str();
    } else if (value.isTensorList()) {
      const auto list = value.toTensorList();
      for (size_t k = 0; k < list.size() && which.empty(); ++k) {
        const at::Tensor t = list[k];
        if (t.defined() && t.is_cuda())
          which = args[i].name() + "[" + std::to_string(k) + "] is on " + t.device().str();
      }
    }
  }
  const std::string info = registration::library_info();
  TORCH_CHECK(false, op.schema().name(), ": ", which.empty() ? "called with CUDA tensors" : which,
              ", but the nad operators of this process were built without CUDA kernels (",
              registration::info_field(info, "path"), ", nad-ext ", registration::info_field(info, "version"),
              "). Build them with CUDA (CMake: -DNAD_WITH_CUDA=ON; the Python extension: NAD_EXT_BUILD=cuda "
              "bash scripts/setup.sh) or pass CPU tensors.");
}

}  // namespace
}  // namespace nad

NAD_LIBRARY_IMPL(CUDA, m) {
  for (const char* schema : nad::registration::schemas()) {
    const std::string name(schema, std::strchr(schema, '('));
    if (name[0] != '_') m.impl(name.c_str(), torch::CppFunction::makeFromBoxedFunction<&nad::no_cuda_kernels>());
  }
}
#else
}  // namespace nad
#endif
