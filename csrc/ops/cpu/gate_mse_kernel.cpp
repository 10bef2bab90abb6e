// CPU kernels of nad::gate_mse: samples are split over threads; each reads its two rows once,
// converting element by element (no float32 copies of low-precision inputs).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../gate_mse.h"
#include "../registration.h"

namespace nad {
namespace cpu {
namespace {

void sums_kernel(const at::Tensor& m, const at::Tensor& o, const at::Tensor& counts,
                 const at::Tensor& task_ids, const at::Tensor& sums) {
  const int64_t N = m.size(0), E = m.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "gate_mse_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    const scalar_t* op = o.const_data_ptr<scalar_t>();
    const bool* cp = counts.const_data_ptr<bool>();
    std::vector<double> per_sample(N, 0.0);
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        if (!cp[n]) continue;  // not read at all
        double total = 0;
        // Blocks of acc_t partial sums keep float32 accumulation accurate for large samples.
        for (int64_t e0 = 0; e0 < E; e0 += 4096) {
          acc_t part = 0;
          for (int64_t e = e0, e1 = std::min(E, e0 + 4096); e < e1; ++e) {
            const acc_t d = static_cast<acc_t>(mp[n * E + e]) - static_cast<acc_t>(op[n * E + e]);
            part += d * d;
          }
          total += part;
        }
        per_sample[n] = total;
      }
    });
    const int64_t* ids = task_ids.const_data_ptr<int64_t>();
    acc_t* sp = sums.data_ptr<acc_t>();
    for (int64_t n = 0; n < N; ++n) sp[ids[n]] += static_cast<acc_t>(per_sample[n]);
  });
}

void apply_kernel(const at::Tensor& m, const at::Tensor& o, const at::Tensor& counts,
                  const at::Tensor& task_ids, const at::Tensor& scale, const at::Tensor& grad_m) {
  const int64_t N = m.size(0), E = m.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "gate_mse_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    const scalar_t* op = o.const_data_ptr<scalar_t>();
    const bool* cp = counts.const_data_ptr<bool>();
    const int64_t* ids = task_ids.const_data_ptr<int64_t>();
    const acc_t* kp = scale.const_data_ptr<acc_t>();
    scalar_t* gp = grad_m.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const acc_t k = cp[n] ? kp[ids[n]] : acc_t(0);
        for (int64_t e = n * E; e < (n + 1) * E; ++e)
          gp[e] = static_cast<scalar_t>(k * (static_cast<acc_t>(mp[e]) - static_cast<acc_t>(op[e])));
      }
    });
  });
}

}  // namespace

at::Tensor gate_mse(const at::Tensor& masked, const at::Tensor& original, const at::Tensor& counts,
                    const at::Tensor& task_ids, int64_t num_tasks) {
  return gate_mse_with(&sums_kernel, masked, original, counts, task_ids, num_tasks);
}

at::Tensor gate_mse_backward(const at::Tensor& grad, const at::Tensor& masked,
                             const at::Tensor& original, const at::Tensor& counts,
                             const at::Tensor& task_ids, int64_t num_tasks) {
  return gate_mse_backward_with(&apply_kernel, grad, masked, original, counts, task_ids, num_tasks);
}

}  // namespace cpu
}  // namespace nad

NAD_LIBRARY_IMPL(CPU, m) {
  m.impl("gate_mse", &nad::cpu::gate_mse);
  m.impl("gate_mse_backward", &nad::cpu::gate_mse_backward);
}
