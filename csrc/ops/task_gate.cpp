#include "task_gate.h"

namespace nad {

void check_task_gate_args(const at::Tensor& x, const at::Tensor& logits,
                          const at::Tensor& task_ids) {
  TORCH_CHECK(x.dim() >= 2, "task_gate: x must have shape (N, C, ...), got ", x.dim(),
              " dimension(s)");
  TORCH_CHECK(logits.dim() == 2, "task_gate: logits must have shape (T, C), got shape ",
              logits.sizes());
  TORCH_CHECK(task_ids.dim() == 1, "task_gate: task_ids must have shape (N,), got shape ",
              task_ids.sizes());
  TORCH_CHECK(x.size(1) == logits.size(1), "task_gate: x has ", x.size(1),
              " channels but logits has ", logits.size(1), " (expected logits of shape (T, ",
              x.size(1), "))");
  TORCH_CHECK(task_ids.size(0) == x.size(0), "task_gate: task_ids has ", task_ids.size(0),
              " entries but x has batch size ", x.size(0));
  TORCH_CHECK(task_ids.scalar_type() == at::kLong, "task_gate: task_ids must be int64, got ",
              task_ids.scalar_type());
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16 || xt == at::kDouble,
              "task_gate: x must be float32, float16, bfloat16 or float64, got ", xt);
  TORCH_CHECK(logits.scalar_type() == at::kFloat ||
                  (logits.scalar_type() == at::kDouble && xt == at::kDouble),
              "task_gate: logits must be float32 (float64 only with float64 x), got ",
              logits.scalar_type());
  TORCH_CHECK(x.device() == logits.device() && x.device() == task_ids.device(),
              "task_gate: x, logits and task_ids must be on one device, got ", x.device(), ", ",
              logits.device(), " and ", task_ids.device());
}

}  // namespace nad
