// CUDA kernels of nad::gate_mse.
// Forward: work items are (sample, chunk of kPerItem elements) pairs, sample-major, covered by
// a grid-stride loop (no limit on the batch or the sample size); items of samples that do not
// count are skipped before anything is read. Each item is reduced in float32 (float64 for
// float64 inputs) and added to its task with one atomic; under
// torch.use_deterministic_algorithms(True) the items' sums are written instead and added in a
// fixed order (per sample, then per task in sample order; see common.cuh).
// Backward: one elementwise grid-stride pass.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../gate_mse.h"
#include "../launch.h"
#include "../registration.h"
#include "common.cuh"

namespace nad {
namespace cuda {
namespace {

constexpr int64_t kPerItem = kThreads * 8;  // elements of one sample per work item

// partials: null on the default (atomic) path, else one sum per item (0 for uncounted samples).
template <typename scalar_t, typename acc_t>
__global__ void sums_kernel(const scalar_t* __restrict__ m, const scalar_t* __restrict__ o,
                            const bool* __restrict__ counts, const int64_t* __restrict__ ids,
                            acc_t* __restrict__ sums, acc_t* __restrict__ partials, int64_t T,
                            int64_t E, int64_t items, int64_t chunks) {
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const auto work = launch::split_item(item, chunks);
    const int64_t n = work.sample, t = task_of(ids, n, T);
    if (!counts[n]) {  // uniform per block: no thread reaches the barrier
      if (partials && threadIdx.x == 0) partials[item] = 0;
      continue;
    }
    const auto span = launch::chunk_range(work.chunk, kPerItem, E);
    const scalar_t* mr = m + n * E;
    const scalar_t* orow = o + n * E;
    acc_t part = 0;
    for (int64_t e = span.begin + threadIdx.x; e < span.end; e += kThreads) {
      const acc_t d = static_cast<acc_t>(mr[e]) - static_cast<acc_t>(orow[e]);
      part += d * d;
    }
    part = block_sum<acc_t>(part);
    if (threadIdx.x == 0) {
      if (partials) {
        partials[item] = part;
      } else {
        atomicAdd(&sums[t], part);
      }
    }
    __syncthreads();  // block_sum's shared memory is reused by the next item
  }
}

template <typename scalar_t, typename acc_t>
__global__ void apply_kernel(const scalar_t* __restrict__ m, const scalar_t* __restrict__ o,
                             const bool* __restrict__ counts, const int64_t* __restrict__ ids,
                             const acc_t* __restrict__ scale, scalar_t* __restrict__ grad_m,
                             int64_t numel, int64_t T, int64_t E) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < numel;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = i / E, t = task_of(ids, n, T);
    const acc_t k = counts[n] ? scale[t] : acc_t(0);
    grad_m[i] = static_cast<scalar_t>(k * (static_cast<acc_t>(m[i]) - static_cast<acc_t>(o[i])));
  }
}

void sums(const at::Tensor& m, const at::Tensor& o, const at::Tensor& counts,
          const at::Tensor& task_ids, const at::Tensor& out) {
  c10::cuda::CUDAGuard guard(m.device());
  const int64_t N = m.size(0), E = m.size(1), T = out.size(0);
  const int64_t chunks = launch::ceil_div(E, kPerItem), items = N * chunks;
  const bool ordered = deterministic_reductions();
  const auto partials = ordered ? at::empty({items}, out.options()) : at::Tensor();
  const auto blocks = static_cast<unsigned>(launch::blocks_for(items, 1));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "gate_mse_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sums_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        m.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), counts.const_data_ptr<bool>(),
        task_ids.const_data_ptr<int64_t>(), out.data_ptr<acc_t>(),
        ordered ? partials.data_ptr<acc_t>() : nullptr, T, E, items, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (ordered) {
      // Per sample (its chunks in order), then per task (samples in order).
      auto per_sample = at::empty({N}, out.options());
      row_sums_kernel<acc_t><<<static_cast<unsigned>(launch::blocks_for(N, 1)), kThreads, 0, stream>>>(
          partials.const_data_ptr<acc_t>(), N, chunks, per_sample.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      ordered_sum_kernel<acc_t><<<1, 1, 0, stream>>>(per_sample.const_data_ptr<acc_t>(),
                                                     task_ids.const_data_ptr<int64_t>(), N, 1, T, 1,
                                                     out.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void apply(const at::Tensor& m, const at::Tensor& o, const at::Tensor& counts,
           const at::Tensor& task_ids, const at::Tensor& scale, const at::Tensor& grad_m) {
  c10::cuda::CUDAGuard guard(m.device());
  const int64_t numel = m.numel(), E = m.size(1);
  const auto blocks = static_cast<unsigned>(launch::blocks_for(numel, kThreads));
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

NAD_LIBRARY_IMPL(CUDA, m) {
  m.impl("gate_mse", &nad::cuda::gate_mse);
  m.impl("gate_mse_backward", &nad::cuda::gate_mse_backward);
}
