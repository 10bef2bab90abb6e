// The one place where the `nad` operator namespace is defined. Every operator's schema is
// declared here; kernels register per backend in csrc/ops/{cpu,cuda}/ and autograd in
// csrc/ops/autograd/ (torchvision's csrc/ops layout).
#include <torch/library.h>

TORCH_LIBRARY(nad, m) {
  // y[n, c, ...] = x[n, c, ...] * sigmoid(logits[task_ids[n], c])
  m.def("task_gate(Tensor x, Tensor logits, Tensor task_ids) -> Tensor");
  // grad_x is an empty tensor when x_grad is false (x needs no gradient).
  m.def(
      "task_gate_backward(Tensor grad_y, Tensor x, Tensor logits, Tensor task_ids, "
      "bool x_grad=True) -> (Tensor grad_x, Tensor grad_logits)");
  // All-pairs overlap of binary sub-architectures (see csrc/ops/mask_overlap.h).
  m.def(
      "mask_overlap(Tensor a, Tensor b, int[] layer_sizes, str metric, bool per_layer) "
      "-> Tensor");

  // ---- Fused NAD ops (csrc/ops/masked_conv2d.h, gate_mse.h, normalized_step.h) ----
  // y = sigmoid(logits[task_ids])[:, :, None, None] * relu?(conv2d(x, weight) + bias); weights frozen.
  m.def(
      "masked_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor logits, Tensor task_ids, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) -> Tensor");
  // The same, also returning the pre-gate activation that backward needs (used by autograd).
  m.def(
      "masked_conv2d_forward(Tensor x, Tensor weight, Tensor? bias, Tensor logits, Tensor task_ids, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) -> (Tensor y, Tensor act)");
  // grad_x is an empty tensor when x_grad is false.
  m.def(
      "masked_conv2d_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor act, Tensor logits, "
      "Tensor task_ids, int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu, "
      "bool x_grad) -> (Tensor grad_x, Tensor grad_logits)");
  // Per-task MSE of one gate point over the counted samples, (T,) float32.
  m.def("gate_mse(Tensor masked, Tensor original, Tensor counts, Tensor task_ids, int num_tasks) -> Tensor");
  m.def(
      "gate_mse_backward(Tensor grad, Tensor masked, Tensor original, Tensor counts, Tensor task_ids, "
      "int num_tasks) -> Tensor");
  // m_l[t] -= lr * g_l[t] / ||g_l[t]|| for all gate points l and tasks t, in place.
  m.def("normalized_gradient_step_(Tensor(a!)[] logits, Tensor[] grads, Tensor tasks, float lr) -> ()");
}
