#pragma once
// Device helpers shared by the CUDA kernels of csrc/ops/cuda/.
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

// Sum over the block (blockDim.x == kThreads); the result is valid in thread 0.
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

}  // namespace cuda
}  // namespace nad
