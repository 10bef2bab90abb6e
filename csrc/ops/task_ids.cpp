#include "task_ids.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#ifdef NAD_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace nad {
namespace {

// The host check of CUDA ids: off unless NAD_CHECK_TASK_IDS is set to something other than "" or
// "0" when this is first read, or set through check_task_ids_setting.
std::atomic<bool>& cuda_check_flag() {
  static std::atomic<bool> flag{[] {
    const char* env = std::getenv("NAD_CHECK_TASK_IDS");
    return env != nullptr && *env != '\0' && std::strcmp(env, "0") != 0;
  }()};
  return flag;
}

// Reading ids back is impossible while the ids' current stream captures a CUDA graph.
bool capturing(const at::Tensor& ids) {
#ifdef NAD_WITH_CUDA
  if (ids.is_cuda()) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(ids.device().index()), &status));
    return status != cudaStreamCaptureStatusNone;
  }
#endif
  (void)ids;
  return false;
}

}  // namespace

void check_ids_in_range(const at::Tensor& ids, int64_t upper, const char* op, const char* name) {
  if (ids.numel() == 0) return;
  const bool cpu = ids.device().is_cpu();
  if (!cpu && (!cuda_check_flag().load(std::memory_order_relaxed) || capturing(ids))) return;
  // min and max in one copy to the host (one sync on a GPU).
  const auto [min, max] = at::aminmax(ids);
  const auto bounds = at::stack({min, max}).cpu();
  const int64_t lo = bounds[0].item<int64_t>(), hi = bounds[1].item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < upper, op, ": ", name, " must lie in [0, ", upper, "); got values in [", lo,
              ", ", hi, "]", cpu ? "" : " (checked on the host: NAD_CHECK_TASK_IDS / nad::set_check_task_ids)");
}

bool check_task_ids_setting(std::optional<bool> enable) {
  auto& flag = cuda_check_flag();
  return enable.has_value() ? flag.exchange(*enable) : flag.load();
}

}  // namespace nad
