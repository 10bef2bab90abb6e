// The one place where the `nad` operator namespace is defined. Every operator's schema is
// declared here; kernels register per backend in csrc/ops/{cpu,cuda}/ and autograd in
// csrc/ops/autograd/ (torchvision's csrc/ops layout).
#include <torch/library.h>

TORCH_LIBRARY(nad, m) {
  // y[n, c, ...] = x[n, c, ...] * sigmoid(logits[task_ids[n], c])
  m.def("task_gate(Tensor x, Tensor logits, Tensor task_ids) -> Tensor");
  m.def(
      "task_gate_backward(Tensor grad_y, Tensor x, Tensor logits, Tensor task_ids) "
      "-> (Tensor grad_x, Tensor grad_logits)");
  // All-pairs overlap of binary sub-architectures (see csrc/ops/mask_overlap.h).
  m.def(
      "mask_overlap(Tensor a, Tensor b, int[] layer_sizes, str metric, bool per_layer) "
      "-> Tensor");
}
