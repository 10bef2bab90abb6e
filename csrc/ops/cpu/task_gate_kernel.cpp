// CPU kernels of nad::task_gate. x is made contiguous (N, C, S); the work is split over
// channels so that each thread owns whole rows of grad_logits (no atomics needed).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../task_gate.h"

namespace nad {
namespace cpu {
namespace {

void check_ids_in_range(const at::Tensor& task_ids, int64_t num_tasks) {
  if (task_ids.numel() == 0) return;
  const auto lo = task_ids.min().item<int64_t>();
  const auto hi = task_ids.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < num_tasks, "task_gate: task_ids must lie in [0, ", num_tasks,
              "), got values in [", lo, ", ", hi, "]");
}

}  // namespace

at::Tensor task_gate(const at::Tensor& x_in, const at::Tensor& logits_in,
                     const at::Tensor& task_ids_in) {
  check_task_gate_args(x_in, logits_in, task_ids_in);
  check_ids_in_range(task_ids_in, logits_in.size(0));
  const auto x = x_in.contiguous();
  const auto ids = task_ids_in.contiguous();
  auto y = at::empty_like(x);
  const int64_t N = x.size(0), C = x.size(1), S = N ? x.numel() / (N * C) : 0;
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "task_gate_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto* xp = x.data_ptr<scalar_t>();
    auto* yp = y.data_ptr<scalar_t>();
    const auto* idp = ids.data_ptr<int64_t>();
    const auto gate_acc = logits_in.to(c10::CppTypeToScalarType<acc_t>::value).sigmoid().contiguous();
    const auto* gp = gate_acc.data_ptr<acc_t>();
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / C, c = row % C;
        const acc_t g = gp[idp[n] * C + c];
        const scalar_t* xr = xp + row * S;
        scalar_t* yr = yp + row * S;
        for (int64_t s = 0; s < S; ++s) yr[s] = static_cast<scalar_t>(static_cast<acc_t>(xr[s]) * g);
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> task_gate_backward(const at::Tensor& grad_y_in,
                                                      const at::Tensor& x_in,
                                                      const at::Tensor& logits,
                                                      const at::Tensor& task_ids_in) {
  check_task_gate_args(x_in, logits, task_ids_in);
  TORCH_CHECK(grad_y_in.sizes() == x_in.sizes(), "task_gate_backward: grad_y must have the shape of x ",
              x_in.sizes(), ", got ", grad_y_in.sizes());
  check_ids_in_range(task_ids_in, logits.size(0));
  const auto x = x_in.contiguous();
  const auto grad_y = grad_y_in.to(x.scalar_type()).contiguous();
  const auto ids = task_ids_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), S = N ? x.numel() / (N * C) : 0;
  auto grad_x = at::empty_like(x);
  // Accumulated in the logits' precision (float32, or float64 for gradcheck).
  auto grad_logits = at::zeros_like(logits, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return {grad_x, grad_logits};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "task_gate_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto gate = logits.to(c10::CppTypeToScalarType<acc_t>::value).sigmoid().contiguous();
    const auto* gp = gate.data_ptr<acc_t>();
    const auto* xp = x.data_ptr<scalar_t>();
    const auto* gyp = grad_y.data_ptr<scalar_t>();
    auto* gxp = grad_x.data_ptr<scalar_t>();
    const auto* idp = ids.data_ptr<int64_t>();
    // Sum over samples of each task happens per channel: one thread owns a channel.
    auto sums = at::zeros({logits.size(0), C}, gate.options());
    auto* sp = sums.data_ptr<acc_t>();
    at::parallel_for(0, C, 1, [&](int64_t c_begin, int64_t c_end) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        for (int64_t n = 0; n < N; ++n) {
          const int64_t t = idp[n];
          const acc_t g = gp[t * C + c];
          const int64_t off = (n * C + c) * S;
          acc_t dot = 0;
          for (int64_t s = 0; s < S; ++s) {
            const acc_t gy = static_cast<acc_t>(gyp[off + s]);
            gxp[off + s] = static_cast<scalar_t>(gy * g);
            dot += gy * static_cast<acc_t>(xp[off + s]);
          }
          sp[t * C + c] += dot;
        }
      }
    });
    // d sigmoid(m) / dm = g (1 - g)
    grad_logits.copy_(sums * gate * (1 - gate));
  });
  return {grad_x, grad_logits};
}

}  // namespace cpu
}  // namespace nad

TORCH_LIBRARY_IMPL(nad, CPU, m) {
  m.impl("task_gate", &nad::cpu::task_gate);
  m.impl("task_gate_backward", &nad::cpu::task_gate_backward);
}
