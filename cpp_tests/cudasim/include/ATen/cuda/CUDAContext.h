#pragma once
// cudasim's stand-in for ATen/cuda/CUDAContext.h: the current stream (a placeholder: launches run
// synchronously, in order) and the launch check (a failed launch has thrown already).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include "cudasim.h"

namespace at {
namespace cuda {

struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }

}  // namespace cuda
}  // namespace at
