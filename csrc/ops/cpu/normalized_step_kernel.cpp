// CPU kernel of nad::normalized_gradient_step_: the selected rows of all gate points are split
// over threads; each row is read twice (norm, then update). The rules for tiny, zero and
// non-finite norms are ../normalized_step.h's, shared with the CUDA kernel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../normalized_step.h"
#include "../registration.h"

namespace nad {
namespace cpu {

void normalized_gradient_step_(at::TensorList logits, at::TensorList grads, const at::Tensor& tasks,
                               double lr) {
  check_normalized_step_args(logits, grads, tasks);
  const int64_t T = logits[0].size(0), L = static_cast<int64_t>(logits.size());
  // The rows to update, in order; a task listed twice is updated once. (The ids are in range.)
  const auto ids = tasks.contiguous();
  std::vector<char> selected(T, 0);
  for (int64_t k = 0; k < ids.numel(); ++k) selected[ids.const_data_ptr<int64_t>()[k]] = 1;
  std::vector<int64_t> rows;
  for (int64_t t = 0; t < T; ++t)
    if (selected[t]) rows.push_back(t);
  std::vector<at::Tensor> g(grads.begin(), grads.end());
  for (auto& x : g) x = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES(logits[0].scalar_type(), "normalized_gradient_step_cpu", [&] {
    const int64_t R = static_cast<int64_t>(rows.size());
    at::parallel_for(0, L * R, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t l = i / R, t = rows[i % R], C = logits[l].size(1);
        const scalar_t* gr = g[l].const_data_ptr<scalar_t>() + t * C;
        step_acc_t sq = 0;
        for (int64_t c = 0; c < C; ++c) sq += static_cast<step_acc_t>(gr[c]) * gr[c];
        const scalar_t norm = static_cast<scalar_t>(std::sqrt(sq));
        // A zero or non-finite norm (a NaN or Inf in the gradient) leaves the row unchanged.
        const bool finite = norm - norm == 0;  // false for NaN and Inf
        if (!(norm > 0) || !finite) continue;
        const scalar_t eps = static_cast<scalar_t>(kStepEps), denom = norm < eps ? eps : norm;
        scalar_t* m = logits[l].data_ptr<scalar_t>();
        const int64_t s0 = logits[l].stride(0), s1 = logits[l].stride(1);
        for (int64_t c = 0; c < C; ++c) m[t * s0 + c * s1] -= static_cast<scalar_t>(lr) * (gr[c] / denom);
      }
    });
  });
}

}  // namespace cpu
}  // namespace nad

NAD_LIBRARY_IMPL(CPU, m) {
  m.impl("normalized_gradient_step_", &nad::cpu::normalized_gradient_step_);
}
