#pragma once
// The kernels of nad::task_gate and nad::masked_conv2d for one backend. Both ops are host code
// (task_gate.cpp, masked_conv2d.cpp: checks, layouts, the ATen convolution) around the two gate
// passes of gate_passes.h, so a backend registers them by naming its passes, once:
//   cpu/gate_passes.cpp:  GateOps<&cpu::gate_forward, &cpu::gate_backward>::register_kernels(m)
//   cuda/gate_passes.cu:  GateOps<&cuda::gate_forward, &cuda::gate_backward>::register_kernels(m)
#include <torch/library.h>

#include "gate_passes.h"
#include "masked_conv2d.h"
#include "task_gate.h"

namespace nad {

template <GateForwardPass kForward, GateBackwardPass kBackward>
struct GateOps {
  static at::Tensor task_gate(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& task_ids) {
    return task_gate_with(kForward, x, logits, task_ids);
  }

  static std::tuple<at::Tensor, at::Tensor> task_gate_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                               const at::Tensor& logits,
                                                               const at::Tensor& task_ids, bool x_grad) {
    return task_gate_backward_with(kBackward, grad_y, x, logits, task_ids, x_grad);
  }

  static at::Tensor masked_conv2d(const at::Tensor& x, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, const at::Tensor& logits,
                                  const at::Tensor& task_ids, at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, int64_t groups, bool relu) {
    return std::get<0>(masked_conv2d_forward_with(kForward, x, weight, bias, logits, task_ids, stride, padding,
                                                  dilation, groups, relu, /*save_act=*/false));
  }

  static std::tuple<at::Tensor, at::Tensor> masked_conv2d_forward(
      const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
      const at::Tensor& logits, const at::Tensor& task_ids, at::IntArrayRef stride, at::IntArrayRef padding,
      at::IntArrayRef dilation, int64_t groups, bool relu) {
    return masked_conv2d_forward_with(kForward, x, weight, bias, logits, task_ids, stride, padding, dilation,
                                      groups, relu, /*save_act=*/true);
  }

  static std::tuple<at::Tensor, at::Tensor> masked_conv2d_backward(
      const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& act,
      const at::Tensor& logits, const at::Tensor& task_ids, at::IntArrayRef stride, at::IntArrayRef padding,
      at::IntArrayRef dilation, int64_t groups, bool relu, bool x_grad) {
    return masked_conv2d_backward_with(kBackward, grad_y, x, weight, act, logits, task_ids, stride, padding,
                                       dilation, groups, relu, x_grad);
  }

  static void register_kernels(torch::Library& m) {
    m.impl("task_gate", &task_gate);
    m.impl("task_gate_backward", &task_gate_backward);
    m.impl("masked_conv2d", &masked_conv2d);
    m.impl("masked_conv2d_forward", &masked_conv2d_forward);
    m.impl("masked_conv2d_backward", &masked_conv2d_backward);
  }
};

}  // namespace nad
