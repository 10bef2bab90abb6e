#pragma once
// cudasim: CUDA's execution semantics on the CPU, for testing the unchanged csrc/ops/cuda/*.cu
// kernels on machines without a GPU (see README.md in this folder).
//
// This header is force-included (-include cudasim.h) into every simulated .cu file, after the
// launch syntax `k<<<grid, block, smem, stream>>>(args)` was rewritten into
// `k % ::cudasim::config(__FILE__, __LINE__, grid, block, smem, stream)(args)`
// (rewrite_launches.cmake; the only change made to a kernel file). It provides what device code
// uses: the qualifiers, threadIdx / blockIdx / blockDim / gridDim, __syncthreads, the warp
// intrinsics (*_sync), atomics, __shared__ storage and CUDA_KERNEL_ASSERT, all backed by the
// runtime in runtime.cpp, which runs every GPU thread as a fiber:
// - blocks run one after another, in the forward or the reversed order (set_schedule);
// - inside a block the warps run one at a time, each as far as it can go before the next, in the
//   schedule's order (forward: warp 0 first; reversed: the last first), its lanes in that order,
//   each lane until it reaches a synchronisation point (a barrier, a warp intrinsic) or ends;
// - a warp intrinsic completes when every lane named in its mask has reached it (32 lanes,
//   32-bit masks and ballots, shuffle widths as on the GPU);
// - __syncthreads completes when every thread of the block waits at that same __syncthreads;
// - __shared__ variables live in one section that is filled with 0xff (NaN, -1) before every
//   block, so that a read of shared memory that no thread of the block wrote shows.
// What CUDA leaves undefined or hangs on stops the launch with a cudasim::Error that names the
// block, the thread and the source line: a lane named in a mask that has exited, different
// intrinsics (or masks) meeting in a warp, a barrier not reached by every thread or reached at
// different places, a deadlock, a failed CUDA_KERNEL_ASSERT, a launch configuration a GPU
// refuses.
#include <c10/macros/Macros.h>

#include <math.h>  // the float overloads of exp, sqrt, ... in the global namespace, as in CUDA

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- qualifiers ----
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static __attribute__((section("cudasim_shared")))
#define __constant__ static
// __restrict__ is a GCC keyword already.

// ---- types ----
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
using uint3 = dim3;
struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace cudasim {

// ---- errors and settings ----
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class Schedule { kForward, kReversed };
void set_schedule(Schedule schedule);
Schedule schedule();
const char* schedule_name(Schedule schedule);
// How fibers switch: the portable ucontext, or (x86-64, the default there) a stack switch.
void set_ucontext_switch(bool on);
bool ucontext_switch();

struct Stats {
  int64_t launches = 0, blocks = 0, threads = 0, switches = 0;
};
Stats stats();

// ---- the running thread ----
const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

[[noreturn]] void assert_failed(const char* cond, const char* file, int line, const char* func);

// ---- synchronisation ----
// A compiler barrier around every synchronisation point: shared and global memory must be read
// again after it (other fibers wrote them meanwhile), as nvcc does after a barrier.
inline void fence() { asm volatile("" ::: "memory"); }

void syncthreads_at(const char* file, int line);
inline void syncthreads(const char* file, int line) {
  fence();
  syncthreads_at(file, line);
  fence();
}

enum class WarpOp { kShflSync, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncWarp };
const char* warp_op_name(WarpOp op);

// Waits until every lane of `mask` has reached a warp intrinsic (the same one, with the same
// mask), then writes this lane's result. value: this lane's operand (at most 16 bytes); arg: the
// shuffle's source lane, delta or xor mask; width: the shuffle's segment width; out: this lane's
// result bytes (shuffles); ballot: the lanes of `mask` whose operand is nonzero (votes).
void warp_collective_at(WarpOp op, const char* file, int line, unsigned mask, const void* value,
                        size_t size, unsigned arg, int width, void* out, unsigned* ballot);

template <typename T>
inline T shuffle(WarpOp op, const char* file, int line, unsigned mask, T var, unsigned arg,
                 int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "cudasim: shuffle of an unsupported type");
  T result;
  fence();
  warp_collective_at(op, file, line, mask, &var, sizeof(T), arg, width, &result, nullptr);
  fence();
  return result;
}

inline unsigned vote(WarpOp op, const char* file, int line, unsigned mask, int predicate) {
  const int p = predicate != 0;
  unsigned ballot = 0;
  fence();
  warp_collective_at(op, file, line, mask, &p, sizeof p, 0, 32, nullptr, &ballot);
  fence();
  return ballot;
}

inline void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu) {
  fence();
  warp_collective_at(WarpOp::kSyncWarp, file, line, mask, nullptr, 0, 0, 32, nullptr, nullptr);
  fence();
}

// ---- launches ----
struct LaunchConfig {
  const char* file;  // the launch's source line (the original .cu file, through #line)
  int line;
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
};

// Runs body(context) as every thread of every block of the configuration; throws cudasim::Error.
void run_grid(const LaunchConfig& config, size_t parameter_bytes, void (*body)(void*), void* context);

struct Config {
  LaunchConfig config;
};

inline Config config(const char* file, int line, dim3 grid, dim3 block, size_t shared_bytes = 0,
                     cudaStream_t stream = nullptr) {
  return {{file, line, grid, block, shared_bytes, stream}};
}

// The kernel call as a generic lambda, so that a kernel template deduces its arguments as a
// launch does (`inner_kernel<<<...>>>(p, items, chunks)`).
template <typename F>
struct ConfigAndKernel {
  LaunchConfig config;
  F call;
};

template <typename F>
ConfigAndKernel<F> operator%(Config c, F call) {
  return {c.config, std::move(call)};
}

template <typename... A>
struct Arguments {
  std::tuple<std::decay_t<A>...> values;
};

template <typename... A>
Arguments<A...> arguments(A&&... args) {
  return {std::tuple<std::decay_t<A>...>(std::forward<A>(args)...)};
}

// Bytes of a kernel's arguments laid out as a struct, as CUDA passes them.
template <typename... P>
constexpr size_t parameter_bytes() {
  size_t offset = 0;
  ((offset = (offset + alignof(P) - 1) / alignof(P) * alignof(P) + sizeof(P)), ...);
  return offset;
}

template <typename F, typename... A>
void operator%(ConfigAndKernel<F>&& launch, Arguments<A...>&& args) {
  struct Context {
    const F* call;
    const std::tuple<std::decay_t<A>...>* values;
  } context{&launch.call, &args.values};
  auto body = [](void* raw) {
    const auto* c = static_cast<const Context*>(raw);
    auto copy = *c->values;  // each thread gets its own copy of the arguments, as on the GPU
    std::apply(*c->call, copy);
  };
  run_grid(launch.config, parameter_bytes<std::decay_t<A>...>(), body, &context);
}

constexpr int width_or_32() { return 32; }
constexpr int width_or_32(int width) { return width; }

}  // namespace cudasim

#define threadIdx (::cudasim::thread_idx())
#define blockIdx (::cudasim::block_idx())
#define blockDim (::cudasim::block_dim())
#define gridDim (::cudasim::grid_dim())
constexpr int warpSize = 32;

#define __syncthreads() ::cudasim::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::cudasim::syncwarp(__FILE__, __LINE__, ##__VA_ARGS__)
#define __threadfence() ::cudasim::fence()
#define __threadfence_block() ::cudasim::fence()
#define __shfl_sync(mask, var, lane, ...) \
  ::cudasim::shuffle(::cudasim::WarpOp::kShflSync, __FILE__, __LINE__, mask, var, lane, ::cudasim::width_or_32(__VA_ARGS__))
#define __shfl_up_sync(mask, var, delta, ...) \
  ::cudasim::shuffle(::cudasim::WarpOp::kShflUp, __FILE__, __LINE__, mask, var, delta, ::cudasim::width_or_32(__VA_ARGS__))
#define __shfl_down_sync(mask, var, delta, ...) \
  ::cudasim::shuffle(::cudasim::WarpOp::kShflDown, __FILE__, __LINE__, mask, var, delta, ::cudasim::width_or_32(__VA_ARGS__))
#define __shfl_xor_sync(mask, var, lane_mask, ...) \
  ::cudasim::shuffle(::cudasim::WarpOp::kShflXor, __FILE__, __LINE__, mask, var, lane_mask, ::cudasim::width_or_32(__VA_ARGS__))
#define __ballot_sync(mask, pred) ::cudasim::vote(::cudasim::WarpOp::kBallot, __FILE__, __LINE__, mask, pred)
#define __any_sync(mask, pred) (::cudasim::vote(::cudasim::WarpOp::kAny, __FILE__, __LINE__, mask, pred) != 0u)
#define __all_sync(mask, pred) \
  (::cudasim::vote(::cudasim::WarpOp::kAll, __FILE__, __LINE__, mask, pred) == static_cast<unsigned>(mask))

// ---- bit intrinsics ----
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }

// ---- atomics: one OS thread runs every fiber and a fiber is never interrupted between two
// synchronisation points, so a read-modify-write is atomic here. Their order across blocks is
// the schedule's: forward and reversed schedules add in different orders, as GPUs do. ----
template <typename T>
inline T cudasim_atomic_rmw(T* address, T value, int op) {
  static_assert(std::is_arithmetic_v<T>, "cudasim: atomic on an unsupported type");
  const T old = *address;
  switch (op) {
    case 0: *address = old + value; break;
    case 1: *address = old < value ? old : value; break;
    case 2: *address = old > value ? old : value; break;
    case 3: *address = value; break;
  }
  return old;
}
template <typename T>
inline T atomicAdd(T* address, T value) { return cudasim_atomic_rmw(address, value, 0); }
template <typename T>
inline T atomicMin(T* address, T value) { return cudasim_atomic_rmw(address, value, 1); }
template <typename T>
inline T atomicMax(T* address, T value) { return cudasim_atomic_rmw(address, value, 2); }
template <typename T>
inline T atomicExch(T* address, T value) { return cudasim_atomic_rmw(address, value, 3); }
template <typename T>
inline T atomicCAS(T* address, T compare, T value) {
  const T old = *address;
  if (old == compare) *address = value;
  return old;
}

// ---- device-side assertions: a diagnostic that names the thread, instead of abort() ----
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond)                                       \
  if (C10_UNLIKELY(!(cond))) {                                         \
    ::cudasim::assert_failed(#cond, __FILE__, __LINE__, __func__);     \
  }
#undef CUDA_KERNEL_ASSERT_MSG
#define CUDA_KERNEL_ASSERT_MSG(cond, msg)                              \
  if (C10_UNLIKELY(!(cond))) {                                         \
    ::cudasim::assert_failed(msg, __FILE__, __LINE__, __func__);       \
  }
