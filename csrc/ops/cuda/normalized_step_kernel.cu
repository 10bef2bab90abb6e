// CUDA kernel of nad::normalized_gradient_step_: one launch covers every (gate point, task) row
// of up to kMaxLayers gate points (more are done in further launches). The per-layer pointers,
// widths and strides travel in a kernel-argument struct (as in PyTorch's multi_tensor_apply),
// so there is no host-to-device copy and no sync; one block per row: norm, then update (the
// rules for tiny, zero and non-finite norms are ../normalized_step.h's, as on the CPU).
// The task ids are marked in a (T,) mask by select_kernel, which asserts 0 <= t < T on the
// device (ATen's index_fill_ would accept -T <= t < 0 and update row T + t).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../launch.h"
#include "../normalized_step.h"
#include "../registration.h"
#include "common.cuh"

namespace nad {
namespace cuda {
namespace {

constexpr int kMaxLayers = 48;  // 48 x 40 bytes: well inside the 4 KB kernel-argument limit

template <typename scalar_t>
struct Layers {
  scalar_t* logits[kMaxLayers];
  const scalar_t* grads[kMaxLayers];
  int64_t width[kMaxLayers], stride0[kMaxLayers], stride1[kMaxLayers];
};

__global__ void select_kernel(const int64_t* __restrict__ tasks, int64_t K, int64_t T,
                              bool* __restrict__ selected) {
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < K;
       k += (int64_t)gridDim.x * blockDim.x)
    selected[task_of(tasks, k, T)] = true;  // duplicates write the same value
}

template <typename scalar_t>
__global__ void step_kernel(Layers<scalar_t> layers, const bool* __restrict__ selected, scalar_t lr) {
  const int64_t t = blockIdx.x;
  if (!selected[t]) return;  // uniform per block
  const int l = blockIdx.y;
  const int64_t C = layers.width[l];
  const scalar_t* g = layers.grads[l] + t * C;
  // The squared norm in step_acc_t (double), as on the CPU, whatever the logits' dtype.
  step_acc_t sq = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) sq += static_cast<step_acc_t>(g[c]) * g[c];
  sq = block_sum<step_acc_t>(sq);
  __shared__ scalar_t norm;
  if (threadIdx.x == 0) norm = static_cast<scalar_t>(sqrt(sq));
  __syncthreads();
  // A zero or non-finite norm (a NaN or Inf in the gradient) leaves the row unchanged (uniform
  // per block: every thread reads the same shared norm).
  const bool finite = norm - norm == 0;  // false for NaN and Inf
  if (!(norm > 0) || !finite) return;
  const scalar_t eps = static_cast<scalar_t>(kStepEps), denom = norm < eps ? eps : norm;
  scalar_t* m = layers.logits[l] + t * layers.stride0[l];
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) m[c * layers.stride1[l]] -= lr * (g[c] / denom);
}

}  // namespace

void normalized_gradient_step_(at::TensorList logits, at::TensorList grads, const at::Tensor& tasks,
                               double lr) {
  check_normalized_step_args(logits, grads, tasks);
  c10::cuda::CUDAGuard guard(tasks.device());
  const int64_t T = logits[0].size(0), L = static_cast<int64_t>(logits.size()), K = tasks.numel();
  TORCH_CHECK(T <= INT32_MAX, "normalized_gradient_step_: too many tasks");
  if (T == 0 || K == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto ids = tasks.contiguous();
  auto sel = at::zeros({T}, tasks.options().dtype(at::kBool));
  select_kernel<<<static_cast<unsigned>(launch::blocks_for(K, kThreads)), kThreads, 0, stream>>>(
      ids.const_data_ptr<int64_t>(), K, T, sel.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  std::vector<at::Tensor> g(grads.begin(), grads.end());
  for (auto& x : g) x = x.contiguous();  // kept alive until the launches are queued
  AT_DISPATCH_FLOATING_TYPES(logits[0].scalar_type(), "normalized_gradient_step_cuda", [&] {
    for (int64_t l0 = 0; l0 < L; l0 += kMaxLayers) {
      const int64_t count = std::min<int64_t>(kMaxLayers, L - l0);
      Layers<scalar_t> layers{};
      for (int64_t k = 0; k < count; ++k) {
        const auto& m = logits[l0 + k];
        layers.logits[k] = m.data_ptr<scalar_t>();
        layers.grads[k] = g[l0 + k].const_data_ptr<scalar_t>();
        layers.width[k] = m.size(1);
        layers.stride0[k] = m.stride(0);
        layers.stride1[k] = m.stride(1);
      }
      step_kernel<scalar_t><<<dim3(static_cast<unsigned>(T), static_cast<unsigned>(count)), kThreads, 0, stream>>>(
          layers, sel.const_data_ptr<bool>(), static_cast<scalar_t>(lr));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace cuda
}  // namespace nad

NAD_LIBRARY_IMPL(CUDA, m) {
  m.impl("normalized_gradient_step_", &nad::cuda::normalized_gradient_step_);
}
