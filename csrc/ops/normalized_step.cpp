#include "normalized_step.h"

#include "task_ids.h"

namespace nad {

void check_normalized_step_args(at::TensorList logits, at::TensorList grads, const at::Tensor& tasks) {
  constexpr const char* op = "normalized_gradient_step_";
  TORCH_CHECK(!logits.empty(), op, ": logits must hold at least one gate point");
  TORCH_CHECK(grads.size() == logits.size(), op, ": grads must have one entry per gate point (",
              logits.size(), "), got ", grads.size());
  TORCH_CHECK(tasks.dim() == 1 && tasks.scalar_type() == at::kLong, op,
              ": tasks must be a 1-dimensional int64 tensor");
  const auto& first = logits[0];
  for (size_t l = 0; l < logits.size(); ++l) {
    const auto& m = logits[l];
    const auto& g = grads[l];
    TORCH_CHECK(m.dim() == 2 && m.size(0) == first.size(0), op, ": logits[", l,
                "] must have shape (T, C) with T = ", first.size(0), ", got ", m.sizes());
    TORCH_CHECK(m.scalar_type() == first.scalar_type() &&
                    (m.scalar_type() == at::kFloat || m.scalar_type() == at::kDouble),
                op, ": logits must all be float32 or all float64; logits[", l, "] is ", m.scalar_type());
    TORCH_CHECK(g.sizes() == m.sizes() && g.scalar_type() == m.scalar_type(), op, ": grads[", l,
                "] must have the shape and dtype of logits[", l, "]");
    TORCH_CHECK(m.device() == tasks.device() && g.device() == tasks.device(), op,
                ": logits, grads and tasks must be on one device");
  }
  // CPU tensors only; the CUDA kernel asserts the range on the device.
  check_ids_in_range(tasks, first.size(0), op, "tasks");
}

}  // namespace nad
