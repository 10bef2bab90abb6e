// The one place where the `nad` operator namespace is defined. Every operator's schema is
// declared here; kernels register per backend in csrc/ops/{cpu,cuda}/ and autograd in
// csrc/ops/autograd/ (torchvision's csrc/ops layout). NAD_LIBRARY is TORCH_LIBRARY(nad, m) run
// only by the first library of the process that carries these sources (registration.h).
#include "registration.h"
#include "task_ids.h"

namespace nad::registration {
namespace {

// The operators, public (csrc/include/nad/nad.h wraps each) and private (leading underscore: the
// library's own facts and settings, reached through nad.h's functions).
constexpr const char* kSchemas[] = {
    // y[n, c, ...] = x[n, c, ...] * sigmoid(logits[task_ids[n], c])
    "task_gate(Tensor x, Tensor logits, Tensor task_ids) -> Tensor",
    // grad_x is an empty tensor when x_grad is false (x needs no gradient).
    "task_gate_backward(Tensor grad_y, Tensor x, Tensor logits, Tensor task_ids, "
    "bool x_grad=True) -> (Tensor grad_x, Tensor grad_logits)",
    // All-pairs overlap of binary sub-architectures (see csrc/ops/mask_overlap.h).
    "mask_overlap(Tensor a, Tensor b, int[] layer_sizes, str metric, bool per_layer) -> Tensor",

    // ---- Fused NAD ops (csrc/ops/masked_conv2d.h, gate_mse.h, normalized_step.h) ----
    // y = sigmoid(logits[task_ids])[:, :, None, None] * relu?(conv2d(x, weight) + bias); weights frozen.
    "masked_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor logits, Tensor task_ids, "
    "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) -> Tensor",
    // The same, also returning the pre-gate activation that backward needs (used by autograd).
    "masked_conv2d_forward(Tensor x, Tensor weight, Tensor? bias, Tensor logits, Tensor task_ids, "
    "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) -> (Tensor y, Tensor act)",
    // grad_x is an empty tensor when x_grad is false.
    "masked_conv2d_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor act, Tensor logits, "
    "Tensor task_ids, int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu, "
    "bool x_grad) -> (Tensor grad_x, Tensor grad_logits)",
    // Per-task MSE of one gate point over the counted samples, (T,) float32.
    "gate_mse(Tensor masked, Tensor original, Tensor counts, Tensor task_ids, int num_tasks) -> Tensor",
    "gate_mse_backward(Tensor grad, Tensor masked, Tensor original, Tensor counts, Tensor task_ids, "
    "int num_tasks) -> Tensor",
    // m_l[t] -= lr * g_l[t] / ||g_l[t]|| for all gate points l and tasks t, in place.
    "normalized_gradient_step_(Tensor(a!)[] logits, Tensor[] grads, Tensor tasks, float lr) -> ()",

    // ---- Private: the registering library, settings (kernels in registration.cpp, task_ids.cpp) ----
    // "version=...;cuda=0|1;torch=...;abi=0|1;path=..." of the library that registered the operators.
    "_library_info() -> str",
    // The opt-in host-side check of CUDA task ids (task_ids.h): enable=None reads the setting,
    // true/false sets it; returns the setting before the call.
    "_check_task_ids(bool? enable=None) -> bool",
};
constexpr size_t kPublic = 9;  // the public operators come first

}  // namespace

c10::ArrayRef<const char*> schemas() { return kSchemas; }

}  // namespace nad::registration

NAD_LIBRARY(m) {
  const auto all = nad::registration::schemas();
  for (size_t i = 0; i < nad::registration::kPublic; ++i) m.def(all[i]);
  m.def(all[nad::registration::kPublic], &nad::registration::library_info);
  m.def(all[nad::registration::kPublic + 1], &nad::check_task_ids_setting);
}
