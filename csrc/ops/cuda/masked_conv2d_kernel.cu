// CUDA registration of nad::masked_conv2d: the convolutions are ATen's (cuDNN, see
// ../masked_conv2d.cpp), the fused passes around them are the shared gate passes
// (gate_passes.cu).
#include <torch/library.h>

#include "../gate_passes.h"
#include "../masked_conv2d.h"

namespace nad {
namespace cuda {
namespace {

at::Tensor masked_conv2d(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& logits,
                         const at::Tensor& task_ids, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups, bool relu) {
  return std::get<0>(masked_conv2d_forward_with(&gate_forward, x, weight, bias, logits, task_ids,
                                                stride, padding, dilation, groups, relu, false));
}

std::tuple<at::Tensor, at::Tensor> masked_conv2d_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& logits, const at::Tensor& task_ids, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  return masked_conv2d_forward_with(&gate_forward, x, weight, bias, logits, task_ids, stride,
                                    padding, dilation, groups, relu, true);
}

std::tuple<at::Tensor, at::Tensor> masked_conv2d_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& act,
    const at::Tensor& logits, const at::Tensor& task_ids, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu, bool x_grad) {
  return masked_conv2d_backward_with(&gate_backward, grad_y, x, weight, act, logits, task_ids,
                                     stride, padding, dilation, groups, relu, x_grad);
}

}  // namespace
}  // namespace cuda
}  // namespace nad

TORCH_LIBRARY_IMPL(nad, CUDA, m) {
  m.impl("masked_conv2d", &nad::cuda::masked_conv2d);
  m.impl("masked_conv2d_forward", &nad::cuda::masked_conv2d_forward);
  m.impl("masked_conv2d_backward", &nad::cuda::masked_conv2d_backward);
}
