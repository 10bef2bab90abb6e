// nad-ext from C++: task-conditional gates with gradients, a gated convolution, a mask bank's
// similarity matrix, and the bank with its gates closed below a threshold written back.
//   app [bank.safetensors [out.safetensors]]
#include <iomanip>
#include <iostream>

#include <torch/autograd.h>

#include <nad/maskbank.h>
#include <nad/nad.h>

int main(int argc, char** argv) {
  const auto library = nad::library_info();
  std::cout << "nad " << nad::version() << " (operators registered by " << library.path << ", CUDA kernels: "
            << std::boolalpha << library.cuda_kernels << ")\n";

  // A batch of 4 samples from 2 tasks, 3 channels of 2x2 each.
  const auto x = at::randn({4, 3, 2, 2}).requires_grad_(true);
  const auto logits = at::tensor({-2.f, 0.f, 2.f, 1.f, 1.f, -1.f}).reshape({2, 3}).requires_grad_(true);
  const auto task_ids = at::tensor({0, 1, 1, 0}, at::kLong);
  const auto y = nad::task_gate(x, logits, task_ids);
  const auto grads = torch::autograd::grad({y.sum()}, {logits});
  std::cout << "task_gate: y " << y.sizes() << ", d sum(y) / d logits =\n" << grads[0] << "\n";

  // The fused gate point: conv2d (frozen weights) + bias + ReLU + gate, differentiable in x and logits.
  const auto weight = at::randn({3, 3, 3, 3}), bias = at::zeros({3});
  const std::vector<int64_t> one{1, 1};
  const auto z = nad::masked_conv2d(x, weight, bias, logits, task_ids, one, one, one, 1, /*relu=*/true);
  std::cout << "masked_conv2d: y " << z.sizes() << "\n";

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
    if (argc >= 3) {  // the same bank with the gates under logit 0.5 closed (set to -1), one epoch later
      std::vector<at::Tensor> closed;
      for (const auto& m : bank.logits()) closed.push_back(at::where(m > 0.5, m, at::full_like(m, -1.f)));
      nad::MaskBank edited(bank.model_id(), bank.points(), bank.task_list(), closed, bank.config_json(),
                           bank.epoch() + 1, bank.calibration_json());
      edited.save(argv[2]);
      std::cout << "wrote " << argv[2] << ": " << edited.binary().sum().item<int64_t>() << " of "
                << masks.numel() << " gates open (before: " << masks.sum().item<int64_t>() << ")\n";
    }
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
    return 1;
  }
  return 0;
}
