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
// y and act are channels_last when x is, contiguous (N, C, H, W) otherwise.
#include <ATen/ATen.h>

namespace nad {

void check_masked_conv2d_args(const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, const at::Tensor& logits,
                              const at::Tensor& task_ids, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// Device parts of the op. Every tensor is in the layout of y (`channels_inner`: channels_last).
// epilogue: y = g * relu?(conv + bias); writes act too when it is defined. bias may be undefined.
using MaskedConvEpilogue = void (*)(const at::Tensor& conv, const at::Tensor& bias,
                                    const at::Tensor& logits, const at::Tensor& task_ids,
                                    bool relu, bool channels_inner, const at::Tensor& y,
                                    const at::Tensor& act);
// backward pass: writes grad_pre and adds sum grad_y * act into gate_sums (T, C), which is
// zero-initialised in the accumulation type (float32, float64 for float64 inputs).
using MaskedConvBackwardPass = void (*)(const at::Tensor& grad_y, const at::Tensor& act,
                                        const at::Tensor& logits, const at::Tensor& task_ids,
                                        bool relu, bool channels_inner,
                                        const at::Tensor& grad_pre, const at::Tensor& gate_sums);

// The device-independent parts (checks, convolution, layouts), shared by the CPU and CUDA
// registrations. save_act=false leaves act undefined and skips writing it.
std::tuple<at::Tensor, at::Tensor> masked_conv2d_forward_with(
    MaskedConvEpilogue epilogue, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& logits, const at::Tensor& task_ids,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool relu, bool save_act);

std::tuple<at::Tensor, at::Tensor> masked_conv2d_backward_with(
    MaskedConvBackwardPass pass, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& act, const at::Tensor& logits,
    const at::Tensor& task_ids, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu, bool x_grad);

}  // namespace nad
