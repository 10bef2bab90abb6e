// libFuzzer target: the whole mask bank reader (nad::MaskBank::load: safetensors.cpp's header
// length, JSON header, dtypes, shapes, offsets and CRC-32 checks, then maskbank.cpp's metadata),
// built with csrc/maskbank/*.cpp under -fsanitize=fuzzer,address,undefined (cpp_tests/fuzz/README.md).
//
// Each input is a whole file. It is handed to the reader through an in-memory file (memfd, read
// through its /proc/self/fd path), so the reader runs exactly as it does on a file on disk.
//
// A custom mutator keeps most mutants well framed: it mutates the JSON header (or the data
// section) on its own and rewrites the 8-byte header length, so that mutations reach the JSON,
// dtype, shape, offset and metadata checks instead of dying at the length check; one mutant in
// four is mutated as raw bytes, for the framing itself. The checksums cover the tensor bytes
// only, so header mutants still pass them unless they move the offsets.
//
// What counts as a bug (the fuzzer then stops with a crash report):
//  - anything a sanitizer reports (overflow, use after free, leak, undefined behaviour);
//  - an exception other than c10::Error escaping MaskBank::load (its documented contract), or a
//    c10::Error whose message does not name the file;
//  - a bank that loads but does not save, or does not load back identically after saving
//    (the reader must accept only what the writer can reproduce).
#include <nad/maskbank.h>
#include <nad/safetensors.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

namespace {

// Warnings (a bank without checksums loads with one) are expected here: keep them quiet.
struct QuietWarnings : c10::WarningHandler {
  void process(const c10::Warning&) override {}
};

[[noreturn]] void bug(const std::string& what) {
  std::fprintf(stderr, "maskbank_fuzzer: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

std::string memfd_path;
int memfd = -1;
// A fresh folder for one save/load round trip (libFuzzer ends with _Exit: no atexit clean-up).
std::string scratch_folder() {
  const char* tmp = std::getenv("TMPDIR");
  std::string folder = std::string(tmp && *tmp ? tmp : "/tmp") + "/nad_maskbank_fuzz.XXXXXX";
  if (!::mkdtemp(folder.data())) bug("mkdtemp failed");
  return folder;
}

void same_banks(const nad::MaskBank& a, const nad::MaskBank& b) {
  if (a.model_id() != b.model_id()) bug("round trip changed model_id");
  if (a.points() != b.points()) bug("round trip changed the gate points");
  if (a.task_list() != b.task_list()) bug("round trip changed the tasks");
  if (a.config_json() != b.config_json()) bug("round trip changed config");
  if (a.epoch() != b.epoch()) bug("round trip changed epoch");
  if (a.calibration_json() != b.calibration_json()) bug("round trip changed calibration");
  if (!b.verified()) bug("a bank saved by the library did not verify");
  if (a.logits().size() != b.logits().size()) bug("round trip changed the number of logits tensors");
  for (size_t l = 0; l < a.logits().size(); ++l) {
    const auto& x = a.logits()[l];
    const auto& y = b.logits()[l];
    if (x.sizes() != y.sizes() || x.scalar_type() != y.scalar_type() ||
        (x.nbytes() && std::memcmp(x.const_data_ptr(), y.const_data_ptr(), x.nbytes()) != 0))
      bug("round trip changed logits." + std::to_string(l));
  }
}

}  // namespace

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size, unsigned int seed) {
  std::minstd_rand rng(seed);
  uint64_t n = 0;
  if (size >= 8) std::memcpy(&n, data, 8);
  if (size < 8 || n == 0 || n > size - 8 || rng() % 4 == 0) return LLVMFuzzerMutate(data, size, max_size);
  std::vector<uint8_t> header(data + 8, data + 8 + n), rest(data + 8 + n, data + size);
  if (rng() % 8 == 0 && !rest.empty()) {  // the data section
    const size_t room = max_size - 8 - header.size();
    rest.resize(std::max(rest.size(), room));
    rest.resize(LLVMFuzzerMutate(rest.data(), size - 8 - n, room));
  } else {  // the header, length rewritten
    const size_t room = max_size - 8 - rest.size();
    if (room < header.size() || room == 0) return LLVMFuzzerMutate(data, size, max_size);
    header.resize(room);
    header.resize(LLVMFuzzerMutate(header.data(), n, room));
  }
  n = header.size();
  std::memcpy(data, &n, 8);
  if (!header.empty()) std::memcpy(data + 8, header.data(), header.size());
  if (!rest.empty()) std::memcpy(data + 8 + header.size(), rest.data(), rest.size());
  return 8 + header.size() + rest.size();
}

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  static QuietWarnings quiet;
  c10::WarningUtils::set_warning_handler(&quiet);
  memfd = ::memfd_create("nad_maskbank_fuzz", 0);
  if (memfd < 0) bug("memfd_create failed");
  memfd_path = "/proc/self/fd/" + std::to_string(memfd);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (::ftruncate(memfd, 0) != 0) bug("ftruncate failed");
  for (size_t done = 0; done < size;) {
    const ssize_t n = ::pwrite(memfd, data + done, size - done, static_cast<off_t>(done));
    if (n <= 0) bug("pwrite failed");
    done += static_cast<size_t>(n);
  }
  std::optional<nad::MaskBank> bank;
  try {
    bank.emplace(nad::MaskBank::load(memfd_path));
  } catch (const c10::Error& e) {
    if (e.msg().find(memfd_path) == std::string::npos)
      bug("a c10::Error that does not name the file: " + e.msg());
    return 0;
  }
  // It loaded: every view works, and a save/load round trip reproduces it.
  int64_t width = 0;
  for (const auto c : bank->layer_sizes()) width += c;
  const auto binary = bank->binary();
  if (binary.dim() != 2 || binary.size(0) != bank->num_tasks() || binary.size(1) != width)
    bug("binary() has the wrong shape");
  bank->check_matches(bank->points());
  const std::string folder = scratch_folder();
  const std::string path = folder + "/bank.safetensors";
  try {
    bank->save(path);
  } catch (const c10::Error& e) {
    bug("a bank that loads does not save: " + e.msg());
  }
  try {
    same_banks(*bank, nad::MaskBank::load(path));
  } catch (const c10::Error& e) {
    bug("a bank saved by the library does not load: " + e.msg());
  }
  ::unlink(path.c_str());
  ::rmdir(folder.c_str());
  return 0;
}
