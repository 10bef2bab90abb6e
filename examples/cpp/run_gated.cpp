// Runs a gated model exported from Python with nad_ext.gates.export.export_gated (TorchScript) on a
// batch stored as safetensors (tensors "x" and "task_ids"), and prints each sample's class.
//   run_gated <gated.pt> <batch.safetensors>
// The traced graph calls nad::task_gate: linking nad::nad registers it.
#include <iostream>

#include <torch/script.h>

#include <nad/safetensors.h>

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: run_gated <gated.pt> <batch.safetensors>\n";
    return 2;
  }
  try {
    auto model = torch::jit::load(argv[1]);
    model.eval();
    const auto batch = nad::read_safetensors(argv[2]);
    const auto& x = batch.tensor("x");
    const auto& task_ids = batch.tensor("task_ids");
    torch::NoGradGuard no_grad;
    const auto logits = model.forward({x, task_ids}).toTensor();
    const auto classes = logits.argmax(1);
    std::cout << "gated model " << argv[1] << ": logits " << logits.sizes() << "\n";
    for (int64_t n = 0; n < x.size(0); ++n)
      std::cout << "  sample " << n << " (task " << task_ids[n].item<int64_t>() << "): class "
                << classes[n].item<int64_t>() << "\n";
  } catch (const c10::Error& e) {
    std::cerr << "run_gated: " << e.what_without_backtrace() << "\n";
    return 1;
  }
  return 0;
}
