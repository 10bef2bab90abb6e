// nad-ext from C++: task-conditional gates with gradients, and a mask bank's similarity matrix.
//   app [bank.safetensors]
#include <iomanip>
#include <iostream>

#include <torch/autograd.h>

#include <nad/maskbank.h>
#include <nad/nad.h>

int main(int argc, char** argv) {
  std::cout << "nad " << nad::version() << " (CUDA kernels: " << std::boolalpha
            << nad::has_cuda_kernels() << ")\n";

  // A batch of 4 samples from 2 tasks, 3 channels of 2x2 each.
  const auto x = at::randn({4, 3, 2, 2}).requires_grad_(true);
  const auto logits = at::tensor({-2.f, 0.f, 2.f, 1.f, 1.f, -1.f}).reshape({2, 3}).requires_grad_(true);
  const auto task_ids = at::tensor({0, 1, 1, 0}, at::kLong);
  const auto y = nad::task_gate(x, logits, task_ids);
  const auto grads = torch::autograd::grad({y.sum()}, {logits});
  std::cout << "task_gate: y " << y.sizes() << ", d sum(y) / d logits =\n" << grads[0] << "\n";

  if (argc < 2) return 0;
  try {
    const auto bank = nad::MaskBank::load(argv[1]);
    std::cout << "\nmask bank " << argv[1] << ": model " << bank.model_id() << ", epoch "
              << bank.epoch() << ", " << bank.num_tasks() << " tasks\n";
    const auto masks = bank.binary();
    for (size_t l = 0; l < bank.gate_points().size(); ++l)
      std::cout << "  gate point " << l << " " << bank.gate_points()[l] << ": "
                << bank.channels()[l] << " channels\n";
    for (int64_t t = 0; t < bank.num_tasks(); ++t)
      std::cout << "  task " << bank.tasks()[t] << ": " << masks[t].sum().item<int64_t>() << " of "
                << masks.size(1) << " channels open\n";
    const auto sim = nad::mask_overlap(masks, masks, bank.layer_sizes(), "iou", false);
    std::cout << "IoU similarity:\n" << std::fixed << std::setprecision(3);
    for (int64_t i = 0; i < sim.size(0); ++i) {
      std::cout << "  " << std::setw(12) << bank.tasks()[i];
      for (int64_t j = 0; j < sim.size(1); ++j) std::cout << " " << sim[i][j].item<double>();
      std::cout << "\n";
    }
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
    return 1;
  }
  return 0;
}
