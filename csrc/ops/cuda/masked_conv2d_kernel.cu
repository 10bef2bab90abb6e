// CUDA kernels of nad::masked_conv2d: the fused epilogue (one elementwise pass writing y and,
// for training, act) and the fused backward pass (grad_pre and the per-task gate sums in one
// read of grad_y and act). The convolutions are ATen's (cuDNN), see ../masked_conv2d.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../masked_conv2d.h"
#include "common.cuh"

namespace nad {
namespace cuda {
namespace {

int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535LL * 8));
}

// channels_inner: memory order (N, S, C) instead of (N, C, S). act may be null (inference).
template <typename scalar_t, typename acc_t, typename logit_t>
__global__ void epilogue_kernel(const scalar_t* __restrict__ conv, const scalar_t* __restrict__ bias,
                                const logit_t* __restrict__ logits, const int64_t* __restrict__ ids,
                                scalar_t* __restrict__ y, scalar_t* __restrict__ act, int64_t numel,
                                int64_t T, int64_t C, int64_t S, bool relu, bool channels_inner) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < numel;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t c = channels_inner ? i % C : (i / S) % C;
    const int64_t n = i / (C * S);
    acc_t v = static_cast<acc_t>(conv[i]) + (bias ? static_cast<acc_t>(bias[c]) : acc_t(0));
    if (relu && !(v > acc_t(0))) v = acc_t(0);
    const scalar_t a = static_cast<scalar_t>(v);
    if (act) act[i] = a;
    const acc_t g = sigmoid<acc_t>(static_cast<acc_t>(logits[task_of(ids, n, T) * C + c]));
    y[i] = static_cast<scalar_t>(g * static_cast<acc_t>(a));
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t backward_one(const scalar_t* grad_y, const scalar_t* act,
                                              scalar_t* grad_pre, int64_t i, acc_t g, bool relu) {
  const acc_t gy = static_cast<acc_t>(grad_y[i]), a = static_cast<acc_t>(act[i]);
  grad_pre[i] = static_cast<scalar_t>(!relu || a > acc_t(0) ? gy * g : acc_t(0));
  return gy * a;
}

// (N, C, S) layout: one block per (n, c) row.
template <typename scalar_t, typename acc_t, typename logit_t>
__global__ void backward_rows_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ act,
                                     const logit_t* __restrict__ logits, const int64_t* __restrict__ ids,
                                     scalar_t* __restrict__ grad_pre, acc_t* __restrict__ sums,
                                     int64_t T, int64_t C, int64_t S, bool relu) {
  const int64_t row = blockIdx.x, n = row / C, c = row % C, t = task_of(ids, n, T);
  const acc_t g = sigmoid<acc_t>(static_cast<acc_t>(logits[t * C + c]));
  acc_t dot = 0;
  for (int64_t s = threadIdx.x; s < S; s += blockDim.x)
    dot += backward_one<scalar_t, acc_t>(grad_y, act, grad_pre, row * S + s, g, relu);
  dot = block_sum<acc_t>(dot);
  if (threadIdx.x == 0) atomicAdd(&sums[t * C + c], dot);
}

// (N, S, C) layout: block (32 channels) x (8 rows of space) over one sample n = blockIdx.y and
// one chunk of space (blockIdx.z); the 8 partial sums per channel meet in shared memory.
constexpr int kInnerC = 32, kInnerS = 8, kInnerChunk = 256;
template <typename scalar_t, typename acc_t, typename logit_t>
__global__ void backward_inner_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ act,
                                      const logit_t* __restrict__ logits, const int64_t* __restrict__ ids,
                                      scalar_t* __restrict__ grad_pre, acc_t* __restrict__ sums,
                                      int64_t T, int64_t C, int64_t S, bool relu) {
  __shared__ acc_t partial[kInnerS][kInnerC];
  const int64_t c = blockIdx.x * (int64_t)kInnerC + threadIdx.x, n = blockIdx.y, t = task_of(ids, n, T);
  const int64_t chunk_end = (blockIdx.z + 1) * (int64_t)kInnerChunk;
  const int64_t s_end = chunk_end < S ? chunk_end : S;
  acc_t dot = 0;
  if (c < C) {
    const acc_t g = sigmoid<acc_t>(static_cast<acc_t>(logits[t * C + c]));
    for (int64_t s = blockIdx.z * (int64_t)kInnerChunk + threadIdx.y; s < s_end; s += kInnerS)
      dot += backward_one<scalar_t, acc_t>(grad_y, act, grad_pre, (n * S + s) * C + c, g, relu);
  }
  partial[threadIdx.y][threadIdx.x] = dot;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int k = 1; k < kInnerS; ++k) dot += partial[k][threadIdx.x];
    atomicAdd(&sums[t * C + c], dot);
  }
}

void epilogue(const at::Tensor& conv, const at::Tensor& bias, const at::Tensor& logits,
              const at::Tensor& task_ids, bool relu, bool inner, const at::Tensor& y,
              const at::Tensor& act) {
  c10::cuda::CUDAGuard guard(conv.device());
  const int64_t N = conv.size(0), C = conv.size(1), numel = conv.numel(), S = numel / (N * C);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, conv.scalar_type(), "masked_conv2d_cuda", [&] {
    using x_t = scalar_t;
    using acc_t = at::opmath_type<x_t>;
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "masked_conv2d_cuda_logits", [&] {
      epilogue_kernel<x_t, acc_t, scalar_t><<<blocks_for(numel), kThreads, 0, stream>>>(
          conv.const_data_ptr<x_t>(), bias.defined() ? bias.const_data_ptr<x_t>() : nullptr,
          logits.const_data_ptr<scalar_t>(), task_ids.const_data_ptr<int64_t>(), y.data_ptr<x_t>(),
          act.defined() ? act.data_ptr<x_t>() : nullptr, numel, logits.size(0), C, S, relu, inner);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void backward_pass(const at::Tensor& grad_y, const at::Tensor& act, const at::Tensor& logits,
                   const at::Tensor& task_ids, bool relu, bool inner, const at::Tensor& grad_pre,
                   const at::Tensor& gate_sums) {
  c10::cuda::CUDAGuard guard(act.device());
  const int64_t N = act.size(0), C = act.size(1), S = act.numel() / (N * C);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, act.scalar_type(), "masked_conv2d_backward_cuda", [&] {
    using x_t = scalar_t;
    using acc_t = at::opmath_type<x_t>;
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "masked_conv2d_backward_cuda_logits", [&] {
      if (inner) {
        TORCH_CHECK(N <= 65535, "masked_conv2d_backward: batch larger than 65535 is not supported");
        const dim3 block(kInnerC, kInnerS);
        const dim3 grid((C + kInnerC - 1) / kInnerC, N, (S + kInnerChunk - 1) / kInnerChunk);
        backward_inner_kernel<x_t, acc_t, scalar_t><<<grid, block, 0, stream>>>(
            grad_y.const_data_ptr<x_t>(), act.const_data_ptr<x_t>(), logits.const_data_ptr<scalar_t>(),
            task_ids.const_data_ptr<int64_t>(), grad_pre.data_ptr<x_t>(), gate_sums.data_ptr<acc_t>(),
            logits.size(0), C, S, relu);
      } else {
        backward_rows_kernel<x_t, acc_t, scalar_t><<<static_cast<unsigned>(N * C), kThreads, 0, stream>>>(
            grad_y.const_data_ptr<x_t>(), act.const_data_ptr<x_t>(), logits.const_data_ptr<scalar_t>(),
            task_ids.const_data_ptr<int64_t>(), grad_pre.data_ptr<x_t>(), gate_sums.data_ptr<acc_t>(),
            logits.size(0), C, S, relu);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

at::Tensor masked_conv2d(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const at::Tensor& logits,
                         const at::Tensor& task_ids, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups, bool relu) {
  return std::get<0>(masked_conv2d_forward_with(&epilogue, x, weight, bias, logits, task_ids, stride,
                                                padding, dilation, groups, relu, false));
}

std::tuple<at::Tensor, at::Tensor> masked_conv2d_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& logits, const at::Tensor& task_ids, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  return masked_conv2d_forward_with(&epilogue, x, weight, bias, logits, task_ids, stride, padding,
                                    dilation, groups, relu, true);
}

std::tuple<at::Tensor, at::Tensor> masked_conv2d_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& act,
    const at::Tensor& logits, const at::Tensor& task_ids, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu, bool x_grad) {
  return masked_conv2d_backward_with(&backward_pass, grad_y, x, weight, act, logits, task_ids,
                                     stride, padding, dilation, groups, relu, x_grad);
}

}  // namespace cuda
}  // namespace nad

TORCH_LIBRARY_IMPL(nad, CUDA, m) {
  m.impl("masked_conv2d", &nad::cuda::masked_conv2d);
  m.impl("masked_conv2d_forward", &nad::cuda::masked_conv2d_forward);
  m.impl("masked_conv2d_backward", &nad::cuda::masked_conv2d_backward);
}
