#include "registration.h"

#include <dlfcn.h>

#include <cstdlib>
#include <filesystem>
#include <string_view>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/jit/frontend/function_schema_parser.h>
#include <torch/version.h>

#include "../include/nad/version.h"

namespace nad::registration {
namespace {

// Whether some library of this process has registered the `nad` namespace: it holds an operator.
bool namespace_registered() {
  for (const auto& name : c10::Dispatcher::singleton().getAllOpNames()) {
    if (std::string_view(name.name).substr(0, 5) == "nad::" &&
        c10::Dispatcher::singleton().findSchema(name).has_value())
      return true;
  }
  return false;
}

// This library skips its registration: say so when what is registered is not what it would have
// registered (another version, or other schemas). A warning, not an error: an exception thrown
// while a library loads ends the process. nad.h and nad_ext._extension refuse to run operators of
// another version than theirs.
void check_registered() {
  auto& dispatcher = c10::Dispatcher::singleton();
  std::string theirs = "an unknown build: it has no nad::_library_info";
  if (const auto info = dispatcher.findSchema({"nad::_library_info", ""})) {
    try {
      theirs = info->typed<std::string()>().call();
    } catch (const std::exception& e) {
      theirs = std::string("(nad::_library_info failed: ") + e.what() + ")";
    }
  }
  const std::string mine = library_info();
  std::string differences;
  if (info_field(theirs, "version") != NAD_VERSION_STRING)
    differences += std::string(" version ") + (info_field(theirs, "version").empty() ? "?" : info_field(theirs, "version")) +
                   " instead of " + NAD_VERSION_STRING + ";";
  for (const char* text : schemas()) {
    auto expected = torch::jit::parseSchema(std::string("nad::") + text);
    const auto found = dispatcher.findSchema({expected.name(), expected.overload_name()});
    if (!found.has_value())
      differences += " no operator " + expected.name() + ";";
    else if (!(found->schema() == expected))
      differences += " " + expected.name() + " is \"" + c10::toString(found->schema()) + "\";";
  }
  if (!differences.empty())
    TORCH_WARN("nad: the `nad` operators of this process were registered by another build [", theirs,
               "] than this library [", mine, "], which differs:", differences,
               " this library registers nothing, and operator calls run that build's kernels");
}

bool decide() {
  if (!namespace_registered()) return true;
  check_registered();
  return false;
}

}  // namespace

// The path comes last and may hold any character.
std::string info_field(const std::string& info, std::string_view key) {
  size_t pos = 0;
  while (pos < info.size()) {
    size_t end = info.compare(pos, 5, "path=") == 0 ? std::string::npos : info.find(';', pos);
    if (end == std::string::npos) end = info.size();
    const std::string_view item(info.data() + pos, end - pos);
    if (item.size() > key.size() && item.substr(0, key.size()) == key && item[key.size()] == '=')
      return std::string(item.substr(key.size() + 1));
    pos = end + 1;
  }
  return "";
}

bool this_library_registers() {
  static const bool registers = decide();
  return registers;
}

std::string library_info() {
  std::string path = "unknown";
  Dl_info dl{};
  if (dladdr(reinterpret_cast<void*>(&this_library_registers), &dl) != 0 && dl.dli_fname != nullptr) {
    std::error_code error;
    const auto canonical = std::filesystem::weakly_canonical(dl.dli_fname, error);
    path = error ? std::string(dl.dli_fname) : canonical.string();
  }
#ifdef NAD_WITH_CUDA
  const char* cuda = "1";
#else
  const char* cuda = "0";
#endif
#if defined(_GLIBCXX_USE_CXX11_ABI) && _GLIBCXX_USE_CXX11_ABI == 0
  const char* abi = "0";
#else
  const char* abi = "1";
#endif
  return std::string("version=") + NAD_VERSION_STRING + ";cuda=" + cuda + ";torch=" + TORCH_VERSION +
         ";abi=" + abi + ";path=" + path;
}

Block::Block(torch::Library::Kind kind, Init init, std::optional<c10::DispatchKey> key, const char* file,
             uint32_t line) {
  if (!this_library_registers()) return;
  library_.emplace(kind, "nad", key, file, line);
  init(*library_);
}

}  // namespace nad::registration
