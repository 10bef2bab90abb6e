// C++ tests of nad-ext's LibTorch library, one ctest per case:
//   nad_tests <case> <fixtures folder> [nad_similarity path]
// The fixtures (inputs and the values the Python side expects) come from make_fixtures.py.
// A failed check prints what differs and exits nonzero; a case that does not apply to this build
// or machine (a GPU case without a GPU) exits 77, which ctest reports as skipped.
#include <sys/resource.h>

#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <torch/autograd.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/cuda.h>

#include <nad/maskbank.h>
#include <nad/nad.h>
#include <nad/pathstore.h>
#include <nad/safetensors.h>
#include <nad/version.h>

#include "../csrc/maskbank/json.h"  // compiled into this test: libnad does not export it
#include "../csrc/ops/launch.h"
#include "require.h"

namespace {

using nad_test::Failure;

// Thrown by a case that does not apply here; main() exits 77 (ctest: skipped).
struct Skip : std::runtime_error {
  using std::runtime_error::runtime_error;
};

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
  // Written without the optional keys: Python's defaults.
  REQUIRE((bank.channel_axes() == std::vector<int64_t>{1, 1, 1}), "channel axes");
  REQUIRE((bank.units() == std::vector<std::string>{"channels", "channels", "channels"}), "units");
  REQUIRE((bank.records() == std::vector<std::string>{"output", "output", "output"}), "records");
  REQUIRE(!bank.calibration_json().has_value(), "calibration of a bank without one");
  REQUIRE(bank.path() == args[0] + "/bank.safetensors", bank.path());
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
  expect_error(load("nonfinite"), {"bad_nonfinite", "\"logits.001\"", "1 NaN or infinite values", "must be finite"},
               "a NaN logit with matching checksums");
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

std::vector<int64_t> ints(const at::Tensor& t) {
  const auto c = t.to(at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

// nad::masked_conv2d, masked_conv2d_forward and masked_conv2d_backward against F.conv2d + bias +
// ReLU + gate (float64 autograd) in Python: a strided, padded, dilated case with bias and ReLU,
// and a grouped one without either.
void masked_conv2d_vs_python(const Args& args) {
  const auto fx = nad::read_safetensors(args[0] + "/fused.safetensors");
  for (const std::string p : {"mc", "mcg"}) {
    const auto conv = ints(fx.tensor(p + ".conv"));  // stride (2), padding (2), dilation (2), groups, relu
    const std::vector<int64_t> stride(conv.begin(), conv.begin() + 2), padding(conv.begin() + 2, conv.begin() + 4),
        dilation(conv.begin() + 4, conv.begin() + 6);
    const int64_t groups = conv[6];
    const bool relu = conv[7] != 0;
    const auto& w = fx.tensor(p + ".weight");
    const std::optional<at::Tensor> bias =
        fx.tensors.count(p + ".bias") ? std::optional<at::Tensor>(fx.tensor(p + ".bias")) : std::nullopt;
    const auto& ids = fx.tensor(p + ".task_ids");
    const auto& grad_y = fx.tensor(p + ".grad_y");
    auto x = fx.tensor(p + ".x").clone().requires_grad_(true);
    auto logits = fx.tensor(p + ".logits").clone().requires_grad_(true);
    const auto y = nad::masked_conv2d(x, w, bias, logits, ids, stride, padding, dilation, groups, relu);
    check_close(y, fx.tensor(p + ".y"), p + " forward", 1e-4, 1e-4);
    const auto grads = torch::autograd::grad({y}, {x, logits}, {grad_y});
    check_close(grads[0], fx.tensor(p + ".grad_x"), p + " grad_x (autograd)", 1e-4, 1e-4);
    check_close(grads[1], fx.tensor(p + ".grad_logits"), p + " grad_logits (autograd)", 1e-4, 1e-4);

    const auto [y2, act] = nad::masked_conv2d_forward(x.detach(), w, bias, logits.detach(), ids, stride, padding,
                                                      dilation, groups, relu);
    check_close(y2, fx.tensor(p + ".y"), p + " masked_conv2d_forward y", 1e-4, 1e-4);
    check_close(act, fx.tensor(p + ".act"), p + " masked_conv2d_forward act", 1e-4, 1e-4);
    const auto [gx, gl] = nad::masked_conv2d_backward(grad_y, x.detach(), w, act, logits.detach(), ids, stride,
                                                      padding, dilation, groups, relu, true);
    check_close(gx, fx.tensor(p + ".grad_x"), p + " masked_conv2d_backward grad_x", 1e-4, 1e-4);
    check_close(gl, fx.tensor(p + ".grad_logits"), p + " masked_conv2d_backward grad_logits", 1e-4, 1e-4);
    const auto [gx0, gl0] = nad::masked_conv2d_backward(grad_y, x.detach(), w, act, logits.detach(), ids, stride,
                                                        padding, dilation, groups, relu, false);
    REQUIRE(gx0.numel() == 0, p << ": grad_x computed although x_grad is false");
    check_close(gl0, fx.tensor(p + ".grad_logits"), p + " masked_conv2d_backward(x_grad=false)", 1e-4, 1e-4);

    // channels_last in, channels_last out (the layout rule), same values.
    const auto xl = x.detach().contiguous(at::MemoryFormat::ChannelsLast);
    const auto yl = nad::masked_conv2d(xl, w, bias, logits.detach(), ids, stride, padding, dilation, groups, relu);
    REQUIRE(yl.is_contiguous(at::MemoryFormat::ChannelsLast), p << ": channels_last input, output strides "
                                                                   << yl.strides());
    check_close(yl, fx.tensor(p + ".y"), p + " channels_last forward", 1e-4, 1e-4);
  }
  const auto& x = fx.tensor("mc.x");
  const auto& w = fx.tensor("mc.weight");
  const auto& logits = fx.tensor("mc.logits");
  const auto& ids = fx.tensor("mc.task_ids");
  const std::vector<int64_t> one{1, 1}, zero{0, 0};
  expect_error([&] { nad::masked_conv2d(x, w.clone().requires_grad_(true), std::nullopt, logits, ids, one, zero, one, 1, true); },
               {"masked_conv2d", "weight requires grad", "frozen"}, "trainable weight");
  expect_error([&] { nad::masked_conv2d(x, w, std::nullopt, logits.narrow(1, 0, 4), ids, one, zero, one, 1, true); },
               {"masked_conv2d", "logits must have shape (T, 5)"}, "logits of another width");
  expect_error([&] { nad::masked_conv2d(x, w, std::nullopt, logits, ids + 3, one, zero, one, 1, true); },
               {"masked_conv2d", "task_ids must lie in [0, 3)"}, "ids out of range");
  expect_error([&] { nad::masked_conv2d(x, w, std::nullopt, logits, ids, one, zero, one, 2, true); },
               {"masked_conv2d", "groups (2)"}, "groups not dividing the channels");
}

// nad::gate_mse and gate_mse_backward against the per-task mean in Python (float64 autograd),
// with a task whose only sample is not counted and a task without samples (both 0).
void gate_mse_vs_python(const Args& args) {
  const auto fx = nad::read_safetensors(args[0] + "/fused.safetensors");
  auto masked = fx.tensor("mse.masked").clone().requires_grad_(true);
  const auto& original = fx.tensor("mse.original");
  const auto& counts = fx.tensor("mse.counts");
  const auto& ids = fx.tensor("mse.task_ids");
  const int64_t T = ints(fx.tensor("mse.num_tasks"))[0];
  const auto out = nad::gate_mse(masked, original, counts, ids, T);
  REQUIRE(out.scalar_type() == at::kFloat && out.sizes() == at::IntArrayRef({T}), "gate_mse output " << out.sizes());
  check_close(out, fx.tensor("mse.out"), "gate_mse forward");
  const auto& grad = fx.tensor("mse.grad");
  const auto g = torch::autograd::grad({out}, {masked}, {grad});
  check_close(g[0], fx.tensor("mse.grad_masked"), "gate_mse grad_masked (autograd)");
  check_close(nad::gate_mse_backward(grad, masked.detach(), original, counts, ids, T), fx.tensor("mse.grad_masked"),
              "gate_mse_backward");
  // Channels-innermost (tokens / channels_last) inputs give the same values.
  const auto ml = masked.detach().contiguous(at::MemoryFormat::ChannelsLast);
  const auto ol = original.contiguous(at::MemoryFormat::ChannelsLast);
  check_close(nad::gate_mse(ml, ol, counts, ids, T), fx.tensor("mse.out"), "gate_mse channels_last");
  expect_error([&] { nad::gate_mse(masked, original.clone().requires_grad_(true), counts, ids, T); },
               {"gate_mse", "original requires grad"}, "original requiring grad");
  expect_error([&] { nad::gate_mse(masked.detach(), original, counts, ids, 3); },
               {"gate_mse", "task_ids must lie in [0, 3)"}, "ids out of range");
  expect_error([&] { nad::gate_mse(masked.detach(), original, counts.to(at::kInt), ids, T); },
               {"gate_mse", "counts must be a bool tensor"}, "int counts");
}

// nad::normalized_gradient_step_ against m[t] -= lr g[t] / ||g[t]|| in Python: in place, a task
// listed twice updated once, a zero gradient row and unlisted tasks unchanged, version counters
// bumped.
void normalized_step_vs_python(const Args& args) {
  const auto fx = nad::read_safetensors(args[0] + "/fused.safetensors");
  std::vector<at::Tensor> logits = {fx.tensor("step.logits.0").clone(), fx.tensor("step.logits.1").clone()};
  const std::vector<at::Tensor> grads = {fx.tensor("step.grads.0"), fx.tensor("step.grads.1")};
  const auto& tasks = fx.tensor("step.tasks");
  const double lr = fx.tensor("step.lr").item<double>();
  const auto* data = logits[0].data_ptr();
  const auto version = logits[0]._version();
  nad::normalized_gradient_step_(logits, grads, tasks, lr);
  REQUIRE(logits[0].data_ptr() == data, "the step did not update in place");
  REQUIRE(logits[0]._version() > version, "the step did not bump the version counter");
  check_close(logits[0], fx.tensor("step.expected.0"), "step gate point 0");
  check_close(logits[1], fx.tensor("step.expected.1"), "step gate point 1");
  expect_error([&] { nad::normalized_gradient_step_(logits, grads, tasks + 3, lr); },
               {"normalized_gradient_step_", "tasks must lie in [0, 4)"}, "tasks out of range");
  expect_error([&] { nad::normalized_gradient_step_(logits, {grads[0]}, tasks, lr); },
               {"normalized_gradient_step_", "one entry per gate point"}, "grads count");
}

// nad::library_info() names this libnad (the only nad library of this process), and a build
// without CUDA kernels refuses the CUDA backend with a message that says so (the kernels are
// reached with CPU tensors through the CUDA dispatch key, as the simulator does; skipped where
// the build has CUDA kernels).
void library_info_and_cuda_errors(const Args&) {
  const auto info = nad::library_info();
  std::cout << "  registered by " << info.path << " (nad-ext " << info.version << ", torch " << info.torch_version
            << ", CUDA kernels " << info.cuda_kernels << ")\n";
  REQUIRE(info.version == NAD_VERSION_STRING && std::string(nad::version()) == NAD_VERSION_STRING,
          "versions: registered " << info.version << ", library " << nad::version());
  REQUIRE(info.path.find("libnad.so") != std::string::npos, "registered by " << info.path);
  REQUIRE(info.torch_version == TORCH_VERSION, "compiled against torch " << info.torch_version);
  REQUIRE(nad::has_cuda_kernels() == info.cuda_kernels, "has_cuda_kernels()");
  expect_error([] { nad::detail::check_library("9.9.9"); }, {"headers are version 9.9.9", "is version 0."},
               "headers of another version than the library");
  // The opt-in host check: off by default (NAD_CHECK_TASK_IDS unset), process-wide setting.
  REQUIRE(!nad::check_task_ids_enabled(), "the host check of CUDA task ids is on by default");
  REQUIRE(!nad::set_check_task_ids(true) && nad::check_task_ids_enabled(), "set_check_task_ids(true)");
  REQUIRE(nad::set_check_task_ids(false) && !nad::check_task_ids_enabled(), "set_check_task_ids(false)");
  if (info.cuda_kernels) throw Skip("this build has CUDA kernels: the CPU-only error is not reachable");
  const auto cuda = c10::DispatchKeySet(c10::DispatchKey::CUDA);
  const auto x = at::randn({2, 3, 4}), logits = at::randn({2, 3});
  const auto ids = at::tensor({0, 1}, at::kLong);
  const auto gate = c10::Dispatcher::singleton().findSchemaOrThrow("nad::task_gate", "")
                        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  expect_error([&] { gate.redispatch(cuda, x, logits, ids); },
               {"nad::task_gate", "built without CUDA kernels", "libnad.so", "NAD_WITH_CUDA=ON"}, "task_gate on CUDA");
  const auto step = c10::Dispatcher::singleton().findSchemaOrThrow("nad::normalized_gradient_step_", "")
                        .typed<void(at::TensorList, at::TensorList, const at::Tensor&, double)>();
  expect_error([&] { step.redispatch(cuda, {logits}, {logits}, ids, 0.1); },
               {"nad::normalized_gradient_step_", "built without CUDA kernels"}, "normalized_gradient_step_ on CUDA");
}

// On a GPU: every operator on CUDA gives the CPU's results, and bad task ids are refused on the
// host, naming the operator, when the opt-in check is on (instead of a device-side assert, which
// would leave the CUDA context unusable for the cases after it).
void cuda_matches_cpu(const Args& args) {
  if (!nad::has_cuda_kernels() || !torch::cuda::is_available()) throw Skip("needs a GPU and the CUDA kernels");
  const at::Device gpu(at::kCUDA);
  const auto fx = nad::read_safetensors(args[0] + "/fused.safetensors");
  const auto tg = nad::read_safetensors(args[0] + "/task_gate.safetensors");
  const auto cpu_y = nad::task_gate(tg.tensor("conv.x"), tg.tensor("conv.logits"), tg.tensor("conv.task_ids"));
  const auto gpu_y = nad::task_gate(tg.tensor("conv.x").to(gpu), tg.tensor("conv.logits").to(gpu),
                                    tg.tensor("conv.task_ids").to(gpu));
  check_close(gpu_y, cpu_y, "task_gate on CUDA");
  const std::vector<int64_t> s{2, 1}, p{1, 0}, d{1, 2};
  const auto y = nad::masked_conv2d(fx.tensor("mc.x").to(gpu), fx.tensor("mc.weight").to(gpu), fx.tensor("mc.bias").to(gpu),
                                    fx.tensor("mc.logits").to(gpu), fx.tensor("mc.task_ids").to(gpu), s, p, d, 1, true);
  check_close(y, fx.tensor("mc.y"), "masked_conv2d on CUDA", 1e-3, 1e-3);  // TF32 may be on for convolutions
  const int64_t T = ints(fx.tensor("mse.num_tasks"))[0];
  check_close(nad::gate_mse(fx.tensor("mse.masked").to(gpu), fx.tensor("mse.original").to(gpu),
                            fx.tensor("mse.counts").to(gpu), fx.tensor("mse.task_ids").to(gpu), T),
              fx.tensor("mse.out"), "gate_mse on CUDA");
  std::vector<at::Tensor> logits = {fx.tensor("step.logits.0").to(gpu), fx.tensor("step.logits.1").to(gpu)};
  nad::normalized_gradient_step_(logits, {fx.tensor("step.grads.0").to(gpu), fx.tensor("step.grads.1").to(gpu)},
                                 fx.tensor("step.tasks").to(gpu), fx.tensor("step.lr").item<double>());
  check_close(logits[1], fx.tensor("step.expected.1"), "normalized_gradient_step_ on CUDA");
  const auto bank = nad::read_safetensors(args[0] + "/bank_expected.safetensors");
  const auto sizes = ints(bank.tensor("overlap.layer_sizes"));
  check_close(nad::mask_overlap(bank.tensor("overlap.a").to(gpu), bank.tensor("overlap.b").to(gpu), sizes, "iou", true),
              bank.tensor("overlap.iou.per_layer"), "mask_overlap on CUDA");

  const bool before = nad::set_check_task_ids(true);
  const auto x = tg.tensor("conv.x").to(gpu), l = tg.tensor("conv.logits").to(gpu);
  const auto bad = (tg.tensor("conv.task_ids") + 3).to(gpu);
  expect_error([&] { nad::task_gate(x, l, bad); }, {"task_gate", "task_ids must lie in [0, 3)", "checked on the host"},
               "CUDA ids out of range, host check on");
  expect_error([&] { nad::task_gate(x, l, bad - 6); }, {"task_gate", "must lie in [0, 3)"}, "negative CUDA ids");
  nad::set_check_task_ids(before);
  // The context is still usable: no device-side assert fired.
  check_close(nad::task_gate(x, l, tg.tensor("conv.task_ids").to(gpu)), cpu_y, "task_gate after the refused calls");
  torch::cuda::synchronize();
}

// Banks written by Python's MaskBank (make_fixtures.py) read here with every metadata field, then
// written back from their parts (MaskBank's constructor and save) as <name>.cpp.safetensors,
// which check_banks.py reads with Python's MaskBank (the next ctest case). Also a bank made from
// scratch here (cpp_built.safetensors).
void maskbank_python_written(const Args& args) {
  std::ifstream in(args[0] + "/banks_expected.json");
  REQUIRE(in, "no banks_expected.json: run make_fixtures.py with --library");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto expected = nad::json::parse(text);
  REQUIRE(expected.members.size() == 2, "banks in banks_expected.json: " << expected.members.size());
  for (const auto& [name, want] : expected.members) {
    const auto bank = nad::MaskBank::load(args[0] + "/" + name + ".safetensors");
    REQUIRE(bank.verified(), name << ": checksums not verified");
    REQUIRE(bank.model_id() == want.find("model_id")->text, name << ": model_id " << bank.model_id());
    const auto& points = want.find("gate_points")->items;
    REQUIRE(bank.points().size() == points.size(), name << ": " << bank.points().size() << " gate points");
    for (size_t l = 0; l < points.size(); ++l) {
      const auto& p = bank.points()[l];
      const auto* record = points[l].find("record");
      const nad::GatePoint w{points[l].find("name")->text, points[l].find("channels")->as_int("channels"),
                             points[l].find("channel_axis")->as_int("channel_axis"), points[l].find("units")->text,
                             record ? record->text : "output"};
      REQUIRE(p == w, name << ": gate point " << l << " is " << p.name << " " << p.channels << " axis "
                           << p.channel_axis << " " << p.units << " " << p.record << ", Python wrote " << w.name
                           << " " << w.channels << " axis " << w.channel_axis << " " << w.units << " " << w.record);
      REQUIRE(bank.channel_axes()[l] == w.channel_axis && bank.units()[l] == w.units && bank.records()[l] == w.record,
              name << ": per-field accessors of gate point " << l);
    }
    const auto& tasks = want.find("tasks")->items;
    REQUIRE(bank.task_list().size() == tasks.size(), name << ": tasks");
    for (size_t t = 0; t < tasks.size(); ++t) {
      std::vector<int64_t> classes;
      for (const auto& c : tasks[t].find("classes")->items) classes.push_back(c.as_int("class"));
      REQUIRE(bank.tasks()[t] == tasks[t].find("name")->text && bank.task_classes()[t] == classes,
              name << ": task " << t << " is \"" << bank.tasks()[t] << "\"");
    }
    REQUIRE(bank.config_json() == want.find("config")->text, name << ": config " << bank.config_json());
    REQUIRE(bank.epoch() == want.find("epoch")->as_int("epoch"), name << ": epoch " << bank.epoch());
    const auto* calibration = want.find("calibration");
    if (calibration->kind == nad::json::Value::Kind::Null)
      REQUIRE(!bank.calibration_json().has_value(), name << ": calibration where Python wrote none");
    else
      REQUIRE(bank.calibration_json() == calibration->text, name << ": calibration "
                                                                  << bank.calibration_json().value_or("none"));
    const auto* fidelity = want.find("fidelity");
    if (fidelity == nullptr || fidelity->kind == nad::json::Value::Kind::Null)
      REQUIRE(!bank.fidelity_json().has_value(), name << ": fidelity where Python wrote none");
    else
      REQUIRE(bank.fidelity_json() == fidelity->text, name << ": fidelity " << bank.fidelity_json().value_or("none"));
    const auto logits = nad::read_safetensors(args[0] + "/" + name + "_logits.safetensors");
    for (size_t l = 0; l < bank.logits().size(); ++l)
      REQUIRE(at::equal(bank.logits()[l], logits.tensor(logits.names[l])), name << ": logits of gate point " << l);
    nad::MaskBank(bank.model_id(), bank.points(), bank.task_list(), bank.logits(), bank.config_json(), bank.epoch(),
                  bank.calibration_json(), bank.fidelity_json())
        .save(args[0] + "/" + name + ".cpp.safetensors");
  }
  // Made here: non-ASCII names, a head gate point recording relu, a calibration.
  const nad::MaskBank built(
      "cpp_built", {{"blocks.0", 3, 2, "channels", "output"}, {"blocks.1.attn", 2, 2, "heads", "relu"}},
      {{"\xc3\xa9t\xc3\xa9 \xe2\x82\xac", {0, 4}}, {"plain", {1}}},
      {at::arange(6, at::kFloat).reshape({2, 3}) - 2, at::tensor({1.5f, -1.f, -0.5f, 2.f}).reshape({2, 2})},
      "{\"beta\": 2.5, \"epochs\": 4}", 4, "{\"beta\": 2.5, \"converged\": false}");
  built.save(args[0] + "/cpp_built.safetensors");
  const auto reread = nad::MaskBank::load(args[0] + "/cpp_built.safetensors");
  REQUIRE(reread.verified() && reread.points() == built.points() && reread.task_list() == built.task_list() &&
              reread.config_json() == built.config_json() && reread.calibration_json() == built.calibration_json() &&
              reread.epoch() == 4 && at::equal(reread.binary(), built.binary()),
          "cpp_built.safetensors does not read back as written");
}

std::vector<std::string> temporary_files(const std::string& folder) {
  std::vector<std::string> out;
  for (const auto& entry : std::filesystem::directory_iterator(folder)) {
    const auto name = entry.path().filename().string();
    if (name.size() > 4 && name[0] == '.' && name.compare(name.size() - 4, 4, ".tmp") == 0) out.push_back(name);
  }
  return out;
}

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// MaskBank::save is atomic: a write that fails (the file size limit, a folder in the way) leaves
// the old file byte for byte and no temporary file; the constructor refuses what Python's refuses.
void maskbank_save_atomic(const Args& args) {
  const std::string folder = args[0] + "/atomic";
  std::filesystem::remove_all(folder);
  const auto bank = nad::MaskBank::load(args[0] + "/bank.safetensors");
  const std::string path = folder + "/sub/bank.safetensors";  // missing folders are created
  bank.save(path);
  const std::string before = file_bytes(path);
  REQUIRE(at::equal(nad::MaskBank::load(path).binary(), bank.binary()), "saved bank reads back");
  const auto bigger = nad::MaskBank(bank.model_id(), bank.points(), bank.task_list(),
                                    {bank.logits()[0], bank.logits()[1], bank.logits()[2]}, bank.config_json(), 9);
  // A file size limit below the bank's size: the write fails half way (EFBIG).
  std::signal(SIGXFSZ, SIG_IGN);
  rlimit old{};
  getrlimit(RLIMIT_FSIZE, &old);
  rlimit small = old;
  small.rlim_cur = 200;
  REQUIRE(setrlimit(RLIMIT_FSIZE, &small) == 0, "setrlimit");
  std::string message;
  try {
    bigger.save(path);
  } catch (const c10::Error& e) {
    message = e.what_without_backtrace();
  }
  setrlimit(RLIMIT_FSIZE, &old);
  REQUIRE(message.find("cannot write " + path) != std::string::npos && message.find("File too large") != std::string::npos,
          "failed write: " << (message.empty() ? "no error" : message));
  std::cout << "  refused as expected: " << message << "\n";
  REQUIRE(file_bytes(path) == before, "a failed save changed the old file");
  REQUIRE(temporary_files(folder + "/sub").empty(), "a failed save left " << temporary_files(folder + "/sub")[0]);
  bigger.save(path);  // and a save that succeeds replaces it
  REQUIRE(nad::MaskBank::load(path).epoch() == 9, "the second save did not replace the bank");
  std::filesystem::create_directories(folder + "/dir.safetensors/x");
  expect_error([&] { bank.save(folder + "/dir.safetensors"); }, {"cannot write", "dir.safetensors"}, "a folder in the way");
  REQUIRE(temporary_files(folder).empty(), "a failed rename left a temporary file");

  const auto logits = bank.logits();
  expect_error([&] { nad::MaskBank("m", bank.points(), bank.task_list(), {logits[0], logits[1]}); },
               {"MaskBank", "2 logits tensors for 3 gate points"}, "logits count");
  expect_error([&] { nad::MaskBank("m", {{"a", 4, 1, "filters"}}, bank.task_list(), {logits[0]}); },
               {"units \"filters\""}, "unknown units");
  expect_error([&] { nad::MaskBank("m", {{"a", 5}}, bank.task_list(), {logits[0]}); },
               {"logits of gate point \"a\" must have shape (4, 5)"}, "logits shape");
  expect_error([&] { nad::MaskBank("m", {{"a", 4}}, bank.task_list(), {logits[0]}, "[1, 2]"); },
               {"config must be a JSON object"}, "config not an object");
  expect_error([&] { nad::MaskBank("m", {{"a", 4}}, {{"bad \xff name", {0}}, {"b", {1}}, {"c", {2}}, {"d", {3}}},
                                   {logits[0]}).save(folder + "/x.safetensors"); },
               {"cannot write", "invalid UTF-8"}, "a task name that is not UTF-8");
}

// The gated model packaged by nad_ext.gates.export (torch.export + AOTInductor, CPU) runs here
// through AOTIModelPackageLoader, calling nad::task_gate through the dispatcher, at batch sizes
// other than the export's.
void pt2_gated_model(const Args& args) {
  const auto fx = nad::read_safetensors(args[0] + "/gated_expected.safetensors");
  const auto& x = fx.tensor("x");
  const auto& ids = fx.tensor("task_ids");
  torch::inductor::AOTIModelPackageLoader loader(args[0] + "/gated_all.pt2");
  c10::NoGradGuard no_grad;
  const auto out = loader.run({x, ids});
  REQUIRE(out.size() == 1, out.size() << " outputs");
  check_close(out[0], fx.tensor("y_all"), "gated_all.pt2 forward(x, task_ids)");
  const auto one = loader.run({x.narrow(0, 2, 1), ids.narrow(0, 2, 1)});
  check_close(one[0], fx.tensor("y_all").narrow(0, 2, 1), "gated_all.pt2 at batch size 1");
  const std::string cuda_package = args[0] + "/gated_cuda.pt2";
  if (std::filesystem::exists(cuda_package) && torch::cuda::is_available()) {
    torch::inductor::AOTIModelPackageLoader cuda_loader(cuda_package);
    REQUIRE(cuda_loader.get_metadata().at("AOTI_DEVICE_KEY") == "cuda", "gated_cuda.pt2 metadata");
    const auto y = cuda_loader.run({x.cuda(), ids.cuda()});
    check_close(y[0], fx.tensor("y_all"), "gated_cuda.pt2 on the GPU", 1e-3, 1e-2);  // TF32 convolutions
  } else {
    std::cout << "  no GPU: gated_cuda.pt2 not run\n";
  }
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

// A path store written by Python's PathStore (make_fixtures.py), read here: the manifest, every
// shard (not the orphan shard-00003 after them), the packed and unpacked masks, fields and
// float16 logits equal to what Python wrote; the bit order pinned; damaged copies refused.
void pathstore_python_written(const Args& args) {
  REQUIRE(std::filesystem::is_directory(args[0] + "/paths"), "no paths/: run make_fixtures.py with --library");
  const auto store = nad::PathStore::open(args[0] + "/paths");
  const auto fx = nad::read_safetensors(args[0] + "/paths_expected.safetensors");
  REQUIRE(store.model_id() == "cpp_test_paths", "model_id " << store.model_id());
  const std::vector<nad::GatePoint> points{{"conv1", 13, 1, "channels", "output"}, {"blocks.0", 8, 2, "channels", "output"},
                                           {"attn", 3, 2, "heads", "output"}, {"fc", 21, 1, "channels", "relu"}};
  REQUIRE(store.points() == points, store.points().size() << " gate points, not the 4 Python wrote");
  REQUIRE(store.channels_total() == 45 && store.mask_bytes() == 6 && store.has_logits() && store.shard_size() == 4,
          "channels " << store.channels_total() << ", mask bytes " << store.mask_bytes());
  REQUIRE((store.shard_images() == std::vector<int64_t>{4, 4, 2}) && store.num_images() == 10,
          store.num_shards() << " shards, " << store.num_images() << " images");
  REQUIRE(store.meta_json() == fx.metadata.at("meta"), "meta " << store.meta_json() << " != " << fx.metadata.at("meta"));
  REQUIRE(at::equal(store.image_indices(), fx.tensor("image_index")), "image_index " << store.image_indices());
  REQUIRE(at::equal(store.packed(), fx.tensor("packed")), "packed masks differ");
  const auto masks = store.masks();
  REQUIRE(masks.size() == 4, masks.size() << " mask tensors");
  for (size_t l = 0; l < masks.size(); ++l)
    REQUIRE(masks[l].scalar_type() == at::kBool && at::equal(masks[l], fx.tensor("masks." + std::to_string(l))),
            "masks of gate point " << l << " differ");
  std::map<std::string, std::vector<at::Tensor>> parts;
  for (int64_t i = 0; i < store.num_shards(); ++i) {
    const auto s = store.shard(i);
    for (const auto& [name, t] : std::map<std::string, at::Tensor>{{"label", s.label}, {"target", s.target},
                                                                   {"prediction", s.prediction}, {"status", s.status},
                                                                   {"logits", s.logits}})
      parts[name].push_back(t);
  }
  for (const auto& [name, ts] : parts)
    REQUIRE(at::equal(at::cat(ts), fx.tensor(name)), name << " differs from what Python wrote");
  // The bit order: channel j is bit j % 8 of byte j / 8.
  const std::vector<uint8_t> bytes{9, 1, 128, 4};
  const auto bits = nad::PathStore::unpack(at::tensor(bytes).reshape({2, 2}), 11);
  const auto want = at::zeros({2, 11}, at::kBool);
  for (const auto& [row, col] : std::vector<std::pair<int, int>>{{0, 0}, {0, 3}, {0, 8}, {1, 7}, {1, 10}})
    want.select(0, row).select(0, col).fill_(true);
  REQUIRE(at::equal(bits, want), "unpack of the hand-made example: " << bits);
  REQUIRE(at::equal(nad::PathStore::unpack(at::tensor(bytes).reshape({2, 2}), 5, 3), want.narrow(1, 3, 5)),
          "unpack from bit 3");

  const auto read = [&](const std::string& what) {
    return [&args, what] { nad::PathStore::open(args[0] + "/paths_bad_" + what).packed(); };
  };
  expect_error(read("flipped"), {"paths_bad_flipped/shard-00001.safetensors", "\"" + fx.metadata.at("flipped_tensor") + "\"",
                                 "fails its CRC-32 check"}, "flipped byte");
  expect_error(read("missing"), {"shard-00002.safetensors is missing"}, "missing shard");
  expect_error(read("format"), {"unknown path store format \"nad-ext.pathstore/2\""}, "format version");
  expect_error(read("rows"), {"shard-00001.safetensors", "\"image_index\"", "the manifest says", "(3 images"},
               "row count");
  expect_error([&] { nad::PathStore::open(args[0] + "/nowhere"); }, {"does not exist"}, "missing folder");
  expect_error([&] { nad::PathStore::open(args[0]); }, {"is not a path store"}, "folder without a manifest");
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
    {"masked_conv2d_vs_python", masked_conv2d_vs_python},
    {"gate_mse_vs_python", gate_mse_vs_python},
    {"normalized_step_vs_python", normalized_step_vs_python},
    {"library_info_and_cuda_errors", library_info_and_cuda_errors},
    {"cuda_matches_cpu", cuda_matches_cpu},
    {"maskbank_python_written", maskbank_python_written},
    {"maskbank_save_atomic", maskbank_save_atomic},
    {"pt2_gated_model", pt2_gated_model},
    {"pathstore_python_written", pathstore_python_written},
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
  } catch (const Skip& e) {
    std::cout << "skipped " << it->first << ": " << e.what() << "\n";
    return 77;
  } catch (const Failure& e) {
    std::cerr << "FAIL " << it->first << ": " << e.what() << "\n";
    return 1;
  } catch (const c10::Error& e) {
    std::cerr << "FAIL " << it->first << ": " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "FAIL " << it->first << ": " << e.what() << "\n";
    return 1;
  }
  std::cout << "ok " << it->first << "\n";
  return 0;
}
