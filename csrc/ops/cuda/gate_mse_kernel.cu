// CUDA kernels of nad::gate_mse. Forward: blocks over (chunk of a sample, sample); samples
// that do not count return before reading anything; each block reduces its chunk in float32
// (float64 for float64 inputs) and adds it to its task with one atomic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../gate_mse.h"
#include "common.cuh"

namespace nad {
namespace cuda {
namespace {

constexpr int64_t kPerBlock = kThreads * 8;  // elements of one sample per block

template <typename scalar_t, typename acc_t>
__global__ void sums_kernel(const scalar_t* __restrict__ m, const scalar_t* __restrict__ o,
                            const bool* __restrict__ counts, const int64_t* __restrict__ ids,
                            acc_t* __restrict__ sums, int64_t T, int64_t E) {
  const int64_t n = blockIdx.y;
  if (!counts[n]) return;  // uniform per block: no thread reaches the barrier
  const int64_t base = n * E;
  acc_t part = 0;
  for (int64_t e = blockIdx.x * (int64_t)kThreads + threadIdx.x; e < E; e += (int64_t)gridDim.x * kThreads) {
    const acc_t d = static_cast<acc_t>(m[base + e]) - static_cast<acc_t>(o[base + e]);
    part += d * d;
  }
  part = block_sum<acc_t>(part);
  if (threadIdx.x == 0) atomicAdd(&sums[task_of(ids, n, T)], part);
}

template <typename scalar_t, typename acc_t>
__global__ void apply_kernel(const scalar_t* __restrict__ m, const scalar_t* __restrict__ o,
                             const bool* __restrict__ counts, const int64_t* __restrict__ ids,
                             const acc_t* __restrict__ scale, scalar_t* __restrict__ grad_m,
                             int64_t numel, int64_t T, int64_t E) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < numel;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = i / E;
    const acc_t k = counts[n] ? scale[task_of(ids, n, T)] : acc_t(0);
    grad_m[i] = static_cast<scalar_t>(k * (static_cast<acc_t>(m[i]) - static_cast<acc_t>(o[i])));
  }
}

void sums(const at::Tensor& m, const at::Tensor& o, const at::Tensor& counts,
          const at::Tensor& task_ids, const at::Tensor& out) {
  c10::cuda::CUDAGuard guard(m.device());
  const int64_t N = m.size(0), E = m.size(1);
  TORCH_CHECK(N <= 65535, "gate_mse: batch larger than 65535 is not supported");
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((E + kPerBlock - 1) / kPerBlock, 65535)), N);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "gate_mse_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sums_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        m.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), counts.const_data_ptr<bool>(),
        task_ids.const_data_ptr<int64_t>(), out.data_ptr<acc_t>(), out.size(0), E);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void apply(const at::Tensor& m, const at::Tensor& o, const at::Tensor& counts,
           const at::Tensor& task_ids, const at::Tensor& scale, const at::Tensor& grad_m) {
  c10::cuda::CUDAGuard guard(m.device());
  const int64_t numel = m.numel(), E = m.size(1);
  const int blocks = static_cast<int>(std::min<int64_t>((numel + kThreads - 1) / kThreads, 65535LL * 8));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "gate_mse_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    apply_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        m.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), counts.const_data_ptr<bool>(),
        task_ids.const_data_ptr<int64_t>(), scale.const_data_ptr<acc_t>(), grad_m.data_ptr<scalar_t>(),
        numel, scale.size(0), E);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

at::Tensor gate_mse(const at::Tensor& masked, const at::Tensor& original, const at::Tensor& counts,
                    const at::Tensor& task_ids, int64_t num_tasks) {
  return gate_mse_with(&sums, masked, original, counts, task_ids, num_tasks);
}

at::Tensor gate_mse_backward(const at::Tensor& grad, const at::Tensor& masked,
                             const at::Tensor& original, const at::Tensor& counts,
                             const at::Tensor& task_ids, int64_t num_tasks) {
  return gate_mse_backward_with(&apply, grad, masked, original, counts, task_ids, num_tasks);
}

}  // namespace cuda
}  // namespace nad

TORCH_LIBRARY_IMPL(nad, CUDA, m) {
  m.impl("gate_mse", &nad::cuda::gate_mse);
  m.impl("gate_mse_backward", &nad::cuda::gate_mse_backward);
}
