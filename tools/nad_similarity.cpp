// nad_similarity: the task x task similarity matrix of a mask bank, as CSV.
//
//   nad_similarity <bank.safetensors> [--metric iou|iomin] [--out file.csv]
//
// Entry (i, j) is the overlap of task i's and task j's binary sub-architectures, averaged over
// the gate points (nad::mask_overlap with per_layer=false). Prints to stdout unless --out.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include <nad/maskbank.h>
#include <nad/nad.h>

namespace {

constexpr const char* kUsage =
    "usage: nad_similarity <bank.safetensors> [--metric iou|iomin] [--out file.csv]\n";

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n\r") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

std::string similarity_csv(const nad::MaskBank& bank, const at::Tensor& sim) {
  std::ostringstream out;
  out << "task";
  for (const auto& t : bank.tasks()) out << ',' << csv_field(t);
  out << '\n';
  const auto s = sim.to(at::kDouble).contiguous();
  const auto* p = s.data_ptr<double>();
  const int64_t T = s.size(0);
  char value[32];
  for (int64_t i = 0; i < T; ++i) {
    out << csv_field(bank.tasks()[i]);
    for (int64_t j = 0; j < s.size(1); ++j) {
      std::snprintf(value, sizeof(value), "%.6f", p[i * s.size(1) + j]);
      out << ',' << value;
    }
    out << '\n';
  }
  return out.str();
}

}  // namespace

int main(int argc, char** argv) {
  std::string bank_path, metric = "iou", out_path;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if ((arg == "--metric" || arg == "--out") && i + 1 < argc) {
      (arg == "--metric" ? metric : out_path) = argv[++i];
    } else if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      return 0;
    } else if (!arg.empty() && arg[0] != '-' && bank_path.empty()) {
      bank_path = arg;
    } else {
      std::cerr << "nad_similarity: unexpected argument '" << arg << "'\n" << kUsage;
      return 2;
    }
  }
  if (bank_path.empty() || (metric != "iou" && metric != "iomin")) {
    if (!bank_path.empty()) std::cerr << "nad_similarity: --metric must be iou or iomin\n";
    std::cerr << kUsage;
    return 2;
  }
  try {
    const auto bank = nad::MaskBank::load(bank_path);
    const auto masks = bank.binary();
    const auto sim = nad::mask_overlap(masks, masks, bank.layer_sizes(), metric, false);
    const std::string csv = similarity_csv(bank, sim);
    if (out_path.empty()) {
      std::cout << csv;
    } else {
      std::ofstream out(out_path);
      out << csv;
      if (!out.flush()) {
        std::cerr << "nad_similarity: cannot write " << out_path << "\n";
        return 1;
      }
    }
  } catch (const c10::Error& e) {
    std::cerr << "nad_similarity: " << e.what_without_backtrace() << "\n";
    return 1;
  }
  return 0;
}
