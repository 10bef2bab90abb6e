#pragma once
// nad::masked_conv2d: a frozen convolution followed by the task gate, with everything around
// the convolution fused into one pass per direction.
//   act = relu?(conv2d(x, weight) + bias);  y[n, c] = sigmoid(logits[task_ids[n], c]) * act[n, c]
// The convolution runs through ATen (cuDNN / oneDNN), without bias; bias, activation and gate
// are one epilogue pass that writes y and, when gradients are needed, the activation `act`
// (saving it is cheaper than recomputing the convolution; y / g is unsafe where g underflows).
// Backward (weights are frozen in NAD): one pass over grad_y and act gives
//   grad_pre = grad_y * g * (act > 0 if relu)   and   sum over (task samples, space) of grad_y * act,
// the latter times g (1 - g) is the logits gradient; grad_x comes from at::convolution_backward
// with output_mask {true, false, false}.
// y, act and grad_x are channels_last when x is (gate_format), contiguous (N, C, H, W)
// otherwise. The passes around the convolution are the gate passes of gate_passes.h.
#include <ATen/ATen.h>

#include "gate_passes.h"

namespace nad {

void check_masked_conv2d_args(const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, const at::Tensor& logits,
                              const at::Tensor& task_ids, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// The device-independent parts (checks, convolution, layouts), shared by the CPU and CUDA
// registrations. save_act=false leaves act undefined and skips writing it.
std::tuple<at::Tensor, at::Tensor> masked_conv2d_forward_with(
    GateForwardPass epilogue, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& logits, const at::Tensor& task_ids,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool relu, bool save_act);

std::tuple<at::Tensor, at::Tensor> masked_conv2d_backward_with(
    GateBackwardPass pass, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& act, const at::Tensor& logits,
    const at::Tensor& task_ids, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu, bool x_grad);

}  // namespace nad
