// CPU registration of nad::task_gate: the shared gate passes (gate_passes.cpp) without bias or
// ReLU, applied to x (see ../task_gate.cpp).
#include <torch/library.h>

#include "../gate_passes.h"
#include "../task_gate.h"

namespace nad {
namespace cpu {
namespace {

at::Tensor task_gate(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& task_ids) {
  return task_gate_with(&gate_forward, x, logits, task_ids);
}

std::tuple<at::Tensor, at::Tensor> task_gate_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                      const at::Tensor& logits,
                                                      const at::Tensor& task_ids, bool x_grad) {
  return task_gate_backward_with(&gate_backward, grad_y, x, logits, task_ids, x_grad);
}

}  // namespace
}  // namespace cpu
}  // namespace nad

TORCH_LIBRARY_IMPL(nad, CPU, m) {
  m.impl("task_gate", &nad::cpu::task_gate);
  m.impl("task_gate_backward", &nad::cpu::task_gate_backward);
}
