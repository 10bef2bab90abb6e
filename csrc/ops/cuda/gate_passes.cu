// CUDA kernels of the gate passes (../gate_passes.h), and with them the CUDA registration of
// nad::task_gate and nad::masked_conv2d (../gate_ops.h).
//
// forward: one elementwise grid-stride pass (either layout).
// backward: one read of grad_y and act writes grad_in (when wanted) and reduces grad_y * act per
// (n, c) into the per-task gate sums. The kernel depends on the layout and the row length S:
// - (N, C, S), S >= 256: a block of 256 threads per (n, c) row, grid-stride over rows;
// - (N, C, S), S < 256: a group of 1 to 32 lanes per row (the smallest power of two >= S, a warp
//   at most), several rows per warp, so that small maps and fully connected gate points (S = 1)
//   keep every thread busy;
// - channels_last (N, S, C): tiles of 32 channels x 8 positions over chunks of 256 positions
//   (neighbouring threads read neighbouring channels: coalesced), the 8 partial sums of a channel
//   meet in shared memory; the grid-stride loop runs over (sample, chunk) items, so neither the
//   batch nor the map size has a limit.
// Each (row or item, channel) sum is added to its task with a float atomic, or, under
// torch.use_deterministic_algorithms(True), written as a partial sum and added in a fixed order
// by ordered_sum_kernel (common.cuh).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../gate_ops.h"
#include "../gate_passes.h"
#include "../launch.h"
#include "../registration.h"
#include "common.cuh"

namespace nad {
namespace cuda {
namespace {

static_assert(launch::kRowBlock == kThreads, "rows_block_kernel reduces with block_sum");

// channels_inner: memory order (N, S, C) instead of (N, C, S). bias and act may be null.
template <typename scalar_t, typename acc_t, typename logit_t>
__global__ void forward_kernel(const scalar_t* __restrict__ src, const scalar_t* __restrict__ bias,
                               const logit_t* __restrict__ logits, const int64_t* __restrict__ ids,
                               scalar_t* __restrict__ y, scalar_t* __restrict__ act, int64_t numel,
                               int64_t T, int64_t C, int64_t S, bool relu, bool channels_inner) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < numel;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t c = channels_inner ? i % C : (i / S) % C;
    const int64_t n = i / (C * S);
    acc_t v = static_cast<acc_t>(src[i]) + (bias ? static_cast<acc_t>(bias[c]) : acc_t(0));
    if (relu && !(v > acc_t(0))) v = acc_t(0);
    const scalar_t a = static_cast<scalar_t>(v);
    if (act) act[i] = a;
    const acc_t g = sigmoid<acc_t>(static_cast<acc_t>(logits[task_of(ids, n, T) * C + c]));
    y[i] = static_cast<scalar_t>(g * static_cast<acc_t>(a));
  }
}

// What every backward kernel needs. grad_in may be null (not wanted); partials is null on the
// default (atomic) path, else (items, C) partial sums for ordered_sum_kernel.
template <typename scalar_t, typename acc_t, typename logit_t>
struct Backward {
  const scalar_t* grad_y;
  const scalar_t* act;
  scalar_t* grad_in;
  const logit_t* logits;
  const int64_t* ids;
  int64_t T, C, S;
  bool relu;
  acc_t* sums;
  acc_t* partials;

  __device__ __forceinline__ acc_t gate(int64_t t, int64_t c) const {
    return sigmoid<acc_t>(static_cast<acc_t>(logits[t * C + c]));
  }
  // grad_in at element i; returns grad_y * act there.
  __device__ __forceinline__ acc_t element(int64_t i, acc_t g) const {
    const acc_t gy = static_cast<acc_t>(grad_y[i]), a = static_cast<acc_t>(act[i]);
    if (grad_in) grad_in[i] = static_cast<scalar_t>(!relu || a > acc_t(0) ? gy * g : acc_t(0));
    return gy * a;
  }
  // The sum of work item `item` (task t) at channel c.
  __device__ __forceinline__ void add(int64_t item, int64_t t, int64_t c, acc_t v) const {
    if (partials) {
      partials[item * C + c] = v;
    } else {
      atomicAdd(&sums[t * C + c], v);
    }
  }
};

// (N, C, S), S >= kRowBlock: a block per row. Work item = sample n (partials (N, C)).
template <typename scalar_t, typename acc_t, typename logit_t>
__global__ void __launch_bounds__(launch::kRowBlock)
    rows_block_kernel(Backward<scalar_t, acc_t, logit_t> p, int64_t rows) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t n = row / p.C, c = row % p.C, t = task_of(p.ids, n, p.T);
    const acc_t g = p.gate(t, c);
    acc_t dot = 0;
    for (int64_t s = threadIdx.x; s < p.S; s += launch::kRowBlock) dot += p.element(row * p.S + s, g);
    dot = block_sum<acc_t>(dot);
    if (threadIdx.x == 0) p.add(n, t, c, dot);
    __syncthreads();  // block_sum's shared memory is reused by the next row
  }
}

// (N, C, S), S < kRowBlock: 2^log2_lanes lanes per row, 32 >> log2_lanes rows per warp. The loop
// runs per warp (every lane takes the same trips), so the shuffles see the whole warp.
template <typename scalar_t, typename acc_t, typename logit_t>
__global__ void __launch_bounds__(launch::kRowBlock)
    rows_group_kernel(Backward<scalar_t, acc_t, logit_t> p, int64_t rows, int log2_lanes) {
  const int lanes = 1 << log2_lanes, lane = threadIdx.x % 32, sub = lane & (lanes - 1);
  const int64_t rows_per_warp = 32 >> log2_lanes;
  const int64_t warp = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32;
  const int64_t warps = (int64_t)gridDim.x * blockDim.x / 32;
  for (int64_t first = warp * rows_per_warp; first < rows; first += warps * rows_per_warp) {
    const int64_t row = first + (lane >> log2_lanes);
    const bool valid = row < rows;
    int64_t n = 0, c = 0, t = 0;
    acc_t dot = 0;
    if (valid) {
      n = row / p.C;
      c = row % p.C;
      t = task_of(p.ids, n, p.T);
      const acc_t g = p.gate(t, c);
      for (int64_t s = sub; s < p.S; s += lanes) dot += p.element(row * p.S + s, g);
    }
    for (int offset = lanes / 2; offset > 0; offset >>= 1)
      dot += __shfl_down_sync(0xffffffffu, dot, offset, lanes);
    if (valid && sub == 0) p.add(n, t, c, dot);
  }
}

// channels_last (N, S, C): block (kInnerC channels) x (kInnerS positions) over one chunk of
// kInnerChunk positions of one sample. Work item = (sample, chunk), sample-major.
constexpr int kInnerC = 32, kInnerS = 8, kInnerChunk = 256;
template <typename scalar_t, typename acc_t, typename logit_t>
__global__ void __launch_bounds__(kInnerC * kInnerS)
    inner_kernel(Backward<scalar_t, acc_t, logit_t> p, int64_t items, int64_t chunks) {
  __shared__ acc_t partial[kInnerS][kInnerC];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = blockIdx.x * (int64_t)kInnerC + tx;
  for (int64_t item = blockIdx.y; item < items; item += gridDim.y) {
    const auto work = launch::split_item(item, chunks);
    const auto span = launch::chunk_range(work.chunk, kInnerChunk, p.S);
    const int64_t n = work.sample, t = task_of(p.ids, n, p.T);
    acc_t dot = 0;
    if (c < p.C) {
      const acc_t g = p.gate(t, c);
      for (int64_t s = span.begin + ty; s < span.end; s += kInnerS) dot += p.element((n * p.S + s) * p.C + c, g);
    }
    partial[ty][tx] = dot;
    __syncthreads();
    if (ty == 0 && c < p.C) {
      for (int k = 1; k < kInnerS; ++k) dot += partial[k][tx];
      p.add(item, t, c, dot);
    }
    __syncthreads();  // partial is reused by the next item
  }
}

}  // namespace

void gate_forward(const at::Tensor& src, const at::Tensor& bias, const at::Tensor& logits,
                  const at::Tensor& task_ids, bool relu, bool inner, const at::Tensor& y,
                  const at::Tensor& act) {
  c10::cuda::CUDAGuard guard(src.device());
  const int64_t N = src.size(0), C = src.size(1), numel = src.numel(), S = numel / (N * C);
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto blocks = static_cast<unsigned>(launch::blocks_for(numel, kThreads));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "gate_forward_cuda", [&] {
    using x_t = scalar_t;
    using acc_t = at::opmath_type<x_t>;
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "gate_forward_cuda_logits", [&] {
      forward_kernel<x_t, acc_t, scalar_t><<<blocks, kThreads, 0, stream>>>(
          src.const_data_ptr<x_t>(), bias.defined() ? bias.const_data_ptr<x_t>() : nullptr,
          logits.const_data_ptr<scalar_t>(), task_ids.const_data_ptr<int64_t>(), y.data_ptr<x_t>(),
          act.defined() ? act.data_ptr<x_t>() : nullptr, numel, logits.size(0), C, S, relu, inner);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void gate_backward(const at::Tensor& grad_y, const at::Tensor& act, const at::Tensor& logits,
                   const at::Tensor& task_ids, bool relu, bool inner, const at::Tensor& grad_in,
                   const at::Tensor& gate_sums) {
  c10::cuda::CUDAGuard guard(act.device());
  const int64_t N = act.size(0), C = act.size(1), S = act.numel() / (N * C), T = logits.size(0);
  const bool ordered = deterministic_reductions();
  // Work items: samples for the row kernels, (sample, chunk) pairs for the channels_last one.
  const int64_t chunks = inner ? launch::ceil_div(S, kInnerChunk) : 1, items = N * chunks;
  TORCH_CHECK(launch::ceil_div(C, kInnerC) <= INT32_MAX, "gate backward: too many channels (", C, ")");
  const auto partials = ordered ? at::empty({items, C}, gate_sums.options()) : at::Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, act.scalar_type(), "gate_backward_cuda", [&] {
    using x_t = scalar_t;
    using acc_t = at::opmath_type<x_t>;
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "gate_backward_cuda_logits", [&] {
      const Backward<x_t, acc_t, scalar_t> p{
          grad_y.const_data_ptr<x_t>(), act.const_data_ptr<x_t>(),
          grad_in.defined() ? grad_in.data_ptr<x_t>() : nullptr, logits.const_data_ptr<scalar_t>(),
          task_ids.const_data_ptr<int64_t>(), T, C, S, relu, gate_sums.data_ptr<acc_t>(),
          ordered ? partials.data_ptr<acc_t>() : nullptr};
      if (inner) {
        const dim3 grid(static_cast<unsigned>(launch::ceil_div(C, kInnerC)),
                        static_cast<unsigned>(std::min(items, launch::kMaxGridY)));
        inner_kernel<<<grid, dim3(kInnerC, kInnerS), 0, stream>>>(p, items, chunks);
      } else {
        const int lanes = launch::lanes_per_row(S);
        if (lanes == launch::kRowBlock) {
          const auto blocks = static_cast<unsigned>(launch::blocks_for(N * C, 1));
          rows_block_kernel<<<blocks, launch::kRowBlock, 0, stream>>>(p, N * C);
        } else {
          int log2_lanes = 0;
          while ((1 << log2_lanes) < lanes) ++log2_lanes;
          const auto blocks = static_cast<unsigned>(launch::blocks_for(N * C, launch::kRowBlock / lanes));
          rows_group_kernel<<<blocks, launch::kRowBlock, 0, stream>>>(p, N * C, log2_lanes);
        }
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (ordered) {
      const auto blocks = static_cast<unsigned>(launch::blocks_for(C, kThreads));
      ordered_sum_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(
          partials.const_data_ptr<acc_t>(), task_ids.const_data_ptr<int64_t>(), items, chunks, T, C,
          gate_sums.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace cuda
}  // namespace nad

// nad::task_gate and nad::masked_conv2d on this backend: the host code around these passes.
NAD_LIBRARY_IMPL(CUDA, m) {
  nad::GateOps<&nad::cuda::gate_forward, &nad::cuda::gate_backward>::register_kernels(m);
}
