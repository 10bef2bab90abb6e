// Autograd for nad::task_gate, registered in C++ so LibTorch users get gradients too.
#include <torch/autograd.h>
#include <torch/library.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "../registration.h"

namespace nad {
namespace {

at::Tensor call_task_gate(const at::Tensor& x, const at::Tensor& logits,
                          const at::Tensor& task_ids) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nad::task_gate", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(x, logits, task_ids);
}

std::tuple<at::Tensor, at::Tensor> call_task_gate_backward(const at::Tensor& grad_y,
                                                           const at::Tensor& x,
                                                           const at::Tensor& logits,
                                                           const at::Tensor& task_ids,
                                                           bool x_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nad::task_gate_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, bool)>();
  return op.call(grad_y, x, logits, task_ids, x_grad);
}

class TaskGateFunction : public torch::autograd::Function<TaskGateFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& logits, const at::Tensor& task_ids) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, logits, task_ids});
    return call_task_gate(x, logits, task_ids);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    // Where x needs no gradient (the first gate point), grad_x is neither computed nor written.
    const bool x_grad = ctx->needs_input_grad(0);
    auto [grad_x, grad_logits] =
        call_task_gate_backward(grads[0], saved[0], saved[1], saved[2], x_grad);
    if (!x_grad) grad_x = at::Tensor();
    if (!ctx->needs_input_grad(1)) grad_logits = at::Tensor();
    return {grad_x, grad_logits, at::Tensor()};
  }
};

// The backward itself is not differentiable: say so instead of returning wrong gradients.
class TaskGateBackwardFunction : public torch::autograd::Function<TaskGateBackwardFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& grad_y, const at::Tensor& x,
                                                const at::Tensor& logits,
                                                const at::Tensor& task_ids, bool x_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_x, grad_logits] = call_task_gate_backward(grad_y, x, logits, task_ids, x_grad);
    return {grad_x, grad_logits};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list) {
    TORCH_CHECK(false, "nad::task_gate supports first-order gradients only (no double backward)");
  }
};

at::Tensor task_gate_autograd(const at::Tensor& x, const at::Tensor& logits,
                              const at::Tensor& task_ids) {
  return TaskGateFunction::apply(x, logits, task_ids);
}

std::tuple<at::Tensor, at::Tensor> task_gate_backward_autograd(const at::Tensor& grad_y,
                                                               const at::Tensor& x,
                                                               const at::Tensor& logits,
                                                               const at::Tensor& task_ids,
                                                               bool x_grad) {
  auto out = TaskGateBackwardFunction::apply(grad_y, x, logits, task_ids, x_grad);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace nad

NAD_LIBRARY_IMPL(Autograd, m) {
  m.impl("task_gate", &nad::task_gate_autograd);
  m.impl("task_gate_backward", &nad::task_gate_backward_autograd);
}
