// C++ tests of nad-ext's LibTorch library, one ctest per case:
//   nad_tests <case> <fixtures folder> [nad_similarity path]
// The fixtures (inputs and the values the Python side expects) come from make_fixtures.py.
// A failed check prints what differs and exits nonzero.
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <torch/autograd.h>
#include <torch/script.h>

#include <nad/maskbank.h>
#include <nad/nad.h>
#include <nad/safetensors.h>

#include "../csrc/ops/launch.h"
#include "require.h"

namespace {

using nad_test::Failure;

void check_close(const at::Tensor& actual, const at::Tensor& expected, const std::string& what,
                 double atol = 1e-5, double rtol = 1e-5) {
  REQUIRE(actual.sizes() == expected.sizes(),
        what << ": shape " << actual.sizes() << " != " << expected.sizes());
  const auto a = actual.detach().cpu().to(at::kDouble), e = expected.to(at::kDouble);
  REQUIRE(at::allclose(a, e, rtol, atol),
        what << ": max abs difference " << (a - e).abs().max().item<double>());
}

// Runs fn, which must throw c10::Error whose message contains every one of `parts`.
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts,
                  const std::string& what) {
  std::string message;
  try {
    fn();
  } catch (const c10::Error& e) {
    message = e.what_without_backtrace();
  }
  REQUIRE(!message.empty(), what << ": no error was raised");
  for (const auto& part : parts)
    REQUIRE(message.find(part) != std::string::npos,
          what << ": message lacks \"" << part << "\": " << message);
  std::cout << "  refused as expected: " << message << "\n";
}

using Args = std::vector<std::string>;  // fixtures folder, then extra arguments

void task_gate_forward_backward(const Args& args) {
  const auto fx = nad::read_safetensors(args[0] + "/task_gate.safetensors");
  for (const std::string p : {"conv", "flat"}) {
    auto x = fx.tensor(p + ".x").clone().requires_grad_(true);
    auto logits = fx.tensor(p + ".logits").clone().requires_grad_(true);
    const auto& ids = fx.tensor(p + ".task_ids");
    const auto& grad_y = fx.tensor(p + ".grad_y");
    const auto y = nad::task_gate(x, logits, ids);
    check_close(y, fx.tensor(p + ".y"), p + " forward");
    // Through the autograd kernel registered in C++.
    const auto grads = torch::autograd::grad({y}, {x, logits}, {grad_y});
    check_close(grads[0], fx.tensor(p + ".grad_x"), p + " grad_x");
    check_close(grads[1], fx.tensor(p + ".grad_logits"), p + " grad_logits");
    // And the backward operator called directly.
    const auto [gx, gl] = nad::task_gate_backward(grad_y, x.detach(), logits.detach(), ids);
    check_close(gx, fx.tensor(p + ".grad_x"), p + " task_gate_backward grad_x");
    check_close(gl, fx.tensor(p + ".grad_logits"), p + " task_gate_backward grad_logits");
    // Without the input gradient: only the logits gradient is computed.
    const auto [gx0, gl0] = nad::task_gate_backward(grad_y, x.detach(), logits.detach(), ids, false);
    REQUIRE(gx0.numel() == 0, p << ": grad_x computed although x_grad is false");
    check_close(gl0, fx.tensor(p + ".grad_logits"), p + " task_gate_backward(x_grad=false)");
  }
  const auto x = fx.tensor("conv.x"), logits = fx.tensor("conv.logits");
  const auto ids = fx.tensor("conv.task_ids");
  expect_error([&] { nad::task_gate(x, logits.narrow(1, 0, 2), ids); }, {"logits", "channels"},
               "channel mismatch");
  expect_error([&] { nad::task_gate(x, logits, ids.to(at::kInt)); }, {"task_ids", "int64"},
               "int32 task ids");
  expect_error([&] { nad::task_gate(x, logits, ids + 100); }, {"task_ids", "[0, 3)"},
               "task ids out of range");
  expect_error([&] { nad::task_gate(at::Tensor(), logits, ids); }, {"x", "undefined"},
               "undefined x");
  std::cout << "  nad " << nad::version() << ", CUDA kernels: " << nad::has_cuda_kernels() << "\n";
}

// The launch geometry of the CUDA kernels (csrc/ops/launch.h), checked on the CPU: grid-stride
// loops cover every item exactly once whatever the cap, and the index arithmetic holds past the
// limits the kernels used to have (grid.y = 65,535 samples, grid.z = 65,535 chunks of 256
// positions, 2^32 rows).
void launch_geometry(const Args&) {
  using namespace nad::launch;
  for (const int64_t items : {int64_t{1}, int64_t{7}, kMaxGridY, kMaxGridY + 1, int64_t{200003}}) {
    for (const int64_t cap : {int64_t{1}, int64_t{3}, kMaxGridY, kMaxBlocks}) {
      const int64_t blocks = blocks_for(items, 1, cap);
      REQUIRE(blocks >= 1 && blocks <= cap && blocks <= items, "items " << items << " cap " << cap);
      std::vector<int> seen(items, 0);
      for (int64_t b = 0; b < blocks; ++b)
        for (int64_t i = b; i < items; i += blocks) ++seen[i];
      for (int64_t i = 0; i < items; ++i)
        REQUIRE(seen[i] == 1, "item " << i << " of " << items << " seen " << seen[i] << " times");
    }
  }
  REQUIRE(blocks_for(0, 256) == 1, "an empty launch still needs one block");
  REQUIRE(blocks_for(int64_t{1} << 40, 256) == kMaxBlocks, "1-D grids are capped");

  // Chunks of 256 positions partition a map past grid.z's old limit (65,535 chunks).
  const int64_t S = 65535 * 256 + 1000, chunks = ceil_div(S, 256);
  REQUIRE(chunks > kMaxGridY, "the map must need more chunks than grid.z had");
  int64_t end = 0;
  for (int64_t k = 0; k < chunks; ++k) {
    const auto r = chunk_range(k, 256, S);
    REQUIRE(r.begin == end && r.end > r.begin && r.end - r.begin <= 256, "chunk " << k);
    end = r.end;
  }
  REQUIRE(end == S, "chunks end at " << end << ", not " << S);

  // (sample, chunk) items, sample-major, for batches past grid.y's old limit and item counts
  // past 2^32: split_item inverts item = sample * chunks + chunk.
  const int64_t N = 70000;
  for (const int64_t per : {int64_t{1}, int64_t{13}, chunks}) {
    for (const int64_t item : {int64_t{0}, per - 1, per, N * per - 1, (int64_t{1} << 32) + 5}) {
      const auto w = split_item(item, per);
      REQUIRE(w.sample * per + w.chunk == item && w.chunk >= 0 && w.chunk < per,
              "item " << item << " chunks " << per);
    }
  }
  const auto last = split_item(N * chunks - 1, chunks);
  REQUIRE(last.sample == N - 1 && last.chunk == chunks - 1, "last item of the batch");

  // Lanes per (n, c) row: a power of two up to a warp below 256 positions, a block from 256.
  const std::vector<std::pair<int64_t, int>> lanes = {{1, 1}, {2, 2}, {3, 4}, {16, 16}, {17, 32},
                                                      {49, 32}, {255, 32}, {256, 256}, {3136, 256}};
  for (const auto& [s, want] : lanes)
    REQUIRE(lanes_per_row(s) == want, "S = " << s << ": " << lanes_per_row(s) << " lanes");
}

void maskbank_load(const Args& args) {
  const auto bank = nad::MaskBank::load(args[0] + "/bank.safetensors");
  const auto expected = nad::read_safetensors(args[0] + "/bank_expected.safetensors");
  REQUIRE(bank.model_id() == "cpp_test_net", bank.model_id());
  REQUIRE((bank.gate_points() == std::vector<std::string>{"features.0", "features.3", "classifier.1"}),
        "gate points");
  REQUIRE((bank.channels() == std::vector<int64_t>{4, 6, 3}), "channels");
  REQUIRE((bank.tasks() == std::vector<std::string>{"cat", "dog", "car, red", "ship"}), "tasks");
  REQUIRE((bank.task_classes() == std::vector<std::vector<int64_t>>{{0}, {1}, {2, 3}, {4}}),
        "task classes");
  REQUIRE(bank.epoch() == 7, bank.epoch());
  REQUIRE(bank.verified(), "the bank's checksums were not verified");
  REQUIRE(bank.config_json().find("caf\\u00e9") != std::string::npos, bank.config_json());
  REQUIRE(bank.logits().size() == 3 && bank.logits()[1].sizes() == at::IntArrayRef({4, 6}),
        "logits shapes");
  REQUIRE(bank.logits()[1].scalar_type() == at::kFloat, "logits dtype");
  const auto binary = bank.binary();
  REQUIRE(binary.scalar_type() == at::kBool, binary.scalar_type());
  REQUIRE(at::equal(binary, expected.tensor("binary")), "binary() differs from Python's");
  const auto sizes = expected.tensor("layer_sizes");
  REQUIRE(bank.layer_sizes() == std::vector<int64_t>(sizes.data_ptr<int64_t>(),
                                                   sizes.data_ptr<int64_t>() + sizes.numel()),
        "layer sizes");
}

void maskbank_corrupt_files_refused(const Args& args) {
  const auto load = [&](const std::string& name) {
    return [path = args[0] + "/bad_" + name + ".safetensors"] { nad::MaskBank::load(path); };
  };
  expect_error(load("truncated"), {"bad_truncated", "truncated"}, "truncated data");
  expect_error(load("tiny"), {"bad_tiny", "truncated"}, "5-byte file");
  expect_error(load("bad_header_length"), {"bad header length"}, "huge header length");
  expect_error(load("bad_json"), {"bad JSON", "expected ':'"}, "malformed JSON");
  expect_error(load("unknown_dtype"), {"logits.001", "unknown dtype \"F7\""}, "unknown dtype");
  expect_error(load("offsets_out_of_range"), {"logits.002", "out of range"}, "offsets");
  expect_error(load("wrong_format"), {"unsupported mask bank format", "maskbank/99"}, "format");
  expect_error(load("channels_mismatch"), {"logits.002", "shape (4, 5)"}, "channels");
  expect_error(load("flipped_bytes"), {"bad_flipped_bytes", "\"logits.001\"", "fails its CRC-32 check"},
               "flipped bytes");
  expect_error(load("checksum_missing"), {"\"logits.002\"", "has no checksum"}, "checksum missing");
  expect_error(load("missing"), {"cannot open"}, "missing file");
}

// CRC-32 as zlib computes it (its check value), and a bank written before checksums existed.
void maskbank_checksums(const Args& args) {
  REQUIRE(nad::crc32("123456789", 9) == 0xCBF43926u, std::hex << nad::crc32("123456789", 9));
  REQUIRE(nad::crc32("6789", 4, nad::crc32("12345", 5)) == 0xCBF43926u, "crc32 continuation");
  const std::string odd = "12345678901234567";  // the 8-byte steps and the byte-wise tail
  REQUIRE(nad::crc32(odd.data(), odd.size()) == 0x3FA43360u, std::hex << nad::crc32(odd.data(), odd.size()));
  const auto old = nad::MaskBank::load(args[0] + "/old_bank.safetensors");
  REQUIRE(!old.verified(), "a bank without checksums claims to be verified");
  const auto bank = nad::MaskBank::load(args[0] + "/bank.safetensors");
  for (size_t l = 0; l < bank.logits().size(); ++l)
    REQUIRE(at::equal(old.logits()[l], bank.logits()[l]), "gate point " << l);
}

void maskbank_check_matches(const Args& args) {
  const auto bank = nad::MaskBank::load(args[0] + "/bank.safetensors");
  bank.check_matches({"features.0", "features.3", "classifier.1"}, {4, 6, 3});  // no throw
  expect_error([&] { bank.check_matches({"features.0", "features.3"}, {4, 6}); },
               {"3 gate points", "the model 2"}, "gate point count");
  expect_error([&] { bank.check_matches({"features.0", "features.4", "classifier.1"}, {4, 6, 3}); },
               {"gate point 1", "\"features.3\" in the bank", "\"features.4\" in the model"},
               "gate point name");
  expect_error([&] { bank.check_matches({"features.0", "features.3", "classifier.1"}, {4, 6, 10}); },
               {"gate point 2", "3 channels in the bank but 10"}, "channel count");
}

void mask_overlap_vs_numpy(const Args& args) {
  const auto fx = nad::read_safetensors(args[0] + "/bank_expected.safetensors");
  const auto& a = fx.tensor("overlap.a");
  const auto& b = fx.tensor("overlap.b");
  const auto s = fx.tensor("overlap.layer_sizes");
  const std::vector<int64_t> sizes(s.data_ptr<int64_t>(), s.data_ptr<int64_t>() + s.numel());
  for (const std::string metric : {"iou", "iomin", "intersection"})
    for (const bool per_layer : {false, true}) {
      const std::string key = "overlap." + metric + (per_layer ? ".per_layer" : ".all");
      check_close(nad::mask_overlap(a, b, sizes, metric, per_layer), fx.tensor(key), key);
    }
}

// A gated model exported by nad_ext.export (TorchScript, nad::task_gate calls in the graph).
void torchscript_gated_model(const Args& args) {
  const auto fx = nad::read_safetensors(args[0] + "/gated_expected.safetensors");
  const auto& x = fx.tensor("x");
  auto all = torch::jit::load(args[0] + "/gated_all.pt");
  auto task1 = torch::jit::load(args[0] + "/gated_task1.pt");
  torch::NoGradGuard no_grad;
  check_close(all.forward({x, fx.tensor("task_ids")}).toTensor(), fx.tensor("y_all"),
              "export_gated forward(x, task_ids)");
  check_close(task1.forward({x}).toTensor(), fx.tensor("y_task1"), "export_task forward(x)");
}

// Reads nad_similarity's CSV: the header's task names and the values.
std::pair<std::vector<std::string>, std::vector<std::vector<double>>> read_csv(const std::string& path) {
  std::ifstream in(path);
  REQUIRE(in, "cannot open " << path);
  std::string line;
  std::getline(in, line);
  std::vector<std::string> header;
  std::vector<std::vector<double>> rows;
  // The only quoted name in the fixture is "car, red": split on commas outside quotes.
  auto split = [](const std::string& l) {
    std::vector<std::string> out(1);
    bool quoted = false;
    for (char c : l) {
      if (c == '"') quoted = !quoted;
      else if (c == ',' && !quoted) out.emplace_back();
      else out.back() += c;
    }
    return out;
  };
  header = split(line);
  while (std::getline(in, line)) {
    auto fields = split(line);
    std::vector<double> values;
    for (size_t i = 1; i < fields.size(); ++i) values.push_back(std::stod(fields[i]));
    rows.push_back(values);
  }
  return {header, rows};
}

void similarity_program_vs_python(const Args& args) {
  REQUIRE(args.size() == 2, "usage: similarity_program <fixtures> <nad_similarity>");
  const auto fx = nad::read_safetensors(args[0] + "/bank_expected.safetensors");
  for (const std::string metric : {"iou", "iomin"}) {
    const std::string out = args[0] + "/similarity_" + metric + ".csv";
    const std::string cmd = "\"" + args[1] + "\" \"" + args[0] + "/bank.safetensors\" --metric " +
                            metric + " --out \"" + out + "\"";
    REQUIRE(std::system(cmd.c_str()) == 0, "failed: " << cmd);
    const auto [header, rows] = read_csv(out);
    REQUIRE((header == std::vector<std::string>{"task", "cat", "dog", "car, red", "ship"}),
          "CSV header");
    const auto& expected = fx.tensor("similarity_" + metric);
    REQUIRE(static_cast<int64_t>(rows.size()) == expected.size(0), "CSV rows");
    at::Tensor actual = at::empty(expected.sizes(), at::kDouble);
    for (size_t i = 0; i < rows.size(); ++i) {
      REQUIRE(static_cast<int64_t>(rows[i].size()) == expected.size(1), "CSV row " << i);
      for (size_t j = 0; j < rows[i].size(); ++j) actual[i][j] = rows[i][j];
    }
    check_close(actual, expected, "similarity " + metric, 2e-6);  // CSV has 6 decimals
  }
  // Usage errors exit with 2 and do not touch the bank.
  REQUIRE(std::system(("\"" + args[1] + "\" --metric dice x 2>/dev/null").c_str()) != 0,
        "bad metric accepted");
}

const std::map<std::string, void (*)(const Args&)> kCases = {
    {"task_gate_forward_backward", task_gate_forward_backward},
    {"launch_geometry", launch_geometry},
    {"maskbank_load", maskbank_load},
    {"maskbank_corrupt_files_refused", maskbank_corrupt_files_refused},
    {"maskbank_check_matches", maskbank_check_matches},
    {"maskbank_checksums", maskbank_checksums},
    {"mask_overlap_vs_numpy", mask_overlap_vs_numpy},
    {"similarity_program_vs_python", similarity_program_vs_python},
    {"torchscript_gated_model", torchscript_gated_model},
};

}  // namespace

int main(int argc, char** argv) {
  const auto it = argc >= 3 ? kCases.find(argv[1]) : kCases.end();
  if (it == kCases.end()) {
    std::cerr << "usage: nad_tests <case> <fixtures folder> [args]; cases:";
    for (const auto& [name, fn] : kCases) std::cerr << " " << name;
    std::cerr << "\n";
    return 2;
  }
  const std::string fixtures = argv[2];
  if (!std::ifstream(fixtures + "/bank_expected.safetensors")) {
    std::cerr << "no fixtures in " << fixtures << ": run python cpp_tests/make_fixtures.py "
              << fixtures << " first (scripts/test_cpp.sh does)\n";
    return 1;
  }
  try {
    it->second(Args(argv + 2, argv + argc));
  } catch (const Failure& e) {
    std::cerr << "FAIL " << it->first << ": " << e.what() << "\n";
    return 1;
  } catch (const c10::Error& e) {
    std::cerr << "FAIL " << it->first << ": " << e.what_without_backtrace() << "\n";
    return 1;
  }
  std::cout << "ok " << it->first << "\n";
  return 0;
}
