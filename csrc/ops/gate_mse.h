#pragma once
// nad::gate_mse: the NAD activation loss of one gate point, per task, in one pass.
//   out[t] = sum over samples n with task_ids[n] == t and counts[n] of sum_e (masked - original)^2
//            / (k_t * E),       k_t = #{n : task_ids[n] == t and counts[n]},  E = elements per sample
// (0 for tasks with k_t = 0). masked/original: (N, ...) float32/float16/bfloat16/float64, one
// dtype, read directly and accumulated in float32 (float64 for float64 inputs, which is also
// the output dtype then). counts: (N,) bool; task_ids: (N,) int64 in [0, num_tasks).
// Backward to masked only: grad_masked[n] = grad[t] * 2 (masked - original)[n] / (k_t E) for
// counted samples, 0 otherwise.
#include <ATen/ATen.h>

namespace nad {

void check_gate_mse_args(const at::Tensor& masked, const at::Tensor& original,
                         const at::Tensor& counts, const at::Tensor& task_ids, int64_t num_tasks);

// Device parts. m and o are (N, E) views of the same memory order (samples contiguous).
// sums: adds, per task, the squared differences of counted samples into sums (T,) (zeroed, acc dtype).
using GateMseSums = void (*)(const at::Tensor& m, const at::Tensor& o, const at::Tensor& counts,
                             const at::Tensor& task_ids, const at::Tensor& sums);
// apply: grad_m[n, e] = counts[n] ? scale[task_ids[n]] * (m - o)[n, e] : 0.
using GateMseApply = void (*)(const at::Tensor& m, const at::Tensor& o, const at::Tensor& counts,
                              const at::Tensor& task_ids, const at::Tensor& scale,
                              const at::Tensor& grad_m);

at::Tensor gate_mse_with(GateMseSums sums, const at::Tensor& masked, const at::Tensor& original,
                         const at::Tensor& counts, const at::Tensor& task_ids, int64_t num_tasks);
at::Tensor gate_mse_backward_with(GateMseApply apply, const at::Tensor& grad,
                                  const at::Tensor& masked, const at::Tensor& original,
                                  const at::Tensor& counts, const at::Tensor& task_ids,
                                  int64_t num_tasks);

}  // namespace nad
