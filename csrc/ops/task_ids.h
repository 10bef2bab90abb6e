#pragma once
// Range checks of task ids, shared by the operators.
//
// CPU tensors are always checked on the host (reading them costs nothing). CUDA tensors are
// checked by the kernels, on the device (CUDA_KERNEL_ASSERT, as ATen's index kernels do): a host
// check reads the ids back, so every op would wait for the GPU, and reading back is impossible
// while a CUDA graph is being captured. A failed device-side assert leaves the CUDA context
// unusable, though, so the host check of CUDA ids can be switched on (opt-in, one min/max read
// per op call, skipped while the current stream is capturing a CUDA graph): the environment
// variable NAD_CHECK_TASK_IDS=1 (read once, when the first op runs), nad::set_check_task_ids(true)
// in C++ (nad.h), or torch.ops.nad._check_task_ids(True). The Python wrappers check first and
// name the argument.
#include <optional>

#include <ATen/ATen.h>

#include "registration.h"

namespace nad {

// Refuses ids outside [0, upper) with a c10::Error naming `op` and `name`. CPU ids always; CUDA
// ids when the host check is on (see above).
NAD_HIDDEN void check_ids_in_range(const at::Tensor& ids, int64_t upper, const char* op,
                                   const char* name);

// The kernel of nad::_check_task_ids: enable unset reads the setting, set changes it; returns
// the setting before the call.
NAD_HIDDEN bool check_task_ids_setting(std::optional<bool> enable);

}  // namespace nad
