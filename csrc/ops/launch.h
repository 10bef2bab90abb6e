#pragma once
// Launch geometry of the CUDA kernels in csrc/ops/cuda/: how work items map to blocks and back.
// Plain C++ (host and device), so that cpp_tests can check it on a machine without a GPU.
//
// Every kernel covers its work with a grid-stride loop over int64 item indices, and every grid
// dimension is capped (kMaxBlocks for x, kMaxGridY for y), so no size that fits in memory is
// skipped or truncated: the batch, rows (N * C) and chunks of space have no limit of their own
// on CUDA, as on the CPU.
#include <c10/macros/Macros.h>

#include <cstdint>

namespace nad {
namespace launch {

#ifndef NAD_LAUNCH_TEST_CAPS
constexpr int64_t kMaxGridY = 65535;         // CUDA's limit of gridDim.y and gridDim.z
constexpr int64_t kMaxBlocks = 65535LL * 8;  // cap of 1-D grids: enough waves for any GPU
#else
// Test builds (cpp_tests/cudasim) lower the caps at run time, so that grid-stride loops make
// several trips (and the barriers between trips matter) at sizes a test can afford.
inline int64_t kMaxGridY = 65535;
inline int64_t kMaxBlocks = 65535LL * 8;
#endif

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of a grid-stride launch over `items` items, `per_block` per block per round:
// at least 1 (a launch needs a block), at most `cap`.
inline int64_t blocks_for(int64_t items, int64_t per_block, int64_t cap = kMaxBlocks) {
  const int64_t blocks = ceil_div(items, per_block);
  return blocks < 1 ? 1 : (blocks > cap ? cap : blocks);
}

// A work item that stands for chunk `chunk` of sample `sample`; items run sample-major, so that
// item = sample * chunks + chunk (the row of a per-item partial sum).
struct SampleChunk {
  int64_t sample, chunk;
};
C10_HOST_DEVICE inline SampleChunk split_item(int64_t item, int64_t chunks) {
  return {item / chunks, item % chunks};
}

// The elements [begin, end) of chunk `chunk` of a range of `total` elements cut in chunks of
// `len` (the last chunk may be shorter).
struct Range {
  int64_t begin, end;
};
C10_HOST_DEVICE inline Range chunk_range(int64_t chunk, int64_t len, int64_t total) {
  const int64_t begin = chunk * len, end = begin + len;
  return {begin, end < total ? end : total};
}

// Lanes per (n, c) row of the (N, C, S) gate reductions: a whole block (kRowBlock threads) when
// S >= kRowBlock; else the smallest power of two >= S, at most a warp, so that rows of 1 to 31
// elements (fully connected gate points, small maps) share a warp instead of idling a block.
constexpr int kRowBlock = 256;
inline int lanes_per_row(int64_t S) {
  if (S >= kRowBlock) return kRowBlock;
  int lanes = 1;
  while (lanes < S && lanes < 32) lanes *= 2;
  return lanes;
}

}  // namespace launch
}  // namespace nad
