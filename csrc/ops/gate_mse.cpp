#include "gate_mse.h"

#include <c10/util/accumulate.h>

#include "task_ids.h"

namespace nad {
namespace {

constexpr const char* kOp = "gate_mse";

// Both inputs as (N, E) rows in one memory order in which every sample is a contiguous block:
// the sum over a sample does not care about the order inside it, so a channels_last pair is
// viewed, not copied (channels_last is set then). Other layouts are copied to contiguous.
// E is computed, not inferred (-1): a reshape cannot infer it when N = 0 or E = 0.
std::pair<at::Tensor, at::Tensor> as_rows(const at::Tensor& masked, const at::Tensor& original,
                                          bool& channels_last) {
  const int64_t N = masked.size(0), E = c10::multiply_integers(masked.sizes().slice(1));
  channels_last = masked.dim() == 4 && !masked.is_contiguous() &&
                  masked.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  masked.strides() == original.strides();
  if (channels_last) {
    auto rows = [&](const at::Tensor& t) { return t.permute({0, 2, 3, 1}).reshape({N, E}); };
    return {rows(masked), rows(original)};
  }
  return {masked.reshape({N, E}).contiguous(), original.reshape({N, E}).contiguous()};
}

// k_t * E per task (0 where k_t = 0), in the accumulation dtype.
at::Tensor denominators(const at::Tensor& counts, const at::Tensor& task_ids, int64_t num_tasks,
                        int64_t E, at::ScalarType acc) {
  auto k = at::zeros({num_tasks}, counts.options().dtype(acc));
  k.index_add_(0, task_ids, counts.to(acc));
  return k * static_cast<double>(E);
}

}  // namespace

void check_gate_mse_args(const at::Tensor& masked, const at::Tensor& original,
                         const at::Tensor& counts, const at::Tensor& task_ids, int64_t num_tasks) {
  TORCH_CHECK(masked.dim() >= 2, kOp, ": masked must have shape (N, C, ...), got ", masked.sizes());
  TORCH_CHECK(original.sizes() == masked.sizes(), kOp, ": original must have masked's shape ",
              masked.sizes(), ", got ", original.sizes());
  const auto t = masked.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble, kOp,
              ": masked must be float32, float16, bfloat16 or float64, got ", t);
  TORCH_CHECK(original.scalar_type() == t, kOp, ": original must have masked's dtype ", t, ", got ",
              original.scalar_type());
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == masked.size(0) && counts.scalar_type() == at::kBool,
              kOp, ": counts must be a bool tensor of shape (", masked.size(0), ",)");
  TORCH_CHECK(task_ids.dim() == 1 && task_ids.size(0) == masked.size(0) &&
                  task_ids.scalar_type() == at::kLong,
              kOp, ": task_ids must be an int64 tensor of shape (", masked.size(0), ",)");
  TORCH_CHECK(num_tasks >= 1, kOp, ": num_tasks must be positive, got ", num_tasks);
  const auto dev = masked.device();
  TORCH_CHECK(original.device() == dev && counts.device() == dev && task_ids.device() == dev, kOp,
              ": masked, original, counts and task_ids must be on one device");
}

at::Tensor gate_mse_with(GateMseSums sums_fn, const at::Tensor& masked, const at::Tensor& original,
                         const at::Tensor& counts, const at::Tensor& task_ids, int64_t num_tasks) {
  check_gate_mse_args(masked, original, counts, task_ids, num_tasks);
  check_ids_in_range(task_ids, num_tasks, kOp, "task_ids");
  const auto acc = masked.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto sums = at::zeros({num_tasks}, masked.options().dtype(acc));
  if (masked.numel() == 0) return sums;
  bool cl = false;
  auto [m, o] = as_rows(masked, original, cl);
  sums_fn(m, o, counts.contiguous(), task_ids.contiguous(), sums);
  const auto den = denominators(counts, task_ids, num_tasks, m.size(1), acc);
  return at::where(den > 0, sums / den.clamp_min(1), at::zeros_like(sums));
}

at::Tensor gate_mse_backward_with(GateMseApply apply, const at::Tensor& grad,
                                  const at::Tensor& masked, const at::Tensor& original,
                                  const at::Tensor& counts, const at::Tensor& task_ids,
                                  int64_t num_tasks) {
  check_gate_mse_args(masked, original, counts, task_ids, num_tasks);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == num_tasks, "gate_mse_backward: grad must have shape (",
              num_tasks, ",), got ", grad.sizes());
  check_ids_in_range(task_ids, num_tasks, kOp, "task_ids");
  const auto acc = masked.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  bool cl = false;
  auto [m, o] = as_rows(masked, original, cl);
  const auto den = denominators(counts, task_ids, num_tasks, m.size(1), acc);
  const auto scale = at::where(den > 0, grad.to(acc) * 2 / den.clamp_min(1), at::zeros_like(den));
  auto grad_m = at::empty_like(m);
  if (m.numel() > 0) apply(m, o, counts.contiguous(), task_ids.contiguous(), scale.contiguous(), grad_m);
  // Back to masked's shape and memory order (the inverse of as_rows).
  if (cl)
    return grad_m.reshape({masked.size(0), masked.size(2), masked.size(3), masked.size(1)})
        .permute({0, 3, 1, 2});
  return grad_m.reshape(masked.sizes());
}

}  // namespace nad
