// CUDA kernels of nad::task_gate. Both (N, C, ...) contiguous and channels_last (N, H, W, C in
// memory) layouts are handled natively; other layouts are made contiguous first. The gate
// gradient is reduced in float32 (float64 for float64 inputs) and added per task with atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../task_gate.h"
#include "common.cuh"

namespace nad {
namespace cuda {
namespace {

// Forward. channels_inner: memory order (N, S, C) instead of (N, C, S).
template <typename scalar_t, typename acc_t, typename logit_t>
__global__ void task_gate_forward_kernel(const scalar_t* __restrict__ x,
                                         const logit_t* __restrict__ logits,
                                         const int64_t* __restrict__ task_ids,
                                         scalar_t* __restrict__ y, int64_t numel, int64_t T,
                                         int64_t C, int64_t S, bool channels_inner) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < numel;
       i += (int64_t)gridDim.x * blockDim.x) {
    int64_t n, c;
    if (channels_inner) {
      c = i % C;
      n = i / (C * S);
    } else {
      c = (i / S) % C;
      n = i / (C * S);
    }
    const acc_t g = sigmoid<acc_t>(static_cast<acc_t>(logits[task_of(task_ids, n, T) * C + c]));
    y[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * g);
  }
}

// Backward, (N, C, S) layout: one block per (n, c) row.
template <typename scalar_t, typename acc_t, typename logit_t>
__global__ void task_gate_backward_rows_kernel(const scalar_t* __restrict__ grad_y,
                                               const scalar_t* __restrict__ x,
                                               const logit_t* __restrict__ logits,
                                               const int64_t* __restrict__ task_ids,
                                               scalar_t* __restrict__ grad_x,
                                               acc_t* __restrict__ grad_logits, int64_t T,
                                               int64_t C, int64_t S) {
  const int64_t row = blockIdx.x;
  const int64_t n = row / C, c = row % C;
  const int64_t t = task_of(task_ids, n, T);
  const acc_t g = sigmoid<acc_t>(static_cast<acc_t>(logits[t * C + c]));
  const int64_t off = row * S;
  acc_t dot = 0;
  for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
    const acc_t gy = static_cast<acc_t>(grad_y[off + s]);
    grad_x[off + s] = static_cast<scalar_t>(gy * g);
    dot += gy * static_cast<acc_t>(x[off + s]);
  }
  dot = block_sum<acc_t>(dot);
  if (threadIdx.x == 0) atomicAdd(&grad_logits[t * C + c], dot * g * (acc_t(1) - g));
}

// Backward, (N, S, C) layout: a thread per (n, c), looping over space; neighbouring threads
// read neighbouring channels, so the loads are coalesced.
template <typename scalar_t, typename acc_t, typename logit_t>
__global__ void task_gate_backward_inner_kernel(const scalar_t* __restrict__ grad_y,
                                                const scalar_t* __restrict__ x,
                                                const logit_t* __restrict__ logits,
                                                const int64_t* __restrict__ task_ids,
                                                scalar_t* __restrict__ grad_x,
                                                acc_t* __restrict__ grad_logits, int64_t N,
                                                int64_t T, int64_t C, int64_t S) {
  const int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (idx >= N * C) return;
  const int64_t n = idx / C, c = idx % C;
  const int64_t t = task_of(task_ids, n, T);
  const acc_t g = sigmoid<acc_t>(static_cast<acc_t>(logits[t * C + c]));
  acc_t dot = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t i = (n * S + s) * C + c;
    const acc_t gy = static_cast<acc_t>(grad_y[i]);
    grad_x[i] = static_cast<scalar_t>(gy * g);
    dot += gy * static_cast<acc_t>(x[i]);
  }
  atomicAdd(&grad_logits[t * C + c], dot * g * (acc_t(1) - g));
}

// Picks the memory layout the kernels work in; returns x in that layout.
at::Tensor layout_of(const at::Tensor& x, bool& channels_inner) {
  channels_inner = x.dim() == 4 && !x.is_contiguous() &&
                   x.is_contiguous(at::MemoryFormat::ChannelsLast);
  return channels_inner ? x : x.contiguous();
}

int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535LL * 8));
}

}  // namespace

at::Tensor task_gate(const at::Tensor& x_in, const at::Tensor& logits_in,
                     const at::Tensor& task_ids_in) {
  check_task_gate_args(x_in, logits_in, task_ids_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  bool inner = false;
  const auto x = layout_of(x_in, inner);
  const auto logits = logits_in.contiguous();
  const auto ids = task_ids_in.contiguous();
  auto y = at::empty_like(x);  // keeps x's memory format
  const int64_t N = x.size(0), C = x.size(1), numel = x.numel();
  if (numel == 0) return y;
  const int64_t S = numel / (N * C);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "task_gate_cuda", [&] {
    using x_t = scalar_t;
    using acc_t = at::opmath_type<x_t>;
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "task_gate_cuda_logits", [&] {
      task_gate_forward_kernel<x_t, acc_t, scalar_t><<<blocks_for(numel), kThreads, 0, stream>>>(
          x.const_data_ptr<x_t>(), logits.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
          y.data_ptr<x_t>(), numel, logits.size(0), C, S, inner);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> task_gate_backward(const at::Tensor& grad_y_in,
                                                      const at::Tensor& x_in,
                                                      const at::Tensor& logits_in,
                                                      const at::Tensor& task_ids_in) {
  check_task_gate_args(x_in, logits_in, task_ids_in);
  TORCH_CHECK(grad_y_in.sizes() == x_in.sizes(),
              "task_gate_backward: grad_y must have the shape of x ", x_in.sizes(), ", got ",
              grad_y_in.sizes());
  c10::cuda::CUDAGuard guard(x_in.device());
  bool inner = false;
  const auto x = layout_of(x_in, inner);
  const auto grad_y = inner ? grad_y_in.to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast)
                            : grad_y_in.to(x.scalar_type()).contiguous();
  const auto logits = logits_in.contiguous();
  const auto ids = task_ids_in.contiguous();
  auto grad_x = at::empty_like(x);
  const int64_t N = x.size(0), C = x.size(1), numel = x.numel();
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto grad_acc = at::zeros(logits.sizes(), logits.options().dtype(acc_type));
  if (numel > 0) {
    const int64_t S = numel / (N * C);
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "task_gate_backward_cuda", [&] {
      using x_t = scalar_t;
      using acc_t = at::opmath_type<x_t>;
      AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "task_gate_backward_cuda_logits", [&] {
        if (inner) {
          task_gate_backward_inner_kernel<x_t, acc_t, scalar_t>
              <<<blocks_for(N * C), kThreads, 0, stream>>>(
                  grad_y.const_data_ptr<x_t>(), x.const_data_ptr<x_t>(),
                  logits.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
                  grad_x.data_ptr<x_t>(), grad_acc.data_ptr<acc_t>(), N, logits.size(0), C, S);
        } else {
          task_gate_backward_rows_kernel<x_t, acc_t, scalar_t>
              <<<static_cast<unsigned>(N * C), kThreads, 0, stream>>>(
                  grad_y.const_data_ptr<x_t>(), x.const_data_ptr<x_t>(),
                  logits.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
                  grad_x.data_ptr<x_t>(), grad_acc.data_ptr<acc_t>(), logits.size(0), C, S);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {grad_x, grad_acc.to(logits_in.scalar_type())};
}

}  // namespace cuda
}  // namespace nad

TORCH_LIBRARY_IMPL(nad, CUDA, m) {
  m.impl("task_gate", &nad::cuda::task_gate);
  m.impl("task_gate_backward", &nad::cuda::task_gate_backward);
}
