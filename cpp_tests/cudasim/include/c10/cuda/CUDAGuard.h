#pragma once
// cudasim's stand-in for c10/cuda/CUDAGuard.h: there is one simulated device, the host.
#include <c10/core/Device.h>

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};

struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(c10::optional<c10::Device>) {}
};

}  // namespace cuda
}  // namespace c10
