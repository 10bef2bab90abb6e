#pragma once
// nad::normalized_gradient_step_: the NAD update for all gate points and tasks at once, in place:
//   for every gate point l and task t in `tasks`:  m_l[t] -= lr * g_l[t] / max(||g_l[t]||_2, 1e-12)
// as the authors' F.normalize (eps 1e-12, kStepEps): a norm below it gives a shorter step. Rows
// whose norm is zero or not finite (a NaN or Inf in the gradient) are left unchanged: the
// trainer finds such gradients first and stops or skips the task's step (nad_ext/training/
// nonfinite.py); the op never writes them into the gates. A task listed twice is updated once.
// logits[l]: (T, C_l) float32 or float64, any strides, one T, dtype and device for all;
// grads[l]: shaped like logits[l]; tasks: (K,) int64 in [0, T) (checked on the host for CPU
// tensors, asserted on the device for CUDA ones: CUDA's index_fill_ would wrap -T <= t < 0).
// The squared norm is summed in double on both backends (step_acc_t), then rounded once.
#include <ATen/ATen.h>

namespace nad {

void check_normalized_step_args(at::TensorList logits, at::TensorList grads, const at::Tensor& tasks);

// Accumulation type of the squared norms (float32 or float64 logits): double, on both backends.
using step_acc_t = double;

// The smallest norm the step divides by (F.normalize's default eps), rounded to the logits' dtype.
constexpr double kStepEps = 1e-12;

}  // namespace nad
