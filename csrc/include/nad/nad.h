#pragma once
// nad-ext's operators for C++ (LibTorch) users: the same torch.ops.nad operators the Python
// package uses, called through the dispatcher, so that device dispatch and autograd (the
// autograd kernels are registered in C++) work exactly as from Python.
//
//   #include <nad/nad.h>
//   auto y = nad::task_gate(x, logits, task_ids);   // differentiable w.r.t. x and logits
//
// Link with nad::nad (CMake: find_package(nad); target_link_libraries(app PRIVATE nad::nad)).
//
// Adding an operator: declare its schema in csrc/ops/schemas.cpp, then add a wrapper below:
// a comment with the schema and shapes, light argument checks, and detail::op<Signature>().
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace nad {

// Version of the library (the Python package's version). Defined in libnad.
const char* version();

// True when the library was built with the CUDA kernels.
bool has_cuda_kernels();

namespace detail {

// The typed dispatcher handle of the operator `name` ("nad::task_gate"). Calling version()
// refers to a symbol of libnad, so the library (whose static initialisers register the
// operators) stays linked even where the linker drops libraries nothing refers to.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  (void)version();
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline void check_defined(const at::Tensor& t, const char* op_name, const char* arg) {
  TORCH_CHECK(t.defined(), op_name, ": ", arg, " is an undefined tensor");
}

}  // namespace detail

// nad::task_gate(Tensor x, Tensor logits, Tensor task_ids) -> Tensor
//
// Per-sample, task-conditional channel gate:
//   y[n, c, ...] = x[n, c, ...] * sigmoid(logits[task_ids[n], c])
// x: (N, C, ...) float32/float16/bfloat16 (float64 for gradchecks), contiguous or
// channels_last; logits: (T, C) float32 (float64 only with float64 x); task_ids: (N,) int64 in
// [0, T). All on one device (CPU, or CUDA when has_cuda_kernels()). Returns a tensor shaped like
// x, differentiable with respect to x and logits (first order).
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
// grad_logits has logits' shape and dtype; grad_x is an empty tensor, not computed, when x_grad
// is false. Normally reached through autograd; not itself differentiable.
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

}  // namespace nad
