// Library-level facts for C++ users (csrc/include/nad/nad.h). Compiled into both the Python
// extension and the LibTorch library; CMake passes the version.
#include <ATen/core/dispatch/Dispatcher.h>

#include <nad/nad.h>

#ifndef NAD_VERSION_STRING
#define NAD_VERSION_STRING "unknown"
#endif

namespace nad {

const char* version() { return NAD_VERSION_STRING; }

bool has_cuda_kernels() {
  const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow("nad::task_gate", "");
  return handle.hasKernelForDispatchKey(c10::DispatchKey::CUDA);
}

}  // namespace nad
