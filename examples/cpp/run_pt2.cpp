// Runs a gated model that Python packaged with nad_ext.gates.export.export_gated (torch.export +
// AOTInductor, a .pt2 file) on a batch stored as safetensors (tensors "x" and "task_ids"), and
// prints each sample's class. When the file also holds the expected outputs ("y_all", as
// cpp_tests/make_fixtures.py writes them), checks them and fails if they differ.
//   run_pt2 <gated.pt2> <batch.safetensors>
// The compiled model calls nad::task_gate through the dispatcher: linking nad::nad registers it.
// A package is compiled for one device (its metadata says which): the batch is moved there.
#include <iostream>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <nad/nad.h>
#include <nad/safetensors.h>

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: run_pt2 <gated.pt2> <batch.safetensors>\n";
    return 2;
  }
  try {
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    const auto metadata = loader.get_metadata();
    const auto device_key = metadata.count("AOTI_DEVICE_KEY") ? metadata.at("AOTI_DEVICE_KEY") : "cpu";
    const at::Device device(device_key == "cuda" ? at::kCUDA : at::kCPU);
    const auto batch = nad::read_safetensors(argv[2]);
    const auto x = batch.tensor("x").to(device);
    const auto task_ids = batch.tensor("task_ids").to(device);
    c10::NoGradGuard no_grad;
    const auto logits = loader.run({x, task_ids})[0].cpu();
    const auto classes = logits.argmax(1);
    std::cout << "gated model " << argv[1] << " (" << device << ", nad " << nad::version() << "): logits "
              << logits.sizes() << "\n";
    for (int64_t n = 0; n < x.size(0); ++n)
      std::cout << "  sample " << n << " (task " << task_ids[n].item<int64_t>() << "): class "
                << classes[n].item<int64_t>() << "\n";
    if (batch.tensors.count("y_all")) {
      const auto& expected = batch.tensor("y_all");
      const double diff = (logits - expected).abs().max().item<double>();
      std::cout << "max difference from Python's outputs: " << diff << "\n";
      if (!at::allclose(logits, expected, 1e-4, 1e-4)) {
        std::cerr << "run_pt2: the outputs differ from Python's\n";
        return 1;
      }
    }
  } catch (const c10::Error& e) {
    std::cerr << "run_pt2: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "run_pt2: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
