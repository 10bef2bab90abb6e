// Every CUDA entry point of csrc/ops/cuda/, run by cudasim, beside its CPU twin on the same CPU
// tensors, over the edge-case matrix: sizes across the launch-shape thresholds, both layouts,
// every dtype the Python side sends, the default and the deterministic reductions, and two sets
// of grid caps: launch.h's own (at these sizes every block does one work item) and caps of 3
// blocks (every grid-stride loop makes several trips, as at sizes beyond a GPU's grid limits).
//   cudasim_twin forward|reversed      (the schedule of blocks and threads)
// The simulated kernels registered themselves under the CUDA dispatch key; redispatching with
// that key runs them on CPU tensors. Under torch.use_deterministic_algorithms each case also runs
// under the other schedule and must give the same bits: the deterministic path may not depend on
// the order in which blocks and threads run (the default path, with atomics, may).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "cudasim.h"
#include "ops/gate_passes.h"
#include "ops/launch.h"

namespace {

using at::Tensor;
using c10::DispatchKey;
using c10::DispatchKeySet;

const DispatchKeySet kCpu(DispatchKey::CPU), kCuda(DispatchKey::CUDA);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using TaskGateSig = Tensor(const Tensor&, const Tensor&, const Tensor&);
using TaskGateBackwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool);
using OverlapSig = Tensor(const Tensor&, const Tensor&, c10::IntArrayRef, c10::string_view, bool);
using ConvSig = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
                       c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, int64_t, bool);
using ConvForwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                  const Tensor&, const Tensor&, c10::IntArrayRef, c10::IntArrayRef,
                                                  c10::IntArrayRef, int64_t, bool);
using ConvBackwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                   const Tensor&, const Tensor&, c10::IntArrayRef, c10::IntArrayRef,
                                                   c10::IntArrayRef, int64_t, bool, bool);
using MseSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t);
using MseBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t);
using StepSig = void(at::TensorList, at::TensorList, const Tensor&, double);

// ---- bookkeeping ----

struct Tally {
  int checks = 0, failures = 0;
  double worst = 0;  // the largest error seen, as a fraction of its tolerance
};
std::map<std::string, Tally> tallies;
int total_failures = 0;

std::string sizes_of(const Tensor& t) {
  std::ostringstream s;
  s << t.sizes() << " strides " << t.strides() << " " << t.scalar_type();
  return s.str();
}

void fail(const std::string& op, const std::string& message) {
  ++tallies[op].failures;
  if (++total_failures <= 40) std::cout << "[ FAIL ] " << op << ": " << message << "\n";
}

double eps(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return std::numeric_limits<double>::epsilon();
    case at::kHalf: return 9.765625e-4;
    case at::kBFloat16: return 7.8125e-3;
    default: return std::numeric_limits<float>::epsilon();
  }
}

// |sim - cpu| <= tol elementwise (tol a tensor or a number), same shape, dtype and strides (the
// CUDA op must give the layout the CPU op and the fake give).
void check(const std::string& opname, const std::string& what, const Tensor& sim, const Tensor& cpu, const Tensor& tol) {
  auto& tally = tallies[opname];
  ++tally.checks;
  if (sim.sizes() != cpu.sizes() || sim.scalar_type() != cpu.scalar_type())
    return fail(opname, what + ": simulated " + sizes_of(sim) + ", CPU " + sizes_of(cpu));
  if (sim.numel() > 1 && sim.strides() != cpu.strides())
    return fail(opname, what + ": strides differ: simulated " + sizes_of(sim) + ", CPU " + sizes_of(cpu));
  if (sim.numel() == 0) return;
  const auto s = sim.to(at::kDouble), c = cpu.to(at::kDouble);
  const auto nan_mismatch = (s.isnan() != c.isnan()).any().item<bool>();
  if (nan_mismatch) return fail(opname, what + ": NaN in one and not the other");
  const auto err = (s - c).abs().nan_to_num(0.0);
  const auto ratio = (err / tol.to(at::kDouble).clamp_min(1e-300)).max().item<double>();
  tally.worst = std::max(tally.worst, ratio);
  if (std::getenv("CUDASIM_TWIN_VERBOSE") && ratio > 0.5) {  // what comes near its tolerance
    const auto idx = (err / tol.to(at::kDouble).clamp_min(1e-300)).argmax().item<int64_t>();
    std::cout << "    near: " << what << ": simulated " << s.flatten()[idx].item<double>() << ", CPU "
              << c.flatten()[idx].item<double>() << " (" << ratio << "x the tolerance)\n";
  }
  if (ratio > 1.0) {
    const auto idx = (err - tol.to(at::kDouble)).argmax().item<int64_t>();
    std::ostringstream m;
    m << what << ": " << (err > tol.to(at::kDouble)).sum().item<int64_t>() << " of " << err.numel()
      << " elements off; worst at flat index " << idx << ": simulated " << s.flatten()[idx].item<double>()
      << ", CPU " << c.flatten()[idx].item<double>() << " (" << ratio << "x the tolerance); " << sizes_of(sim);
    fail(opname, m.str());
  }
}

void check(const std::string& opname, const std::string& what, const Tensor& sim, const Tensor& cpu, double tol) {
  check(opname, what, sim, cpu, at::full({}, tol, at::kDouble));
}

void check_equal(const std::string& opname, const std::string& what, const Tensor& a, const Tensor& b) {
  auto& tally = tallies[opname];
  ++tally.checks;
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type() || !at::equal(a, b))
    fail(opname, what + ": not bit-identical (" + sizes_of(a) + " vs " + sizes_of(b) + ")");
}

// The smallest spacing of a dtype (its subnormals'): the floor of an elementwise tolerance.
double tiny(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return std::numeric_limits<double>::denorm_min();
    case at::kHalf: return 5.960464477539063e-8;
    case at::kBFloat16: return 9.183549615799121e-41;
    default: return std::numeric_limits<float>::denorm_min();
  }
}

// Elementwise results through a sigmoid: the CPU twin takes ATen's (vectorised) sigmoid, the
// kernel 1 / (1 + exp(-v)). They differ by up to ~2 units in the last place of the accumulation
// type (seen: 1.9 in float32 and float64), which can move a 16-bit result by one unit: four
// units of the result's dtype, relative.
Tensor elementwise_tol(const Tensor& cpu) {
  return cpu.to(at::kDouble).abs() * (4 * eps(cpu.scalar_type())) + 4 * tiny(cpu.scalar_type());
}

// Sums over space and samples in another order: a bound from the summed magnitudes.
Tensor sum_tol(const Tensor& magnitude, at::ScalarType acc) {
  return magnitude.to(at::kDouble) * (64 * eps(acc)) + 1e-30;
}

at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Runs fn under the given schedule and restores the previous one.
template <typename F>
auto under(cudasim::Schedule s, F&& fn) {
  const auto before = cudasim::schedule();
  cudasim::set_schedule(s);
  struct Restore {
    cudasim::Schedule s;
    ~Restore() { cudasim::set_schedule(s); }
  } restore{before};
  return fn();
}

cudasim::Schedule other_schedule() {
  return cudasim::schedule() == cudasim::Schedule::kForward ? cudasim::Schedule::kReversed
                                                            : cudasim::Schedule::kForward;
}

bool deterministic() { return at::globalContext().deterministicAlgorithms(); }

// ---- inputs ----

enum class Layout { kContiguous, kChannelsLast, kTokens, kChannelsLast3d, kStrided };
const char* layout_name(Layout l) {
  switch (l) {
    case Layout::kContiguous: return "contiguous";
    case Layout::kChannelsLast: return "channels_last";
    case Layout::kTokens: return "tokens (N, L, C) as (N, C, L)";
    case Layout::kChannelsLast3d: return "channels_last_3d";
    case Layout::kStrided: return "strided (copied)";
  }
  return "?";
}

// An (N, C, *spatial) tensor of `dtype` in `layout`.
Tensor make(std::vector<int64_t> sizes, Layout layout, at::ScalarType dtype) {
  const auto f = at::TensorOptions().dtype(at::kFloat);
  Tensor x;
  switch (layout) {
    case Layout::kContiguous: x = at::randn(sizes, f); break;
    case Layout::kChannelsLast: x = at::randn(sizes, f).contiguous(at::MemoryFormat::ChannelsLast); break;
    case Layout::kChannelsLast3d: x = at::randn(sizes, f).contiguous(at::MemoryFormat::ChannelsLast3d); break;
    case Layout::kTokens: x = at::randn({sizes[0], sizes[2], sizes[1]}, f).movedim(2, 1); break;
    case Layout::kStrided: {
      auto s = sizes;
      std::swap(s[2], s[3]);
      x = at::randn(s, f).transpose(2, 3);
      break;
    }
  }
  if (dtype == at::kFloat) return x;
  // Converted preserving the strides.
  return x.to(dtype);
}

Tensor task_ids(int64_t N, int64_t T) {
  auto ids = at::randint(0, T, {N}, at::kLong);
  if (N > 1) ids[N - 1] = T - 1;  // the last task is used
  return ids;
}

std::string describe(const std::vector<int64_t>& sizes, Layout layout, at::ScalarType dtype, int64_t T) {
  std::ostringstream s;
  s << "x " << at::IntArrayRef(sizes) << " " << layout_name(layout) << " " << dtype << ", T " << T
    << (deterministic() ? ", deterministic" : ", default reductions")
    << (nad::launch::kMaxBlocks < 100 ? ", small grids" : "") << ", "
    << cudasim::schedule_name(cudasim::schedule()) << " schedule";
  return s.str();
}

const std::vector<at::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};

// ---- task_gate ----

struct GateCase {
  std::vector<int64_t> sizes;
  Layout layout;
  int64_t T;
};

std::vector<GateCase> gate_cases() {
  std::vector<GateCase> cases = {
      // (N, C): fully connected gate points, S = 1 (one lane per row), N = 0 and 1.
      {{3, 70}, Layout::kContiguous, 4},
      {{1, 1}, Layout::kContiguous, 1},
      {{0, 5}, Layout::kContiguous, 2},
      {{0, 4, 10}, Layout::kContiguous, 2},
      // 4-D maps, contiguous and strided (the copy path).
      {{2, 5, 7, 9}, Layout::kContiguous, 3},
      {{2, 5, 7, 9}, Layout::kStrided, 3},
      // Channels innermost: channels_last maps (tiles of 32 channels, chunks of 256 positions),
      // (N, L, C) tokens, 5-D maps.
      {{2, 33, 5, 7}, Layout::kChannelsLast, 3},
      {{1, 70, 16, 17}, Layout::kChannelsLast, 1},
      {{2, 3, 20, 30}, Layout::kChannelsLast, 2},
      {{2, 40, 65}, Layout::kTokens, 2},
      {{1, 33, 300}, Layout::kTokens, 1},
      {{3, 1, 5}, Layout::kTokens, 2},
      {{2, 33, 3, 4, 5}, Layout::kChannelsLast3d, 2},
  };
  // (N, C, S) rows: the group width follows S (1 to 32 lanes), a whole block from S = 256.
  const int64_t channels[] = {3, 31, 32, 33};
  int k = 0;
  for (int64_t S : {2, 3, 5, 17, 31, 32, 33, 100, 255}) cases.push_back({{3, channels[k++ % 4], S}, Layout::kContiguous, 4});
  for (int64_t S : {256, 257, 600}) cases.push_back({{2, 3, S}, Layout::kContiguous, 2});
  return cases;
}

void task_gate_twins() {
  const auto fwd = op<TaskGateSig>("nad::task_gate");
  const auto bwd = op<TaskGateBackwardSig>("nad::task_gate_backward");
  for (const auto& c : gate_cases())
    for (const auto dtype : kDtypes) {
      const auto what = describe(c.sizes, c.layout, dtype, c.T);
      const auto x = make(c.sizes, c.layout, dtype);
      const auto logits = at::randn({c.T, c.sizes[1]}, at::TensorOptions().dtype(acc_of(dtype) == at::kDouble ? at::kDouble : at::kFloat));
      const auto ids = task_ids(c.sizes[0], c.T);
      const auto y_cpu = fwd.redispatch(kCpu, x, logits, ids);
      const auto y_sim = fwd.redispatch(kCuda, x, logits, ids);
      check("task_gate", what, y_sim, y_cpu, elementwise_tol(y_cpu));
      const auto grad_y = at::randn_like(y_cpu, at::TensorOptions().dtype(at::kFloat)).to(dtype);
      // Bound of the gate sums: sum over each task's samples and positions of |grad_y * x|.
      const auto acc = acc_of(dtype);
      const auto flat = [&](const Tensor& t) { return t.to(at::kDouble).abs().reshape({c.sizes[0], c.sizes[1], -1}).sum(2); };
      auto magnitude = at::zeros({c.T, c.sizes[1]}, at::kDouble);
      if (x.numel() > 0) magnitude.index_add_(0, ids, flat(grad_y.to(at::kDouble) * x.to(at::kDouble)));
      for (const bool x_grad : {true, false}) {
        const auto [gx_cpu, gl_cpu] = bwd.redispatch(kCpu, grad_y, x, logits, ids, x_grad);
        const auto [gx_sim, gl_sim] = bwd.redispatch(kCuda, grad_y, x, logits, ids, x_grad);
        const auto tag = what + (x_grad ? ", x_grad" : ", logits only");
        check("task_gate_backward", tag + ": grad_x", gx_sim, gx_cpu, elementwise_tol(gx_cpu));
        check("task_gate_backward", tag + ": grad_logits", gl_sim, gl_cpu, sum_tol(magnitude, acc));
        if (deterministic()) {
          const auto again = under(other_schedule(), [&] { return bwd.redispatch(kCuda, grad_y, x, logits, ids, x_grad); });
          check_equal("task_gate_backward", tag + ": grad_logits across schedules", std::get<1>(again), gl_sim);
        }
      }
    }
}

// ---- masked_conv2d ----

struct ConvCase {
  std::vector<int64_t> x, w;  // (N, C_in, H, W), (C_out, C_in / groups, kH, kW)
  int64_t stride, padding, dilation, groups;
  bool bias, relu;
  Layout layout;
  int64_t T;
};

void masked_conv2d_twins() {
  const auto conv = op<ConvSig>("nad::masked_conv2d");
  const auto fwd = op<ConvForwardSig>("nad::masked_conv2d_forward");
  const auto bwd = op<ConvBackwardSig>("nad::masked_conv2d_backward");
  const std::vector<ConvCase> cases = {
      {{2, 3, 8, 8}, {5, 3, 3, 3}, 1, 1, 1, 1, true, true, Layout::kContiguous, 2},        // S = 64
      {{1, 4, 17, 17}, {6, 4, 3, 3}, 1, 1, 1, 1, false, true, Layout::kContiguous, 1},     // S = 289
      {{2, 4, 9, 9}, {6, 2, 3, 3}, 2, 2, 2, 2, true, false, Layout::kContiguous, 3},       // groups, dilation
      {{2, 8, 9, 9}, {40, 8, 1, 1}, 1, 0, 1, 1, true, true, Layout::kChannelsLast, 2},     // C > 32 tiles
      {{1, 4, 18, 18}, {3, 4, 1, 1}, 1, 0, 1, 1, false, true, Layout::kChannelsLast, 1},   // 2 chunks
      {{0, 3, 6, 6}, {4, 3, 3, 3}, 1, 1, 1, 1, true, true, Layout::kContiguous, 2},        // N = 0
  };
  for (const auto& c : cases)
    for (const auto dtype : kDtypes) {
      const auto what = describe(c.x, c.layout, dtype, c.T) + (c.relu ? ", ReLU" : "") + (c.bias ? ", bias" : "");
      const auto x = make(c.x, c.layout, dtype);
      auto w = at::randn(c.w).to(dtype);
      if (c.layout == Layout::kChannelsLast) w = w.contiguous(at::MemoryFormat::ChannelsLast);
      const std::optional<Tensor> b = c.bias ? std::optional<Tensor>(at::randn({c.w[0]}).to(dtype)) : std::nullopt;
      const auto logits = at::randn({c.T, c.w[0]}, at::TensorOptions().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat));
      const auto ids = task_ids(c.x[0], c.T);
      const std::vector<int64_t> s{c.stride, c.stride}, p{c.padding, c.padding}, d{c.dilation, c.dilation};
      const auto y_cpu = conv.redispatch(kCpu, x, w, b, logits, ids, s, p, d, c.groups, c.relu);
      const auto y_sim = conv.redispatch(kCuda, x, w, b, logits, ids, s, p, d, c.groups, c.relu);
      check("masked_conv2d", what, y_sim, y_cpu, elementwise_tol(y_cpu));
      const auto [y2_cpu, act_cpu] = fwd.redispatch(kCpu, x, w, b, logits, ids, s, p, d, c.groups, c.relu);
      const auto [y2_sim, act_sim] = fwd.redispatch(kCuda, x, w, b, logits, ids, s, p, d, c.groups, c.relu);
      check("masked_conv2d_forward", what + ": y", y2_sim, y2_cpu, elementwise_tol(y2_cpu));
      check_equal("masked_conv2d_forward", what + ": act (relu(conv + bias), no sigmoid)", act_sim, act_cpu);
      const auto grad_y = at::randn_like(act_cpu, at::TensorOptions().dtype(at::kFloat)).to(dtype);
      auto magnitude = at::zeros({c.T, c.w[0]}, at::kDouble);
      if (act_cpu.numel() > 0)
        magnitude.index_add_(0, ids, (grad_y.to(at::kDouble) * act_cpu.to(at::kDouble)).abs().sum({2, 3}));
      for (const bool x_grad : {true, false}) {
        const auto [gx_cpu, gl_cpu] = bwd.redispatch(kCpu, grad_y, x, w, act_cpu, logits, ids, s, p, d, c.groups, c.relu, x_grad);
        const auto [gx_sim, gl_sim] = bwd.redispatch(kCuda, grad_y, x, w, act_cpu, logits, ids, s, p, d, c.groups, c.relu, x_grad);
        const auto tag = what + (x_grad ? ", x_grad" : ", logits only");
        // grad_x is a convolution of the gated gradient: compare at the convolution's scale.
        const auto scale = gx_cpu.numel() ? gx_cpu.to(at::kDouble).abs().max().item<double>() : 0.0;
        check("masked_conv2d_backward", tag + ": grad_x", gx_sim, gx_cpu, 8 * eps(dtype) * std::max(scale, 1e-30));
        check("masked_conv2d_backward", tag + ": grad_logits", gl_sim, gl_cpu, sum_tol(magnitude, acc_of(dtype)));
        if (deterministic()) {
          const auto again = under(other_schedule(), [&] {
            return bwd.redispatch(kCuda, grad_y, x, w, act_cpu, logits, ids, s, p, d, c.groups, c.relu, x_grad);
          });
          check_equal("masked_conv2d_backward", tag + ": grad_logits across schedules", std::get<1>(again), gl_sim);
        }
      }
    }
}

// ---- gate_mse ----

void gate_mse_twins() {
  const auto fwd = op<MseSig>("nad::gate_mse");
  const auto bwd = op<MseBackwardSig>("nad::gate_mse_backward");
  struct Case {
    std::vector<int64_t> sizes;
    Layout layout;
  };
  // E (elements per sample) across the 2,048 of a work item; N = 0, 1; channels-innermost pairs.
  const std::vector<Case> cases = {
      {{4, 10}, Layout::kContiguous},       {{3, 2048}, Layout::kContiguous}, {{3, 2049}, Layout::kContiguous},
      {{2, 5000}, Layout::kContiguous},     {{1, 7}, Layout::kContiguous},    {{0, 5}, Layout::kContiguous},
      {{5, 3, 4, 4}, Layout::kContiguous},  {{2, 8, 5, 5}, Layout::kChannelsLast},
      {{3, 40, 65}, Layout::kTokens},       {{2, 5, 7, 9}, Layout::kStrided},
  };
  const int64_t T = 3;
  for (const auto& c : cases)
    for (const auto dtype : kDtypes)
      for (const bool all_uncounted : {false, true}) {
        const auto what = describe(c.sizes, c.layout, dtype, T) + (all_uncounted ? ", no sample counted" : "");
        const auto masked = make(c.sizes, c.layout, dtype), original = make(c.sizes, c.layout, dtype);
        const int64_t N = c.sizes[0];
        auto counts = all_uncounted ? at::zeros({N}, at::kBool) : at::rand({N}) > 0.3;
        if (N > 0 && !all_uncounted) counts[0] = true;
        const auto ids = task_ids(N, T);
        const auto m_cpu = fwd.redispatch(kCpu, masked, original, counts, ids, T);
        const auto m_sim = fwd.redispatch(kCuda, masked, original, counts, ids, T);
        const auto acc = acc_of(dtype);
        check("gate_mse", what, m_sim, m_cpu, m_cpu.to(at::kDouble).abs() * (64 * eps(acc)) + 1e-30);
        if (deterministic()) {
          const auto again = under(other_schedule(), [&] { return fwd.redispatch(kCuda, masked, original, counts, ids, T); });
          check_equal("gate_mse", what + " across schedules", again, m_sim);
        }
        const auto grad = at::randn({T}, at::TensorOptions().dtype(acc));
        const auto g_cpu = bwd.redispatch(kCpu, grad, masked, original, counts, ids, T);
        const auto g_sim = bwd.redispatch(kCuda, grad, masked, original, counts, ids, T);
        check("gate_mse_backward", what, g_sim, g_cpu, elementwise_tol(g_cpu));
      }
}

// ---- normalized_gradient_step_ ----

void normalized_step_twins() {
  const auto step = op<StepSig>("nad::normalized_gradient_step_");
  struct Case {
    std::vector<int64_t> widths;
    std::vector<int64_t> tasks;
    bool transposed;  // logits as a transposed view: stride (1, T)
  };
  std::vector<int64_t> many(49);  // more gate points than one launch carries (48)
  for (size_t i = 0; i < many.size(); ++i) many[i] = 1 + static_cast<int64_t>(i * 7 % 40);
  const std::vector<Case> cases = {
      {{5}, {0, 2, 2, 4}, false},          {{1, 300, 1000}, {1, 3}, false},  {{7, 64}, {0, 1, 2, 3, 4}, true},
      {many, {4, 0}, false},               {{3, 4}, {}, false},
  };
  const int64_t T = 5;
  for (const auto& c : cases)
    for (const auto dtype : {at::kFloat, at::kDouble}) {
      std::ostringstream w;
      w << c.widths.size() << " gate points, tasks " << at::IntArrayRef(c.tasks) << (c.transposed ? ", transposed logits" : "")
        << ", " << dtype << ", " << cudasim::schedule_name(cudasim::schedule()) << " schedule";
      std::vector<Tensor> base, grads;
      for (const int64_t C : c.widths) {
        base.push_back(c.transposed ? at::randn({C, T}).to(dtype).t() : at::randn({T, C}).to(dtype));
        auto g = at::randn({T, C}).to(dtype);
        g[1].zero_();  // a zero norm: that row stays unchanged
        grads.push_back(g);
      }
      const auto tasks = at::tensor(c.tasks.empty() ? std::vector<int64_t>{} : c.tasks, at::kLong);
      auto clone = [&] {
        std::vector<Tensor> out;
        for (const auto& b : base) out.push_back(c.transposed ? b.t().clone().t() : b.clone());
        return out;
      };
      auto on_cpu = clone(), on_sim = clone();
      step.redispatch(kCpu, on_cpu, grads, tasks, 0.1);
      step.redispatch(kCuda, on_sim, grads, tasks, 0.1);
      for (size_t l = 0; l < base.size(); ++l) {
        check("normalized_gradient_step_", w.str() + ", gate point " + std::to_string(l), on_sim[l], on_cpu[l],
              on_cpu[l].to(at::kDouble).abs() * (2 * eps(dtype)) + 0.1 * 4 * eps(dtype));
        check_equal("normalized_gradient_step_", w.str() + ": strides kept", at::tensor(on_sim[l].strides()),
                    at::tensor(base[l].strides()));
      }
    }
}

// ---- mask_overlap ----

void mask_overlap_twins() {
  const auto overlap = op<OverlapSig>("nad::mask_overlap");
  struct Case {
    int64_t Ta, Tb;
    std::vector<int64_t> layers;
    double density;
  };
  std::vector<int64_t> many(200);  // more layers than one launch carries (192)
  for (size_t i = 0; i < many.size(); ++i) many[i] = 1 + static_cast<int64_t>(i % 3);
  const std::vector<Case> cases = {
      {1, 1, {3, 64, 65, 130, 1}, 0.5},  {63, 65, {3, 64, 65, 130, 1}, 0.3}, {64, 64, {64}, 0.5},
      {65, 1, {70, 5}, 0.1},             {130, 66, {17}, 0.6},             {5, 7, many, 0.5},
      {0, 4, {8}, 0.5},                  {6, 6, {600}, 0.02},
      {260, 3, {70, 5}, 0.4},  // 5 tiles of a: more than a small grid's 3 (the loop over tiles)
  };
  for (const auto& c : cases) {
    int64_t K = 0;
    for (auto s : c.layers) K += s;
    auto a = at::rand({c.Ta, K}) < c.density, b = at::rand({c.Tb, K}) < c.density;
    if (c.Ta > 1) a[1].zero_();  // empty sets: 0 / 0 counts as 1
    if (c.Tb > 1) b[0].zero_();
    for (const char* metric : {"iou", "iomin", "intersection"})
      for (const bool per_layer : {false, true}) {
        std::ostringstream w;
        w << c.Ta << " x " << c.Tb << " pairs, " << c.layers.size() << " layers, " << metric
          << (per_layer ? " per layer" : " mean") << ", " << cudasim::schedule_name(cudasim::schedule()) << " schedule";
        const auto cpu = overlap.redispatch(kCpu, a, b, c.layers, metric, per_layer);
        const auto sim = overlap.redispatch(kCuda, a, b, c.layers, metric, per_layer);
        if (per_layer || std::string(metric) == "intersection") {
          check("mask_overlap", w.str(), sim, cpu, 0.0);  // counts and one division: exact
        } else {
          check("mask_overlap", w.str(), sim, cpu, cpu.to(at::kDouble).abs() * (4 * eps(at::kFloat)) + 1e-30);
        }
      }
  }
}

// ---- device-side asserts: ids out of range reach the kernels when no host check ran ----

void device_asserts() {
  const auto x = at::randn({4, 3, 5});
  const auto logits = at::randn({2, 3});
  const auto y = at::empty_like(x);
  const auto sums = at::zeros({2, 3});
  for (const int64_t bad : {2, -1}) {
    const auto ids = at::tensor(std::vector<int64_t>{0, 1, bad, 0}, at::kLong);
    for (const bool forward : {true, false}) {
      std::string message;
      try {
        if (forward) nad::cuda::gate_forward(x, Tensor(), logits, ids, false, false, y, Tensor());
        else nad::cuda::gate_backward(x, x, logits, ids, false, false, y, sums);
      } catch (const cudasim::Error& e) {
        message = e.what();
      }
      auto& tally = tallies["device-side task-id assert"];
      ++tally.checks;
      const bool named = message.find("device-side assertion") != std::string::npos &&
                         message.find("t >= 0 && t < T") != std::string::npos;
      if (!named) fail("device-side task-id assert", std::string(forward ? "forward" : "backward") + " with id " +
                                                         std::to_string(bad) + ": " + (message.empty() ? "no diagnostic" : message));
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2 || (std::string(argv[1]) != "forward" && std::string(argv[1]) != "reversed")) {
    std::cerr << "usage: cudasim_twin forward|reversed\n";
    return 2;
  }
  cudasim::set_schedule(std::string(argv[1]) == "reversed" ? cudasim::Schedule::kReversed : cudasim::Schedule::kForward);
  at::manual_seed(0);
  at::set_num_threads(1);
  const std::vector<std::pair<std::string, std::function<void()>>> groups = {
      {"task_gate", task_gate_twins}, {"masked_conv2d", masked_conv2d_twins}, {"gate_mse", gate_mse_twins},
      {"normalized_gradient_step_", normalized_step_twins}, {"mask_overlap", mask_overlap_twins},
  };
  const int64_t production_blocks = nad::launch::kMaxBlocks, production_y = nad::launch::kMaxGridY;
  for (const bool small_grids : {false, true}) {
    nad::launch::kMaxBlocks = small_grids ? 3 : production_blocks;
    nad::launch::kMaxGridY = small_grids ? 3 : production_y;
    for (const bool det : {false, true}) {
      at::globalContext().setDeterministicAlgorithms(det, false);
      for (const auto& [name, fn] : groups) {
        std::cout << "[ RUN  ] " << name << (det ? " (deterministic" : " (default reductions")
                  << (small_grids ? ", grids of at most 3 blocks)" : ")") << std::endl;
        try {
          fn();
        } catch (const std::exception& e) {
          fail(name, std::string("stopped: ") + e.what());
        }
      }
    }
  }
  nad::launch::kMaxBlocks = production_blocks;
  nad::launch::kMaxGridY = production_y;
  at::globalContext().setDeterministicAlgorithms(false, false);
  device_asserts();
  std::printf("\n%-30s %8s %9s %22s\n", "entry point", "checks", "failures", "worst error/tolerance");
  for (const auto& [name, t] : tallies) std::printf("%-30s %8d %9d %22.3g\n", name.c_str(), t.checks, t.failures, t.worst);
  const auto s = cudasim::stats();
  std::printf("%s schedule: %lld launches, %lld blocks, %lld threads, %lld fiber switches\n",
              cudasim::schedule_name(cudasim::schedule()), (long long)s.launches, (long long)s.blocks,
              (long long)s.threads, (long long)s.switches);
  if (total_failures) std::printf("%d failure(s)\n", total_failures);
  return total_failures ? 1 : 0;
}
