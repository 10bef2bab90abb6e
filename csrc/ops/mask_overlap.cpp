#include "mask_overlap.h"

namespace nad {

OverlapMetric check_mask_overlap_args(const at::Tensor& a, const at::Tensor& b,
                                      at::IntArrayRef layer_sizes, c10::string_view metric) {
  TORCH_CHECK(a.dim() == 2, "mask_overlap: a must have shape (Ta, K), got shape ", a.sizes());
  TORCH_CHECK(b.dim() == 2, "mask_overlap: b must have shape (Tb, K), got shape ", b.sizes());
  TORCH_CHECK(a.scalar_type() == at::kBool, "mask_overlap: a must be bool, got ",
              a.scalar_type());
  TORCH_CHECK(b.scalar_type() == at::kBool, "mask_overlap: b must be bool, got ",
              b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "mask_overlap: a and b must be on one device, got ",
              a.device(), " and ", b.device());
  TORCH_CHECK(!layer_sizes.empty(), "mask_overlap: layer_sizes must name at least one layer");
  int64_t total = 0;
  for (size_t l = 0; l < layer_sizes.size(); ++l) {
    TORCH_CHECK(layer_sizes[l] > 0, "mask_overlap: layer_sizes must be positive, got ",
                layer_sizes[l], " at index ", l);
    total += layer_sizes[l];
  }
  TORCH_CHECK(a.size(1) == total && b.size(1) == total, "mask_overlap: a and b must have K = ",
              "sum(layer_sizes) = ", total, " columns, got a ", a.sizes(), " and b ", b.sizes());
  if (metric == "iou") return OverlapMetric::kIoU;
  if (metric == "iomin") return OverlapMetric::kIoMin;
  if (metric == "intersection") return OverlapMetric::kIntersection;
  TORCH_CHECK(false, "mask_overlap: metric must be one of \"iou\", \"iomin\", \"intersection\", ",
              "got \"", metric, "\"");
}

}  // namespace nad
