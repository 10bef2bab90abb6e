#pragma once
// Mask banks (format nad-ext.maskbank/1, docs/DESIGN.md) without Python: all tasks' gate
// logits of one model plus their metadata, in one safetensors file.
//
//   auto bank = nad::MaskBank::load("bank.safetensors");
//   bank.check_matches(model_gate_points, model_channels);   // throws with the reason
//   at::Tensor masks = bank.binary();                         // (T, K) bool
//   auto sim = nad::mask_overlap(masks, masks, bank.layer_sizes(), "iou", false);
#include <cstdint>
#include <string>
#include <vector>

#include <ATen/ATen.h>

namespace nad {

class MaskBank {
 public:
  static constexpr const char* kFormat = "nad-ext.maskbank/1";

  // Reads and validates a bank; throws c10::Error naming the file and what is wrong (a tensor
  // that fails its checksum is named). A bank without checksums (written before nad-ext stored
  // them) loads with a warning (TORCH_WARN), and verified() is false.
  static MaskBank load(const std::string& path);

  const std::string& model_id() const { return model_id_; }
  const std::vector<std::string>& gate_points() const { return gate_points_; }
  const std::vector<int64_t>& channels() const { return channels_; }
  const std::vector<std::string>& tasks() const { return tasks_; }
  const std::vector<std::vector<int64_t>>& task_classes() const { return task_classes_; }
  const std::string& config_json() const { return config_json_; }  // the NADConfig, as JSON
  int64_t epoch() const { return epoch_; }
  bool verified() const { return verified_; }  // every tensor matched its stored checksum
  int64_t num_tasks() const { return static_cast<int64_t>(tasks_.size()); }

  // Gate logits of each gate point, (T, C_l) float32, in gate-point order.
  const std::vector<at::Tensor>& logits() const { return logits_; }

  // The binary sub-architectures: (T, K) bool, the gate points' channels concatenated in
  // order (K = sum of channels()); a channel is open where its logit is > 0.
  at::Tensor binary() const;

  // Channels of each gate point (the layer_sizes argument of nad::mask_overlap).
  std::vector<int64_t> layer_sizes() const { return channels_; }

  // Throws c10::Error with the reason (count, name or channel count of the first gate point that
  // differs) unless the bank was made for a model with these gate points and channel counts.
  void check_matches(const std::vector<std::string>& gate_points,
                     const std::vector<int64_t>& channels) const;

 private:
  std::string path_;
  std::string model_id_;
  std::vector<std::string> gate_points_;
  std::vector<int64_t> channels_;
  std::vector<std::string> tasks_;
  std::vector<std::vector<int64_t>> task_classes_;
  std::string config_json_;
  int64_t epoch_ = 0;
  bool verified_ = false;
  std::vector<at::Tensor> logits_;
};

}  // namespace nad
