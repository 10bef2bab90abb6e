#pragma once
// Mask banks (format nad-ext.maskbank/1, docs/DESIGN.md) without Python: all tasks' gate
// logits of one model plus their metadata, in one safetensors file. Read and written the way the
// Python package (nad_ext.gates.maskbank.MaskBank) reads and writes them: a bank written here
// loads in Python and the other way round, every metadata field included.
//
//   auto bank = nad::MaskBank::load("bank.safetensors");
//   bank.check_matches(model_gate_points, model_channels);   // throws with the reason
//   at::Tensor masks = bank.binary();                         // (T, K) bool
//   auto sim = nad::mask_overlap(masks, masks, bank.layer_sizes(), "iou", false);
//
//   nad::MaskBank edited(bank.model_id(), bank.points(), bank.task_list(), new_logits,
//                        bank.config_json(), bank.epoch() + 1, bank.calibration_json());
//   edited.save("edited.safetensors");                        // atomic, with checksums
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include <nad/export.h>

namespace nad {

// A gated module output (Python: nad_ext.gates.GatePoint).
struct GatePoint {
  std::string name;             // the module's name in the network, e.g. "features.3"
  int64_t channels = 0;         // gates at this point: channels, or attention heads
  int64_t channel_axis = 1;     // the gated axis of the module's output (2 for (N, L, C) tokens)
  std::string units = "channels";  // "channels", or "heads" (one gate per attention head)
  std::string record = "output";   // what the objective compares: "output", or "relu" of it
  bool operator==(const GatePoint&) const = default;
};

// A task: its name and the classes whose images make it up (Python: nad_ext.gates.Task).
struct Task {
  std::string name;
  std::vector<int64_t> classes;
  bool operator==(const Task&) const = default;
};

class NAD_API MaskBank {
 public:
  static constexpr const char* kFormat = "nad-ext.maskbank/1";

  // A bank from its parts, checked as Python's MaskBank(...) checks them: one logits tensor per
  // gate point, of shape (T, channels) with T = tasks.size() (stored as float32 CPU copies);
  // units "channels" or "heads", records "output" or "relu", channel axes >= 1; config_json,
  // calibration_json and fidelity_json (when given) JSON objects. Throws c10::Error naming what
  // is wrong.
  MaskBank(std::string model_id, std::vector<GatePoint> points, std::vector<Task> tasks,
           std::vector<at::Tensor> logits, std::string config_json = "{}", int64_t epoch = 0,
           std::optional<std::string> calibration_json = std::nullopt,
           std::optional<std::string> fidelity_json = std::nullopt);

  // Reads and validates a bank; throws c10::Error naming the file and what is wrong (a tensor
  // that fails its checksum is named; as Python's reader, gate logits must be float32 and finite
  // and every gate point must have at least one gate). A bank without checksums (written before
  // nad-ext stored them) loads with a warning (TORCH_WARN), and verified() is false. Optional keys absent from
  // older banks get Python's defaults: channel axis 1, units "channels", record "output".
  static MaskBank load(const std::string& path);

  // Writes the bank atomically (a temporary file ".<name>.<random>.tmp" beside `path`, flushed
  // to disk and renamed over it: a reader or a crash sees the old file or the new one), with
  // the CRC-32 of every tensor (metadata "crc32"), as Python writes it. Creates missing parent
  // folders. On failure throws c10::Error naming the file and the cause, leaving `path` as it
  // was and no temporary file behind.
  void save(const std::string& path) const;

  const std::string& model_id() const { return model_id_; }
  const std::vector<GatePoint>& points() const { return points_; }
  std::vector<std::string> gate_points() const;   // the gate points' names, in order
  std::vector<int64_t> channels() const;          // their gate counts
  std::vector<int64_t> channel_axes() const;      // their gated axes
  std::vector<std::string> units() const;         // "channels" or "heads" per gate point
  std::vector<std::string> records() const;       // "output" or "relu" per gate point
  const std::vector<Task>& task_list() const { return tasks_; }
  std::vector<std::string> tasks() const;                  // the task names, in order
  std::vector<std::vector<int64_t>> task_classes() const;  // each task's classes
  int64_t num_tasks() const { return static_cast<int64_t>(tasks_.size()); }
  const std::string& config_json() const { return config_json_; }  // the NADConfig, as JSON
  int64_t epoch() const { return epoch_; }
  // How beta was found, as JSON (Python's MaskBank.calibration), when it was calibrated.
  const std::optional<std::string>& calibration_json() const { return calibration_json_; }
  // The fidelity check after the run's last epoch, as JSON (Python's MaskBank.fidelity: per task
  // own-class accuracy, false positives, constant answers, flagged tasks), when it was made.
  const std::optional<std::string>& fidelity_json() const { return fidelity_json_; }
  // Where the bank was read from ("" for a bank made in memory).
  const std::string& path() const { return path_; }
  // Read from a file whose every tensor matched its stored checksum (false for banks made in
  // memory and for files without checksums).
  bool verified() const { return verified_; }

  // Gate logits of each gate point, (T, C_l) float32, in gate-point order.
  const std::vector<at::Tensor>& logits() const { return logits_; }

  // The binary sub-architectures: (T, K) bool, the gate points' channels concatenated in
  // order (K = sum of channels()); a channel is open where its logit is > 0.
  at::Tensor binary() const;

  // Channels of each gate point (the layer_sizes argument of nad::mask_overlap).
  std::vector<int64_t> layer_sizes() const { return channels(); }

  // Throws c10::Error with the reason (count, name or channel count of the first gate point that
  // differs) unless the bank was made for a model with these gate points and channel counts.
  void check_matches(const std::vector<std::string>& gate_points,
                     const std::vector<int64_t>& channels) const;
  // The same for full gate points: also their units and channel axes (not `record`, which
  // changes the objective, not where the gates are).
  void check_matches(const std::vector<GatePoint>& gate_points) const;

 private:
  MaskBank() = default;
  void validate(const std::string& where) const;

  std::string path_;
  std::string model_id_;
  std::vector<GatePoint> points_;
  std::vector<Task> tasks_;
  std::string config_json_ = "{}";
  int64_t epoch_ = 0;
  std::optional<std::string> calibration_json_;
  std::optional<std::string> fidelity_json_;
  bool verified_ = false;
  std::vector<at::Tensor> logits_;
};

}  // namespace nad
