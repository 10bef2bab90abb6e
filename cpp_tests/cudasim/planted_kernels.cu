// Kernels for cudasim's self-test (selftest.cpp), written as CUDA and rewritten like the real
// ones: some exercise the semantics the real kernels rely on, the others carry a planted bug
// that the simulator must catch. Each launcher runs one kernel on host buffers.
#include <cstdint>

namespace planted {

constexpr int kThreads = 256;

// ---- correct kernels: the semantics ----

// block_sum as in csrc/ops/cuda/common.cuh: warp shuffles, then one warp sums the warp sums.
__device__ float block_sum(float v) {
  __shared__ float shared[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffff, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? shared[lane] : 0.f;
  if (warp == 0)
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffff, v, offset);
  return v;
}

__global__ void block_sums(const float* in, int64_t n, float* out) {
  float v = 0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    v += in[i];
  v = block_sum(v);
  if (threadIdx.x == 0) out[blockIdx.x] = v;
}

// Every lane writes what each shuffle and vote gives it: 8 values per lane.
__global__ void warp_semantics(const int* in, int width, int arg, int* out) {
  const int lane = threadIdx.x;
  const int v = in[lane];
  int* o = out + 8 * lane;
  o[0] = __shfl_sync(0xffffffff, v, arg, width);
  o[1] = __shfl_up_sync(0xffffffff, v, arg, width);
  o[2] = __shfl_down_sync(0xffffffff, v, arg, width);
  o[3] = __shfl_xor_sync(0xffffffff, v, arg, width);
  o[4] = static_cast<int>(__ballot_sync(0xffffffff, v % 3 == 0));
  o[5] = __any_sync(0xffffffff, v == 7);
  o[6] = __all_sync(0xffffffff, v >= 0);
  o[7] = __popc(static_cast<unsigned>(v)) + __popcll(static_cast<unsigned long long>(v) << 40);
}

// Two half-warps shuffle under disjoint masks at the same time.
__global__ void half_warps(const int* in, int* out) {
  const int lane = threadIdx.x;
  const unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  out[lane] = __shfl_xor_sync(mask, in[lane], 1);
}

// Each thread writes its slot, then reads its neighbour's after the barrier.
__global__ void shared_exchange(int* out) {
  __shared__ int slots[kThreads];
  slots[threadIdx.x] = static_cast<int>(threadIdx.x) * 3 + static_cast<int>(blockIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = slots[(threadIdx.x + 1) % blockDim.x];
}

// 2-D grid and block indices.
__global__ void indices(int* out) {
  const int64_t block = blockIdx.y * gridDim.x + blockIdx.x;
  const int64_t thread = threadIdx.y * blockDim.x + threadIdx.x;
  out[block * blockDim.x * blockDim.y + thread] =
      static_cast<int>(blockIdx.x * 1000000 + blockIdx.y * 10000 + threadIdx.x * 100 + threadIdx.y);
}

__global__ void atomic_sum(const float* in, int64_t n, float* total) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    atomicAdd(total, in[i]);
}

__global__ void checked_gather(const int64_t* ids, int64_t n, int64_t T, const float* table, float* out) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i < n) {
    const int64_t t = ids[i];
    CUDA_KERNEL_ASSERT(t >= 0 && t < T);
    out[i] = table[t];
  }
}

// ---- planted bugs ----

// block_sum without the __syncthreads between writing and reading the warp sums.
__global__ void block_sums_missing_sync(const float* in, int64_t n, float* out) {
  __shared__ float shared[kThreads / 32];
  float v = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v += in[i];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffff, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = v;
  v = threadIdx.x < blockDim.x / 32 ? shared[lane] : 0.f;  // BUG: no __syncthreads before
  if (warp == 0)
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffff, v, offset);
  if (threadIdx.x == 0) out[0] = v;
}

// Thread 0 publishes a value that the others read without a barrier: the forward schedule runs
// thread 0 first and hides the race, the reversed one shows it.
__global__ void broadcast_without_barrier(float value, float* out) {
  __shared__ float published;
  if (threadIdx.x == 0) published = value;
  out[threadIdx.x] = published;  // BUG: no __syncthreads before
}

// Reads shared memory that no thread wrote.
__global__ void read_unwritten_shared(float* out) {
  __shared__ float never_written[4];
  out[threadIdx.x] = never_written[threadIdx.x % 4];
}

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 128) {
    __syncthreads();
  } else {
    __syncthreads();  // BUG: another barrier
  }
  out[threadIdx.x] = 1;
}

__global__ void barrier_after_exit(int* out) {
  if (threadIdx.x >= 200) return;  // BUG: these threads never reach the barrier
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void shuffle_after_exit(const float* in, float* out) {
  const int lane = threadIdx.x % 32;
  if (lane >= 16) return;  // BUG: the shuffle's mask names these lanes
  out[lane] = __shfl_down_sync(0xffffffff, in[lane], 8);
}

__global__ void mixed_intrinsics(const int* in, int* out) {
  const int lane = threadIdx.x;
  if (lane < 16) {
    out[lane] = static_cast<int>(__ballot_sync(0xffffffff, in[lane] > 0));
  } else {
    out[lane] = __shfl_down_sync(0xffffffff, in[lane], 1);  // BUG: another intrinsic
  }
}

__global__ void mask_without_self(const int* in, int* out) {
  const int lane = threadIdx.x;
  out[lane] = __shfl_xor_sync(0xfffffffe, in[lane], 1);  // BUG: lane 0 calls, but its bit is 0
}

__global__ void barrier_inside_warp_op(const int* in, int* out) {
  const int lane = threadIdx.x;
  if (lane < 16) {
    out[lane] = __shfl_xor_sync(0xffffffff, in[lane], 1);
  } else {
    __syncthreads();  // BUG: lanes 0-15 wait for these at the shuffle, these wait for those
    out[lane] = in[lane];
  }
}

__global__ void write_one_past(float* out, int64_t n) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i <= n) out[i] = 1.f;  // BUG: <= instead of <
}

// Nine threads write an array of eight in shared memory, through a pointer (where UBSan's bounds
// check cannot see the array: ASan must).
__global__ void shared_write_past_end(float* out) {
  __shared__ float slots[8];
  float* slot = slots + threadIdx.x;
  *slot = 1.f;  // BUG: thread 8 writes past the end
  __syncthreads();
  out[threadIdx.x] = slots[threadIdx.x % 8];
}

// ---- launchers ----

void launch_block_sums(const float* in, int64_t n, float* out, int blocks) {
  block_sums<<<blocks, kThreads>>>(in, n, out);
}
void launch_warp_semantics(const int* in, int width, int arg, int* out) {
  warp_semantics<<<1, 32>>>(in, width, arg, out);
}
void launch_half_warps(const int* in, int* out) { half_warps<<<1, 32>>>(in, out); }
void launch_shared_exchange(int* out, int blocks) { shared_exchange<<<blocks, kThreads>>>(out); }
void launch_indices(int* out, dim3 grid, dim3 block) { indices<<<grid, block>>>(out); }
void launch_atomic_sum(const float* in, int64_t n, float* total) { atomic_sum<<<4, 64, 0, nullptr>>>(in, n, total); }
void launch_checked_gather(const int64_t* ids, int64_t n, int64_t T, const float* table, float* out) {
  checked_gather<<<static_cast<unsigned>((n + 63) / 64), 64>>>(ids, n, T, table, out);
}
void launch_block_sums_missing_sync(const float* in, int64_t n, float* out) {
  block_sums_missing_sync<<<1, kThreads>>>(in, n, out);
}
void launch_broadcast_without_barrier(float value, float* out) { broadcast_without_barrier<<<1, 64>>>(value, out); }
void launch_read_unwritten_shared(float* out) { read_unwritten_shared<<<1, 8>>>(out); }
void launch_divergent_barrier(int* out) { divergent_barrier<<<1, kThreads>>>(out); }
void launch_barrier_after_exit(int* out) { barrier_after_exit<<<1, kThreads>>>(out); }
void launch_shuffle_after_exit(const float* in, float* out) { shuffle_after_exit<<<1, 32>>>(in, out); }
void launch_mixed_intrinsics(const int* in, int* out) { mixed_intrinsics<<<1, 32>>>(in, out); }
void launch_mask_without_self(const int* in, int* out) { mask_without_self<<<1, 32>>>(in, out); }
void launch_barrier_inside_warp_op(const int* in, int* out) { barrier_inside_warp_op<<<1, 32>>>(in, out); }
void launch_write_one_past(float* out, int64_t n) {
  write_one_past<<<static_cast<unsigned>((n + 64) / 64), 64>>>(out, n);
}
void launch_with_block(int* out, dim3 block) { indices<<<1, block>>>(out); }
void launch_shared_write_past_end(float* out) { shared_write_past_end<<<1, 9>>>(out); }

}  // namespace planted
