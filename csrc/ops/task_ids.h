#pragma once
// Range checks of task ids, shared by the operators.
//
// CPU tensors are checked on the host (reading them costs nothing). CUDA tensors are checked by
// the kernels, on the device (CUDA_KERNEL_ASSERT, as ATen's index kernels do): a host check
// would read the ids back, so every op would wait for the GPU, and reading back is impossible
// while a CUDA graph is being captured. The Python wrappers check first and name the argument.
#include <ATen/ATen.h>

namespace nad {

inline void check_ids_in_range(const at::Tensor& ids, int64_t upper, const char* op,
                               const char* name) {
  if (ids.numel() == 0 || !ids.device().is_cpu()) return;
  const auto bounds = at::aminmax(ids);
  const int64_t lo = std::get<0>(bounds).item<int64_t>(), hi = std::get<1>(bounds).item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < upper, op, ": ", name, " must lie in [0, ", upper,
              "); got values in [", lo, ", ", hi, "]");
}

}  // namespace nad
