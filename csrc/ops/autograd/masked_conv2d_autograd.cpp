// Autograd for nad::masked_conv2d, registered in C++ so LibTorch users get gradients too.
// Gradients flow to x and logits only: the weights are frozen in NAD.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../registration.h"

namespace nad {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;

at::Tensor call_masked_conv2d(const at::Tensor& x, const at::Tensor& w, const OptTensor& b,
                              const at::Tensor& logits, const at::Tensor& ids, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nad::masked_conv2d", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                         const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                         at::IntArrayRef, at::IntArrayRef, int64_t, bool)>();
  return op.call(x, w, b, logits, ids, stride, padding, dilation, groups, relu);
}

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& x, const at::Tensor& w,
                                                const OptTensor& b, const at::Tensor& logits,
                                                const at::Tensor& ids, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                                int64_t groups, bool relu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nad::masked_conv2d_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                           const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                           int64_t, bool)>();
  return op.call(x, w, b, logits, ids, stride, padding, dilation, groups, relu);
}

std::tuple<at::Tensor, at::Tensor> call_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                 const at::Tensor& w, const at::Tensor& act,
                                                 const at::Tensor& logits, const at::Tensor& ids,
                                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                                 at::IntArrayRef dilation, int64_t groups, bool relu,
                                                 bool x_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nad::masked_conv2d_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                           at::IntArrayRef, int64_t, bool, bool)>();
  return op.call(grad_y, x, w, act, logits, ids, stride, padding, dilation, groups, relu, x_grad);
}

class MaskedConv2dFunction : public torch::autograd::Function<MaskedConv2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const OptTensor& b, const at::Tensor& logits, const at::Tensor& ids,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                            int64_t groups, bool relu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, act] = call_forward(x, w, b, logits, ids, stride, padding, dilation, groups, relu);
    ctx->save_for_backward({x, w, act, logits, ids});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["relu"] = relu;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [grad_x, grad_logits] = call_backward(
        grads[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["stride"].toIntVector(),
        ctx->saved_data["padding"].toIntVector(), ctx->saved_data["dilation"].toIntVector(),
        ctx->saved_data["groups"].toInt(), ctx->saved_data["relu"].toBool(),
        ctx->needs_input_grad(0));
    if (!ctx->needs_input_grad(0)) grad_x = at::Tensor();
    at::Tensor none;
    return {grad_x, none, none, grad_logits, none, none, none, none, none, none};
  }
};

// The backward itself is not differentiable: say so instead of returning wrong gradients.
class MaskedConv2dBackwardFunction : public torch::autograd::Function<MaskedConv2dBackwardFunction> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_y, const at::Tensor& x,
                               const at::Tensor& w, const at::Tensor& act, const at::Tensor& logits,
                               const at::Tensor& ids, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, bool relu, bool x_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gx, gl] = call_backward(grad_y, x, w, act, logits, ids, stride, padding, dilation, groups,
                                  relu, x_grad);
    return {gx, gl};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "nad::masked_conv2d supports first-order gradients only (no double backward)");
  }
};

void check_frozen(const at::Tensor& w, const OptTensor& b) {
  // A silently missing weight gradient would be wrong; NAD never trains the network's weights.
  TORCH_CHECK(!w.requires_grad(),
              "masked_conv2d: weight requires grad, but weights are frozen in NAD (gradients flow "
              "to x and logits only); call weight.requires_grad_(False)");
  TORCH_CHECK(!(b.has_value() && b->defined() && b->requires_grad()),
              "masked_conv2d: bias requires grad, but weights are frozen in NAD (gradients flow "
              "to x and logits only); call bias.requires_grad_(False)");
}

at::Tensor masked_conv2d_autograd(const at::Tensor& x, const at::Tensor& w, const OptTensor& b,
                                  const at::Tensor& logits, const at::Tensor& ids,
                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, int64_t groups, bool relu) {
  if (at::GradMode::is_enabled()) {
    check_frozen(w, b);
    if (x.requires_grad() || logits.requires_grad())
      return MaskedConv2dFunction::apply(x, w, b, logits, ids, stride, padding, dilation, groups, relu);
  }
  // Nothing to differentiate: the plain op, which does not write the saved activation.
  at::AutoDispatchBelowADInplaceOrView guard;
  return call_masked_conv2d(x, w, b, logits, ids, stride, padding, dilation, groups, relu);
}

std::tuple<at::Tensor, at::Tensor> masked_conv2d_backward_autograd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w, const at::Tensor& act,
    const at::Tensor& logits, const at::Tensor& ids, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu, bool x_grad) {
  auto out = MaskedConv2dBackwardFunction::apply(grad_y, x, w, act, logits, ids, stride, padding,
                                                 dilation, groups, relu, x_grad);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace nad

NAD_LIBRARY_IMPL(Autograd, m) {
  m.impl("masked_conv2d", &nad::masked_conv2d_autograd);
  m.impl("masked_conv2d_backward", &nad::masked_conv2d_backward_autograd);
}
