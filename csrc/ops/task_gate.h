#pragma once
// nad::task_gate: per-sample, task-conditional channel gate.
//   y[n, c, ...] = x[n, c, ...] * sigmoid(logits[task_ids[n], c])
// x: (N, C, ...) float32/float16/bfloat16/float64; logits: (T, C) float32 (float64 when x is
// float64); task_ids: (N,) int64 in [0, T).
#include <ATen/ATen.h>

namespace nad {

// Argument checks shared by every backend (TORCH_CHECK messages name the argument).
void check_task_gate_args(const at::Tensor& x, const at::Tensor& logits,
                          const at::Tensor& task_ids);

namespace cpu {
at::Tensor task_gate(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& task_ids);
std::tuple<at::Tensor, at::Tensor> task_gate_backward(const at::Tensor& grad_y,
                                                      const at::Tensor& x,
                                                      const at::Tensor& logits,
                                                      const at::Tensor& task_ids);
}  // namespace cpu

}  // namespace nad
