#pragma once
// nad::task_gate: per-sample, task-conditional channel gate.
//   y[n, c, ...] = x[n, c, ...] * sigmoid(logits[task_ids[n], c])
// x: (N, C, ...) float32/float16/bfloat16/float64; logits: (T, C) float32 (float64 when x is
// float64); task_ids: (N,) int64 in [0, T).
// y (and grad_x) are channels_last when x is (gate_format), contiguous otherwise. Backward:
// grad_x = grad_y * g (skipped, an empty tensor, when x_grad is false), grad_logits = the sum
// over each task's samples and space of grad_y * x, times g (1 - g).
// The kernels are the gate passes of gate_passes.h (no bias, no ReLU).
#include <ATen/ATen.h>

#include "gate_passes.h"

namespace nad {

// Argument checks shared by every backend (TORCH_CHECK messages name the argument).
void check_task_gate_args(const at::Tensor& x, const at::Tensor& logits,
                          const at::Tensor& task_ids);

// The device-independent parts (checks, layouts, allocation), shared by the CPU and CUDA
// registrations.
at::Tensor task_gate_with(GateForwardPass forward, const at::Tensor& x, const at::Tensor& logits,
                          const at::Tensor& task_ids);
std::tuple<at::Tensor, at::Tensor> task_gate_backward_with(GateBackwardPass backward,
                                                           const at::Tensor& grad_y,
                                                           const at::Tensor& x,
                                                           const at::Tensor& logits,
                                                           const at::Tensor& task_ids, bool x_grad);

}  // namespace nad
