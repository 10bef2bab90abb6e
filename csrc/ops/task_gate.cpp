#include "task_gate.h"

#include "task_ids.h"

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

at::Tensor task_gate_with(GateForwardPass forward, const at::Tensor& x_in,
                          const at::Tensor& logits, const at::Tensor& task_ids) {
  check_task_gate_args(x_in, logits, task_ids);
  check_ids_in_range(task_ids, logits.size(0), "task_gate", "task_ids");
  const auto fmt = gate_format(x_in);
  const auto x = x_in.contiguous(fmt);
  auto y = at::empty(x.sizes(), x.options().memory_format(fmt));
  if (x.numel() > 0)
    forward(x, at::Tensor(), logits.contiguous(), task_ids.contiguous(), /*relu=*/false,
            fmt == at::MemoryFormat::ChannelsLast, y, at::Tensor());
  return y;
}

std::tuple<at::Tensor, at::Tensor> task_gate_backward_with(GateBackwardPass backward,
                                                           const at::Tensor& grad_y,
                                                           const at::Tensor& x_in,
                                                           const at::Tensor& logits,
                                                           const at::Tensor& task_ids, bool x_grad) {
  check_task_gate_args(x_in, logits, task_ids);
  TORCH_CHECK(grad_y.sizes() == x_in.sizes(), "task_gate_backward: grad_y must have the shape of x ",
              x_in.sizes(), ", got ", grad_y.sizes());
  check_ids_in_range(task_ids, logits.size(0), "task_gate", "task_ids");
  const auto fmt = gate_format(x_in);
  const auto x = x_in.contiguous(fmt);
  const auto gy = grad_y.to(x.scalar_type()).contiguous(fmt);
  // Summed in float32 (float64 for float64 x), whatever the logits' dtype.
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto sums = at::zeros(logits.sizes(), logits.options().dtype(acc));
  auto grad_x = x_grad ? at::empty(x.sizes(), x.options().memory_format(fmt)) : at::empty({0}, x.options());
  if (x.numel() > 0)
    backward(gy, x, logits.contiguous(), task_ids.contiguous(), /*relu=*/false,
             fmt == at::MemoryFormat::ChannelsLast, x_grad ? grad_x : at::Tensor(), sums);
  const auto gate = logits.to(acc).sigmoid();  // d sigmoid(m) / dm = g (1 - g)
  return {grad_x, (sums * gate * (1 - gate)).to(logits.scalar_type())};
}

}  // namespace nad
