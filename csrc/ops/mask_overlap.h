#pragma once
// nad::mask_overlap: all-pairs, layer-wise overlap of binary sub-architectures.
//   a: (Ta, K) bool, b: (Tb, K) bool, K = sum(layer_sizes); each row is one sub-architecture
//   (the open channels of every gate point, concatenated in gate-point order).
//   metric: "iou" |A&B| / |A|B|, "iomin" |A&B| / min(|A|, |B|), "intersection" |A&B|.
//   0/0 is 1 for iou and iomin: two empty layers are identical, and the empty set is a subset
//   of every set.
//   per_layer=false: (Ta, Tb) float32, the mean over layers; true: (L, Ta, Tb) float32.
#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace nad {

enum class OverlapMetric { kIoU, kIoMin, kIntersection };

// Argument checks shared by every backend (TORCH_CHECK messages name the argument); returns
// the parsed metric.
OverlapMetric check_mask_overlap_args(const at::Tensor& a, const at::Tensor& b,
                                      at::IntArrayRef layer_sizes, c10::string_view metric);

// The metric of one pair at one layer from its counts, shared by the CPU and CUDA kernels so
// both round the same way. Branch-free (0/0 becomes 1/1) so that CPU loops vectorise.
template <OverlapMetric M>
C10_HOST_DEVICE inline float overlap_value(int32_t inter, int32_t size_a, int32_t size_b) {
  if constexpr (M == OverlapMetric::kIntersection) {
    return static_cast<float>(inter);
  } else {
    const int32_t den = M == OverlapMetric::kIoU ? size_a + size_b - inter
                                                 : (size_a < size_b ? size_a : size_b);
    const bool empty = den == 0;
    return static_cast<float>(empty ? 1 : inter) / static_cast<float>(empty ? 1 : den);
  }
}

namespace cpu {
at::Tensor mask_overlap(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef layer_sizes,
                        c10::string_view metric, bool per_layer);
}  // namespace cpu

}  // namespace nad
