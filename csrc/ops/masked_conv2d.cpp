#include "masked_conv2d.h"

#include "task_ids.h"

namespace nad {
namespace {

constexpr const char* kOp = "masked_conv2d";

}  // namespace

void check_masked_conv2d_args(const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, const at::Tensor& logits,
                              const at::Tensor& task_ids, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, kOp, ": x must have shape (N, C_in, H, W), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, kOp, ": weight must have shape (C_out, C_in / groups, kH, kW), got shape ",
              weight.sizes());
  TORCH_CHECK(logits.dim() == 2, kOp, ": logits must have shape (T, C_out), got shape ", logits.sizes());
  TORCH_CHECK(task_ids.dim() == 1 && task_ids.size(0) == x.size(0), kOp,
              ": task_ids must have shape (N,) with N = ", x.size(0), ", got shape ", task_ids.sizes());
  TORCH_CHECK(task_ids.scalar_type() == at::kLong, kOp, ": task_ids must be int64, got ",
              task_ids.scalar_type());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, kOp,
              ": stride, padding and dilation must have two entries each");
  TORCH_CHECK(groups >= 1, kOp, ": groups must be positive, got ", groups);
  const int64_t c_in = x.size(1), c_out = weight.size(0);
  TORCH_CHECK(c_in % groups == 0 && c_out % groups == 0, kOp, ": groups (", groups,
              ") must divide the input channels (", c_in, ") and the output channels (", c_out, ")");
  TORCH_CHECK(weight.size(1) * groups == c_in, kOp, ": weight has ", weight.size(1),
              " input channels per group but x has ", c_in, " channels in ", groups, " group(s)");
  TORCH_CHECK(logits.size(1) == c_out, kOp, ": logits must have shape (T, ", c_out,
              ") to match weight's output channels, got ", logits.sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16 || xt == at::kDouble, kOp,
              ": x must be float32, float16, bfloat16 or float64, got ", xt);
  TORCH_CHECK(weight.scalar_type() == xt, kOp, ": weight must have x's dtype ", xt, ", got ",
              weight.scalar_type());
  TORCH_CHECK(logits.scalar_type() == at::kFloat ||
                  (logits.scalar_type() == at::kDouble && xt == at::kDouble),
              kOp, ": logits must be float32 (float64 only with float64 x), got ", logits.scalar_type());
  const auto dev = x.device();
  TORCH_CHECK(weight.device() == dev && logits.device() == dev && task_ids.device() == dev, kOp,
              ": x, weight, logits and task_ids must be on one device");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == c_out, kOp, ": bias must have shape (", c_out,
                "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == xt && bias->device() == dev, kOp,
                ": bias must have x's dtype and device");
  }
}

std::tuple<at::Tensor, at::Tensor> masked_conv2d_forward_with(
    GateForwardPass epilogue, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& logits, const at::Tensor& task_ids,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool relu, bool save_act) {
  check_masked_conv2d_args(x, weight, bias, logits, task_ids, stride, padding, dilation, groups);
  check_ids_in_range(task_ids, logits.size(0), kOp, "task_ids");
  const auto fmt = gate_format(x);
  // Usually a no-op: the convolution backends already return x's layout.
  const auto conv = at::convolution(x, weight, c10::nullopt, stride, padding, dilation,
                                    /*transposed=*/false, /*output_padding=*/{0, 0}, groups)
                        .contiguous(fmt);
  auto y = at::empty_like(conv, fmt);
  auto act = save_act ? at::empty_like(conv, fmt) : at::Tensor();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  if (conv.numel() > 0)
    epilogue(conv, b, logits.contiguous(), task_ids.contiguous(), relu,
             fmt == at::MemoryFormat::ChannelsLast, y, act);
  return {y, act};
}

std::tuple<at::Tensor, at::Tensor> masked_conv2d_backward_with(
    GateBackwardPass pass, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& act, const at::Tensor& logits,
    const at::Tensor& task_ids, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu, bool x_grad) {
  check_masked_conv2d_args(x, weight, c10::nullopt, logits, task_ids, stride, padding, dilation, groups);
  TORCH_CHECK(grad_y.sizes() == act.sizes() && act.dim() == 4 && act.size(1) == weight.size(0),
              "masked_conv2d_backward: grad_y and act must have the output's shape, got ",
              grad_y.sizes(), " and ", act.sizes());
  TORCH_CHECK(act.scalar_type() == x.scalar_type(), "masked_conv2d_backward: act must have x's dtype");
  check_ids_in_range(task_ids, logits.size(0), kOp, "task_ids");
  const auto fmt = gate_format(x);
  const auto a = act.contiguous(fmt);
  const auto gy = grad_y.to(a.scalar_type()).contiguous(fmt);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto sums = at::zeros(logits.sizes(), logits.options().dtype(acc));
  // grad_pre feeds only the input gradient: not even written when x needs none.
  auto grad_pre = x_grad ? at::empty_like(a, fmt) : at::Tensor();
  if (a.numel() > 0)
    pass(gy, a, logits.contiguous(), task_ids.contiguous(), relu,
         fmt == at::MemoryFormat::ChannelsLast, grad_pre, sums);
  const auto gate = logits.to(acc).sigmoid();
  auto grad_logits = (sums * gate * (1 - gate)).to(logits.scalar_type());
  // Only the input gradient: the weights are frozen (output_mask {true, false, false}). In x's
  // layout by the gate_format rule, as the fake says (the backends usually return it already).
  auto grad_x = x_grad ? std::get<0>(at::convolution_backward(
                             grad_pre, x, weight, c10::nullopt, stride, padding, dilation,
                             /*transposed=*/false, /*output_padding=*/{0, 0}, groups,
                             {true, false, false})).contiguous(fmt)
                       : at::empty({0}, x.options());
  return {grad_x, grad_logits};
}

}  // namespace nad
