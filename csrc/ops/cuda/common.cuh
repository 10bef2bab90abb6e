#pragma once
// Device helpers shared by the CUDA kernels of csrc/ops/cuda/, and the deterministic reductions'
// second pass.
#include <ATen/Context.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace nad {
namespace cuda {

constexpr int kThreads = 256;  // threads per block of the kernels that use block_sum

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + exp(-v));
}

// Task id of sample n, asserted on the device to lie in [0, T) (see ../task_ids.h).
__device__ __forceinline__ int64_t task_of(const int64_t* __restrict__ ids, int64_t n, int64_t T) {
  const int64_t t = ids[n];
  CUDA_KERNEL_ASSERT(t >= 0 && t < T);
  return t;
}

// Sum over the block (blockDim.x == kThreads); the result is valid in thread 0. A block that
// calls it again (a grid-stride loop) must __syncthreads() in between: `shared` is reused.
// The order of the additions is fixed, so the result is the same on every run.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v) {
  __shared__ acc_t shared[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffff, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? shared[lane] : acc_t(0);
  if (warp == 0)
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffff, v, offset);
  return v;
}

// ---- Deterministic reductions ----
// By default the per-task sums (logits gradients, gate_mse) are added across blocks with float
// atomics: fast, but the order of the additions, hence the last bits, vary from run to run.
// Under torch.use_deterministic_algorithms(True) the first pass writes one partial sum per
// (work item, column) instead, and the second pass below adds them in a fixed order.
inline bool deterministic_reductions() { return at::globalContext().deterministicAlgorithms(); }

// sums[t, c] += partials[r, c] over the work items r = 0, 1, ... in order, with
// t = task_ids[r / per_sample] (items run sample-major, per_sample items per sample). One thread
// per column c; consecutive items of one task are summed in a register first.
template <typename acc_t>
__global__ void ordered_sum_kernel(const acc_t* __restrict__ partials, const int64_t* __restrict__ ids,
                                   int64_t items, int64_t per_sample, int64_t T, int64_t C,
                                   acc_t* __restrict__ sums) {
  for (int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; c < C;
       c += (int64_t)gridDim.x * blockDim.x) {
    int64_t run_task = -1;
    acc_t run = 0;
    for (int64_t r = 0; r < items; ++r) {
      const int64_t t = task_of(ids, r / per_sample, T);
      if (t != run_task) {
        if (run_task >= 0) sums[run_task * C + c] += run;
        run_task = t;
        run = 0;
      }
      run += partials[r * C + c];
    }
    if (run_task >= 0) sums[run_task * C + c] += run;
  }
}

// out[r] = sum of in[r, 0..cols), one block (kThreads) per row, in a fixed order.
template <typename acc_t>
__global__ void row_sums_kernel(const acc_t* __restrict__ in, int64_t rows, int64_t cols,
                                acc_t* __restrict__ out) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    acc_t v = 0;
    for (int64_t k = threadIdx.x; k < cols; k += kThreads) v += in[r * cols + k];
    v = block_sum<acc_t>(v);
    if (threadIdx.x == 0) out[r] = v;
    __syncthreads();
  }
}

}  // namespace cuda
}  // namespace nad
