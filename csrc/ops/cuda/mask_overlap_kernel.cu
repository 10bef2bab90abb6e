// CUDA kernels of nad::mask_overlap.
//
// 1. pack_kernel: one warp per (row, word) bit-packs 64 channels of a layer with two ballots
//    (layers start on word boundaries, so they never share a word). Words are stored
//    word-major, (W_total, T), so a tile of rows of one word is one coalesced load.
//    sizes_kernel then sums each (layer, row)'s popcounts.
// 2. overlap_kernel: one launch for all layers (of a group, below). A block of 16 x 16 threads owns a 64 x 64 tile
//    of the output, each thread 4 x 4 pairs (rows ty + 16 r of a, columns tx + 16 c of b, so a
//    warp reads consecutive words of b: no shared-memory bank conflicts). Layer by layer, up to
//    kChunk words of the tile's 64 rows of a and b go to shared memory, every thread ANDs and
//    __popcll's its 16 pairs, then turns the counts into the metric: summed in registers for
//    the mean (no per-layer matrices), or written to (L, Ta, Tb) when per_layer.
//    The grid is (tiles of b) x (tiles of a, at most kMaxGridY, looping over the rest), so any
//    Ta x Tb that fits in memory works.
// The layers' channel and word offsets travel by value in a kernel-argument struct
// (LayerGroup, as normalized_step's Layers): no host-to-device copy, so a call neither waits
// for the stream nor breaks CUDA-graph capture. A group holds up to kGroupLayers layers; more
// layers take one group (pack + overlap launches) each, the mean carried over in `out` between
// groups and divided by L after the last: the same additions in the same order as one launch.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../launch.h"
#include "../mask_overlap.h"
#include "../registration.h"

namespace nad {
namespace cuda {
namespace {

constexpr int kTile = 64;    // output tile: kTile x kTile pairs per block
constexpr int kSide = 16;    // threads per side of the block (kSide x kSide threads)
constexpr int kPer = kTile / kSide;  // pairs per thread per side
constexpr int kChunk = 8;    // words of a layer staged in shared memory at a time
constexpr int kThreads1d = 256;
constexpr int kGroupLayers = 192;  // 2 x 193 x 8 bytes + the rest: inside 4 KB of kernel arguments

// Layers [first, first + count): their channel and word offsets (absolute, count + 1 each).
struct LayerGroup {
  int64_t first, count;
  int64_t chan[kGroupLayers + 1];
  int64_t word[kGroupLayers + 1];
};

// One warp per (row, word of the group): lanes read 2 x 32 consecutive bytes (coalesced) and two
// ballots make the word. The loop bound depends on the warp index only, so warps stay converged.
__global__ void pack_kernel(const uint8_t* __restrict__ m, const LayerGroup group, int64_t T,
                            int64_t K, uint64_t* __restrict__ packed) {
  const int lane = threadIdx.x % 32;
  const int64_t words = group.word[group.count] - group.word[0];
  const int64_t warps = (int64_t)gridDim.x * blockDim.x / 32;
  for (int64_t idx = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32; idx < words * T;
       idx += warps) {
    const int64_t r = idx / words, wg = group.word[0] + idx % words;
    int64_t l = 0;  // layer of word wg within the group
    while (group.word[l + 1] <= wg) ++l;
    const int64_t first = group.chan[l] + 64 * (wg - group.word[l]);
    const int64_t left = group.chan[l + 1] - first;
    const int count = left < 64 ? static_cast<int>(left) : 64;
    const uint8_t* src = m + r * K + first;
    const unsigned lo = __ballot_sync(0xffffffffu, lane < count && (src[lane] & 1));
    const unsigned hi = __ballot_sync(0xffffffffu, lane + 32 < count && (src[lane + 32] & 1));
    if (lane == 0) packed[wg * T + r] = (static_cast<uint64_t>(hi) << 32) | lo;
  }
}

// sizes[l, r]: the set size of row r at layer l of the group.
__global__ void sizes_kernel(const uint64_t* __restrict__ packed, const LayerGroup group, int64_t T,
                             int32_t* __restrict__ sizes) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < group.count * T;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t l = idx / T, r = idx % T;
    int32_t s = 0;
    for (int64_t w = group.word[l]; w < group.word[l + 1]; ++w) s += __popcll(packed[w * T + r]);
    sizes[(group.first + l) * T + r] = s;
  }
}

template <OverlapMetric M, bool kPerLayer>
__global__ void __launch_bounds__(kSide * kSide)
    overlap_kernel(const uint64_t* __restrict__ pa, const uint64_t* __restrict__ pb,
                   const int32_t* __restrict__ sa, const int32_t* __restrict__ sb,
                   const LayerGroup group, int64_t L, int64_t Ta, int64_t Tb, int64_t tiles_a,
                   bool carry_in, bool last, float* __restrict__ out) {
  // carry_in: the mean's running sum of the earlier groups is in out; last: divide by L.
  __shared__ uint64_t as[kChunk][kTile];
  __shared__ uint64_t bs[kChunk][kTile];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kSide + tx;
  const int64_t j0 = (int64_t)blockIdx.x * kTile;
  for (int64_t tile_a = blockIdx.y; tile_a < tiles_a; tile_a += gridDim.y) {
    const int64_t i0 = tile_a * kTile;
    float acc[kPer][kPer] = {};
    if (!kPerLayer && carry_in) {
#pragma unroll
      for (int r = 0; r < kPer; ++r) {
        const int64_t i = i0 + ty + kSide * r;
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
          const int64_t j = j0 + tx + kSide * c;
          if (i < Ta && j < Tb) acc[r][c] = out[i * Tb + j];
        }
      }
    }
    for (int64_t gl = 0; gl < group.count; ++gl) {
      const int64_t l = group.first + gl;
      int32_t cnt[kPer][kPer] = {};
      for (int64_t w0 = group.word[gl]; w0 < group.word[gl + 1]; w0 += kChunk) {
        const int64_t left = group.word[gl + 1] - w0;
        const int nw = left < kChunk ? static_cast<int>(left) : kChunk;
        __syncthreads();  // the previous chunk is no longer read
        for (int e = tid; e < nw * kTile; e += kSide * kSide) {
          const int w = e / kTile, r = e % kTile;
          const int64_t i = i0 + r, j = j0 + r;
          as[w][r] = i < Ta ? pa[(w0 + w) * Ta + i] : 0;
          bs[w][r] = j < Tb ? pb[(w0 + w) * Tb + j] : 0;
        }
        __syncthreads();
        for (int w = 0; w < nw; ++w) {
          uint64_t av[kPer], bv[kPer];
#pragma unroll
          for (int p = 0; p < kPer; ++p) {
            av[p] = as[w][ty + kSide * p];
            bv[p] = bs[w][tx + kSide * p];
          }
#pragma unroll
          for (int r = 0; r < kPer; ++r)
#pragma unroll
            for (int c = 0; c < kPer; ++c) cnt[r][c] += __popcll(av[r] & bv[c]);
        }
      }
#pragma unroll
      for (int r = 0; r < kPer; ++r) {
        const int64_t i = i0 + ty + kSide * r;
        if (i >= Ta) continue;
        const int32_t sai = sa[l * Ta + i];
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
          const int64_t j = j0 + tx + kSide * c;
          if (j >= Tb) continue;
          const float v = overlap_value<M>(cnt[r][c], sai, sb[l * Tb + j]);
          if (kPerLayer) {
            out[(l * Ta + i) * Tb + j] = v;
          } else {
            acc[r][c] += v;
          }
        }
      }
    }
    if (!kPerLayer) {
#pragma unroll
      for (int r = 0; r < kPer; ++r) {
        const int64_t i = i0 + ty + kSide * r;
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
          const int64_t j = j0 + tx + kSide * c;
          if (i < Ta && j < Tb) out[i * Tb + j] = last ? acc[r][c] / static_cast<float>(L) : acc[r][c];
        }
      }
    }
  }
}

int blocks_for(int64_t n) { return static_cast<int>(launch::blocks_for(n, kThreads1d)); }

// Packs the group's words of (T, K) bool into packed (W_total, T) and its (L, T) set sizes.
void pack(const at::Tensor& m, const LayerGroup& group, at::Tensor& packed, at::Tensor& sizes,
          cudaStream_t stream) {
  const int64_t T = m.size(0), K = m.size(1);
  const int64_t words = group.word[group.count] - group.word[0];
  auto* w = reinterpret_cast<uint64_t*>(packed.data_ptr<int64_t>());
  pack_kernel<<<blocks_for(words * T * 32), kThreads1d, 0, stream>>>(
      reinterpret_cast<const uint8_t*>(m.const_data_ptr<bool>()), group, T, K, w);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sizes_kernel<<<blocks_for(group.count * T), kThreads1d, 0, stream>>>(w, group, T,
                                                                      sizes.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <OverlapMetric M>
void launch_overlap(const at::Tensor& pa, const at::Tensor& pb, const at::Tensor& sa,
                    const at::Tensor& sb, const LayerGroup& group, int64_t L, int64_t Ta,
                    int64_t Tb, bool per_layer, at::Tensor& out, cudaStream_t stream) {
  const int64_t tiles_a = (Ta + kTile - 1) / kTile, tiles_b = (Tb + kTile - 1) / kTile;
  TORCH_CHECK(tiles_b <= INT32_MAX, "mask_overlap: b has too many rows (", Tb, ")");
  const dim3 grid(static_cast<unsigned>(tiles_b),
                  static_cast<unsigned>(std::min<int64_t>(tiles_a, launch::kMaxGridY)));
  const dim3 block(kSide, kSide);
  const auto* a_words = reinterpret_cast<const uint64_t*>(pa.const_data_ptr<int64_t>());
  const auto* b_words = reinterpret_cast<const uint64_t*>(pb.const_data_ptr<int64_t>());
  auto kernel = per_layer ? overlap_kernel<M, true> : overlap_kernel<M, false>;
  const bool carry_in = group.first > 0, last = group.first + group.count == L;
  kernel<<<grid, block, 0, stream>>>(a_words, b_words, sa.const_data_ptr<int32_t>(),
                                     sb.const_data_ptr<int32_t>(), group, L, Ta, Tb, tiles_a,
                                     carry_in, last, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor mask_overlap(const at::Tensor& a_in, const at::Tensor& b_in,
                        at::IntArrayRef layer_sizes, c10::string_view metric, bool per_layer) {
  const OverlapMetric kind = check_mask_overlap_args(a_in, b_in, layer_sizes, metric);
  c10::cuda::CUDAGuard guard(a_in.device());
  const auto a = a_in.contiguous();
  const auto b = b_in.contiguous();
  const int64_t L = static_cast<int64_t>(layer_sizes.size()), Ta = a.size(0), Tb = b.size(0);
  auto out = per_layer ? at::empty({L, Ta, Tb}, a.options().dtype(at::kFloat))
                       : at::empty({Ta, Tb}, a.options().dtype(at::kFloat));
  if (Ta == 0 || Tb == 0) return out;

  // Channel and word offsets of every layer (layers start on word boundaries).
  std::vector<int64_t> chan(L + 1, 0), word(L + 1, 0);
  for (int64_t l = 0; l < L; ++l) {
    chan[l + 1] = chan[l] + layer_sizes[l];
    word[l + 1] = word[l] + (layer_sizes[l] + 63) / 64;
  }
  auto pa = at::empty({word[L], Ta}, a.options().dtype(at::kLong));
  auto pb = at::empty({word[L], Tb}, a.options().dtype(at::kLong));
  auto sa = at::empty({L, Ta}, a.options().dtype(at::kInt));
  auto sb = at::empty({L, Tb}, a.options().dtype(at::kInt));
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t first = 0; first < L; first += kGroupLayers) {
    LayerGroup group{};
    group.first = first;
    group.count = std::min<int64_t>(kGroupLayers, L - first);
    for (int64_t k = 0; k <= group.count; ++k) {
      group.chan[k] = chan[first + k];
      group.word[k] = word[first + k];
    }
    pack(a, group, pa, sa, stream);
    pack(b, group, pb, sb, stream);
    switch (kind) {
      case OverlapMetric::kIoU:
        launch_overlap<OverlapMetric::kIoU>(pa, pb, sa, sb, group, L, Ta, Tb, per_layer, out, stream);
        break;
      case OverlapMetric::kIoMin:
        launch_overlap<OverlapMetric::kIoMin>(pa, pb, sa, sb, group, L, Ta, Tb, per_layer, out, stream);
        break;
      case OverlapMetric::kIntersection:
        launch_overlap<OverlapMetric::kIntersection>(pa, pb, sa, sb, group, L, Ta, Tb, per_layer, out,
                                                     stream);
        break;
    }
  }
  return out;
}

}  // namespace cuda
}  // namespace nad

NAD_LIBRARY_IMPL(CUDA, m) { m.impl("mask_overlap", &nad::cuda::mask_overlap); }
