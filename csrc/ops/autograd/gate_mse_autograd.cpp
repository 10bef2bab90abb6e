// Autograd for nad::gate_mse, registered in C++. Gradients flow to `masked` only: `original`
// is the frozen network's activation.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../registration.h"

namespace nad {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_gate_mse(const at::Tensor& m, const at::Tensor& o, const at::Tensor& counts,
                         const at::Tensor& ids, int64_t num_tasks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nad::gate_mse", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, int64_t)>();
  return op.call(m, o, counts, ids, num_tasks);
}

at::Tensor call_gate_mse_backward(const at::Tensor& grad, const at::Tensor& m, const at::Tensor& o,
                                  const at::Tensor& counts, const at::Tensor& ids, int64_t num_tasks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nad::gate_mse_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(grad, m, o, counts, ids, num_tasks);
}

class GateMseFunction : public torch::autograd::Function<GateMseFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& m, const at::Tensor& o,
                            const at::Tensor& counts, const at::Tensor& ids, int64_t num_tasks) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({m, o, counts, ids});
    ctx->saved_data["num_tasks"] = num_tasks;
    return call_gate_mse(m, o, counts, ids, num_tasks);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto grad_m = call_gate_mse_backward(grads[0], s[0], s[1], s[2], s[3],
                                         ctx->saved_data["num_tasks"].toInt());
    return {grad_m, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class GateMseBackwardFunction : public torch::autograd::Function<GateMseBackwardFunction> {
 public:
  static at::Tensor forward(AutogradContext*, const at::Tensor& grad, const at::Tensor& m,
                            const at::Tensor& o, const at::Tensor& counts, const at::Tensor& ids,
                            int64_t num_tasks) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_gate_mse_backward(grad, m, o, counts, ids, num_tasks);
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "nad::gate_mse supports first-order gradients only (no double backward)");
  }
};

at::Tensor gate_mse_autograd(const at::Tensor& m, const at::Tensor& o, const at::Tensor& counts,
                             const at::Tensor& ids, int64_t num_tasks) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && o.requires_grad()),
              "gate_mse: original requires grad, but it is the frozen network's activation and "
              "gets no gradient (pass original.detach())");
  return GateMseFunction::apply(m, o, counts, ids, num_tasks);
}

at::Tensor gate_mse_backward_autograd(const at::Tensor& grad, const at::Tensor& m, const at::Tensor& o,
                                      const at::Tensor& counts, const at::Tensor& ids, int64_t num_tasks) {
  return GateMseBackwardFunction::apply(grad, m, o, counts, ids, num_tasks);
}

}  // namespace
}  // namespace nad

NAD_LIBRARY_IMPL(Autograd, m) {
  m.impl("gate_mse", &nad::gate_mse_autograd);
  m.impl("gate_mse_backward", &nad::gate_mse_backward_autograd);
}
