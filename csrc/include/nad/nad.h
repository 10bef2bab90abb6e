#pragma once
// nad-ext's operators for C++ (LibTorch) users: the same torch.ops.nad operators the Python
// package uses, called through the dispatcher, so that device dispatch and autograd (the
// autograd kernels are registered in C++) work exactly as from Python. docs/CPP.md is the guide.
//
//   #include <nad/nad.h>
//   auto y = nad::task_gate(x, logits, task_ids);   // differentiable w.r.t. x and logits
//
// Link with nad::nad (CMake: find_package(nad); target_link_libraries(app PRIVATE nad::nad)).
//
// Every wrapper below states the operator's schema, shapes, dtypes, gradients and errors. Errors
// are c10::Error (TORCH_CHECK), their message starting with the operator's name and naming the
// argument. Common to all operators:
//   - all tensors on one device: the CPU, or CUDA when has_cuda_kernels(); a CUDA tensor given
//     to a library built without CUDA kernels is refused with a message that says so;
//   - task ids outside [0, T) are refused on the CPU; on CUDA they are asserted on the device (a
//     failed device-side assert leaves the CUDA context unusable) unless the opt-in host check is
//     on: set_check_task_ids(true) or NAD_CHECK_TASK_IDS=1 (one min/max read back per call);
//   - thread-safe: any number of threads may call the operators at once (on CUDA each call
//     runs on its thread's current stream, c10::cuda::getCurrentCUDAStream()).
//
// Adding an operator: declare its schema in csrc/ops/schemas.cpp, then add a wrapper below:
// a comment with the schema and shapes, light argument checks, and detail::op<Signature>().
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <nad/export.h>
#include <nad/version.h>

namespace nad {

// Version of the linked library (the Python package's version; NAD_VERSION_STRING in
// <nad/version.h> is the headers').
NAD_API const char* version();

// The library whose kernels run the nad operators in this process: the first of libnad and the
// Python extension nad_ext._C to load (the other registers nothing; docs/CPP.md).
struct LibraryInfo {
  std::string version;        // its nad-ext version
  bool cuda_kernels = false;  // built with the CUDA kernels
  std::string torch_version;  // the LibTorch it was compiled against
  bool cxx11_abi = true;      // compiled with _GLIBCXX_USE_CXX11_ABI=1
  std::string path;           // its file
};
NAD_API LibraryInfo library_info();

// True when the operators' kernels in this process include the CUDA ones.
NAD_API bool has_cuda_kernels();

// The opt-in host-side check of CUDA task ids (see above): on, every operator reads the ids' min
// and max back before its kernels run (one sync per call; skipped while a CUDA graph is being
// captured) and refuses ids outside [0, T) with an error naming the operator and the argument,
// instead of a device-side assert. Off by default (CPU ids are always checked). Process-wide,
// thread-safe. Returns the previous setting.
NAD_API bool set_check_task_ids(bool enable);
NAD_API bool check_task_ids_enabled();

namespace detail {

// Throws c10::Error unless these headers, the linked libnad and the library that registered the
// operators are one version. Checked once per operator, before its first call.
NAD_API void check_library(const char* header_version);

// The typed dispatcher handle of the operator `name` ("nad::task_gate"). Calling into libnad
// also keeps the library linked where the linker drops libraries nothing refers to.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  check_library(NAD_VERSION_STRING);
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline void check_defined(const at::Tensor& t, const char* op_name, const char* arg) {
  TORCH_CHECK(t.defined(), op_name, ": ", arg, " is an undefined tensor");
}

}  // namespace detail

// ---- task_gate ------------------------------------------------------------------------------

// nad::task_gate(Tensor x, Tensor logits, Tensor task_ids) -> Tensor
//
// Per-sample, task-conditional channel gate:
//   y[n, c, ...] = x[n, c, ...] * sigmoid(logits[task_ids[n], c])
// x: (N, C, ...) float32/float16/bfloat16 (float64 for gradchecks); logits: (T, C) float32
// (float64 only with float64 x); task_ids: (N,) int64 in [0, T).
// Layouts: x is read in place when contiguous or channels-innermost (channels_last maps, the
// (N, C, L) view x.movedim(2, 1) of (N, L, C) tokens), and y comes back in that layout; other
// layouts are copied to contiguous first.
// Autograd: differentiable with respect to x and logits (first order; double backward is refused).
// Errors: x with fewer than 2 dims, logits not 2-D or with another channel count, task_ids not
// (N,) int64, unsupported dtypes, tensors on different devices, ids out of range.
inline at::Tensor task_gate(const at::Tensor& x, const at::Tensor& logits,
                            const at::Tensor& task_ids) {
  detail::check_defined(x, "task_gate", "x");
  detail::check_defined(logits, "task_gate", "logits");
  detail::check_defined(task_ids, "task_gate", "task_ids");
  static const auto handle =
      detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
          "nad::task_gate");
  return handle.call(x, logits, task_ids);
}

// nad::task_gate_backward(Tensor grad_y, Tensor x, Tensor logits, Tensor task_ids,
//                         bool x_grad=True) -> (Tensor grad_x, Tensor grad_logits)
//
// The gradients of task_gate: grad_x = grad_y * gate, grad_logits[t, c] = sum over the samples
// of task t and over space of grad_y * x, times gate * (1 - gate); grad_y has x's shape.
// grad_logits has logits' shape and dtype; grad_x (x's layout, as task_gate's y) is an empty
// tensor, not computed, when x_grad is false. Normally reached through autograd; not itself
// differentiable. Errors: those of task_gate, and grad_y not shaped like x.
inline std::tuple<at::Tensor, at::Tensor> task_gate_backward(const at::Tensor& grad_y,
                                                             const at::Tensor& x,
                                                             const at::Tensor& logits,
                                                             const at::Tensor& task_ids,
                                                             bool x_grad = true) {
  detail::check_defined(grad_y, "task_gate_backward", "grad_y");
  detail::check_defined(x, "task_gate_backward", "x");
  detail::check_defined(logits, "task_gate_backward", "logits");
  detail::check_defined(task_ids, "task_gate_backward", "task_ids");
  static const auto handle = detail::op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>(
      "nad::task_gate_backward");
  return handle.call(grad_y, x, logits, task_ids, x_grad);
}

// ---- mask_overlap ---------------------------------------------------------------------------

// nad::mask_overlap(Tensor a, Tensor b, int[] layer_sizes, str metric, bool per_layer) -> Tensor
//
// All-pairs, layer-wise overlap of binary sub-architectures (csrc/ops/mask_overlap.h).
// a: (Ta, K) and b: (Tb, K) bool, one row per task: the open channels of every gate point
// concatenated in gate-point order (MaskBank::binary()); layer_sizes: the channels of each
// gate point, positive, summing to K (MaskBank::layer_sizes()). metric, per layer l:
//   "iou"          |A_l & B_l| / |A_l | B_l|    (the paper's similarity)
//   "iomin"        |A_l & B_l| / min(|A_l|, |B_l|)
//   "intersection" |A_l & B_l|
// with 0/0 = 1 for iou and iomin. Returns float32 (Ta, Tb), the mean over layers, or
// (L, Ta, Tb), every layer's matrix, when per_layer. Not differentiable.
// Errors: a or b not 2-D bool, another column count than sum(layer_sizes), an empty or
// non-positive layer_sizes, an unknown metric, a and b on different devices.
inline at::Tensor mask_overlap(const at::Tensor& a, const at::Tensor& b,
                               const std::vector<int64_t>& layer_sizes,
                               const std::string& metric, bool per_layer) {
  detail::check_defined(a, "mask_overlap", "a");
  detail::check_defined(b, "mask_overlap", "b");
  static const auto handle =
      detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
                            c10::string_view, bool)>("nad::mask_overlap");
  return handle.call(a, b, layer_sizes, metric, per_layer);
}

// ---- masked_conv2d --------------------------------------------------------------------------

// nad::masked_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor logits, Tensor task_ids,
//                    int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) -> Tensor
//
// A frozen convolution with the task gate fused around it (the fast path's gate points):
//   act = relu?(conv2d(x, weight, stride, padding, dilation, groups) + bias)
//   y[n, c] = sigmoid(logits[task_ids[n], c]) * act[n, c]
// x: (N, C_in, H, W) float32/float16/bfloat16/float64; weight: (C_out, C_in / groups, kH, kW)
// and bias: (C_out,) or none, x's dtype; logits: (T, C_out) float32 (float64 only with float64
// x); task_ids: (N,) int64 in [0, T). y: (N, C_out, H_out, W_out), channels_last when x is,
// contiguous otherwise.
// Autograd: differentiable with respect to x and logits (first order). The weights are frozen:
// a weight or bias that requires grad (with grad mode on) is refused rather than silently given
// no gradient.
// Errors: wrong ranks or shapes (naming them), groups not dividing the channels, dtypes, devices,
// ids out of range, stride/padding/dilation without two entries.
inline at::Tensor masked_conv2d(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& logits,
                                const at::Tensor& task_ids, c10::IntArrayRef stride,
                                c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                                bool relu) {
  detail::check_defined(x, "masked_conv2d", "x");
  detail::check_defined(weight, "masked_conv2d", "weight");
  detail::check_defined(logits, "masked_conv2d", "logits");
  detail::check_defined(task_ids, "masked_conv2d", "task_ids");
  static const auto handle = detail::op<at::Tensor(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
      const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, int64_t, bool)>(
      "nad::masked_conv2d");
  return handle.call(x, weight, bias, logits, task_ids, stride, padding, dilation, groups, relu);
}

// nad::masked_conv2d_forward(<masked_conv2d's arguments>) -> (Tensor y, Tensor act)
//
// masked_conv2d that also returns the pre-gate activation act (y's shape and layout), which
// masked_conv2d_backward needs; what its autograd kernel calls. Not differentiable itself (call
// masked_conv2d for gradients). Errors: those of masked_conv2d.
inline std::tuple<at::Tensor, at::Tensor> masked_conv2d_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& logits, const at::Tensor& task_ids, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, bool relu) {
  detail::check_defined(x, "masked_conv2d_forward", "x");
  detail::check_defined(weight, "masked_conv2d_forward", "weight");
  detail::check_defined(logits, "masked_conv2d_forward", "logits");
  detail::check_defined(task_ids, "masked_conv2d_forward", "task_ids");
  static const auto handle = detail::op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
      const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, int64_t, bool)>(
      "nad::masked_conv2d_forward");
  return handle.call(x, weight, bias, logits, task_ids, stride, padding, dilation, groups, relu);
}

// nad::masked_conv2d_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor act, Tensor logits,
//     Tensor task_ids, int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu,
//     bool x_grad) -> (Tensor grad_x, Tensor grad_logits)
//
// The gradients of masked_conv2d given grad_y and the act of masked_conv2d_forward (both y's
// shape): grad_logits (logits' shape and dtype) and grad_x (x's shape and layout; an empty
// tensor, not computed, when x_grad is false). No weight or bias gradient. Not differentiable
// (double backward is refused). Errors: those of masked_conv2d, and grad_y / act not shaped like
// the output or act not in x's dtype.
inline std::tuple<at::Tensor, at::Tensor> masked_conv2d_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& act,
    const at::Tensor& logits, const at::Tensor& task_ids, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, bool relu, bool x_grad) {
  detail::check_defined(grad_y, "masked_conv2d_backward", "grad_y");
  detail::check_defined(x, "masked_conv2d_backward", "x");
  detail::check_defined(weight, "masked_conv2d_backward", "weight");
  detail::check_defined(act, "masked_conv2d_backward", "act");
  detail::check_defined(logits, "masked_conv2d_backward", "logits");
  detail::check_defined(task_ids, "masked_conv2d_backward", "task_ids");
  static const auto handle = detail::op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, int64_t, bool, bool)>(
      "nad::masked_conv2d_backward");
  return handle.call(grad_y, x, weight, act, logits, task_ids, stride, padding, dilation, groups, relu,
                     x_grad);
}

// ---- gate_mse -------------------------------------------------------------------------------

// nad::gate_mse(Tensor masked, Tensor original, Tensor counts, Tensor task_ids, int num_tasks) -> Tensor
//
// The NAD activation loss of one gate point, per task, in one pass:
//   out[t] = sum over samples n with task_ids[n] == t and counts[n] of ||masked[n] - original[n]||^2
//            / (k_t * E),   k_t = #{n : task_ids[n] == t and counts[n]},  E = elements per sample
// (0 for a task without counted samples). masked, original: (N, ...) of one shape and dtype,
// float32/float16/bfloat16/float64 (read in place when contiguous or channels-innermost);
// counts: (N,) bool; task_ids: (N,) int64 in [0, num_tasks); num_tasks >= 1. Returns (T,)
// float32 (float64 for float64 inputs).
// Autograd: differentiable with respect to masked (first order). original is the frozen
// network's activation: one that requires grad (with grad mode on) is refused; pass it detached.
// Errors: shapes, dtypes, devices, ids out of range, num_tasks < 1.
inline at::Tensor gate_mse(const at::Tensor& masked, const at::Tensor& original,
                           const at::Tensor& counts, const at::Tensor& task_ids, int64_t num_tasks) {
  detail::check_defined(masked, "gate_mse", "masked");
  detail::check_defined(original, "gate_mse", "original");
  detail::check_defined(counts, "gate_mse", "counts");
  detail::check_defined(task_ids, "gate_mse", "task_ids");
  static const auto handle = detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, int64_t)>("nad::gate_mse");
  return handle.call(masked, original, counts, task_ids, num_tasks);
}

// nad::gate_mse_backward(Tensor grad, Tensor masked, Tensor original, Tensor counts,
//                        Tensor task_ids, int num_tasks) -> Tensor
//
// The gradient of gate_mse with respect to masked, given grad (T,):
//   grad_masked[n] = grad[t] * 2 (masked - original)[n] / (k_t E) for counted samples, 0 otherwise
// (masked's shape, dtype and layout). Not differentiable. Errors: those of gate_mse, and grad
// not of shape (num_tasks,).
inline at::Tensor gate_mse_backward(const at::Tensor& grad, const at::Tensor& masked,
                                    const at::Tensor& original, const at::Tensor& counts,
                                    const at::Tensor& task_ids, int64_t num_tasks) {
  detail::check_defined(grad, "gate_mse_backward", "grad");
  detail::check_defined(masked, "gate_mse_backward", "masked");
  detail::check_defined(original, "gate_mse_backward", "original");
  detail::check_defined(counts, "gate_mse_backward", "counts");
  detail::check_defined(task_ids, "gate_mse_backward", "task_ids");
  static const auto handle =
      detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, int64_t)>("nad::gate_mse_backward");
  return handle.call(grad, masked, original, counts, task_ids, num_tasks);
}

// ---- normalized_gradient_step_ --------------------------------------------------------------

// nad::normalized_gradient_step_(Tensor(a!)[] logits, Tensor[] grads, Tensor tasks, float lr) -> ()
//
// The NAD update of all gate points and tasks at once, in place:
//   for every gate point l and task t in tasks:  logits[l][t] -= lr * grads[l][t] / max(||grads[l][t]||, eps)
// (rows whose gradient norm is zero or not finite are left unchanged; a task listed twice is
// updated once; see csrc/ops/normalized_step.h). logits[l]: (T, C_l), all float32 or all
// float64, any strides, one T and device; grads[l]: logits[l]'s shape and dtype; tasks: (K,)
// int64 in [0, T). An optimizer step, never differentiated: it runs as under no_grad and bumps
// the version counters of the updated logits (autograd then refuses stale saved tensors).
// Errors: an empty list, grads of another count, shape or dtype, mixed T, dtypes or devices,
// tasks not 1-D int64 or out of range.
inline void normalized_gradient_step_(at::TensorList logits, at::TensorList grads, const at::Tensor& tasks,
                                      double lr) {
  detail::check_defined(tasks, "normalized_gradient_step_", "tasks");
  static const auto handle = detail::op<void(at::TensorList, at::TensorList, const at::Tensor&, double)>(
      "nad::normalized_gradient_step_");
  handle.call(logits, grads, tasks, lr);
}

}  // namespace nad
