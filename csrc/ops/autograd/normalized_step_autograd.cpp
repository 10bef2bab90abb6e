// nad::normalized_gradient_step_ is an optimizer-style update, never differentiated: below
// autograd it runs as if under no_grad (like torch.optim), and the version counters of the
// updated logits are bumped so that autograd notices stale saved tensors.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include "../registration.h"

namespace nad {
namespace {

void normalized_gradient_step_autograd(at::TensorList logits, at::TensorList grads,
                                       const at::Tensor& tasks, double lr) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nad::normalized_gradient_step_", "")
                       .typed<void(at::TensorList, at::TensorList, const at::Tensor&, double)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(logits, grads, tasks, lr);
  }
  for (const auto& m : logits) torch::autograd::impl::bump_version(m);
}

}  // namespace
}  // namespace nad

NAD_LIBRARY_IMPL(Autograd, m) {
  m.impl("normalized_gradient_step_", &nad::normalized_gradient_step_autograd);
}
