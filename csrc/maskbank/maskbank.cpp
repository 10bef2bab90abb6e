#include <nad/maskbank.h>

#include <charconv>
#include <cstdio>

#include <nad/safetensors.h>

#include "json.h"

namespace nad {
namespace {

using json::Value;

// The metadata string `key`, parsed as JSON of the expected kind.
Value metadata_json(const SafetensorsFile& file, const std::string& key, Value::Kind kind) {
  const auto it = file.metadata.find(key);
  TORCH_CHECK(it != file.metadata.end(), file.path, ": not a mask bank: metadata \"", key,
              "\" is missing");
  Value v;
  try {
    v = json::parse(it->second);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, file.path, ": metadata \"", key, "\" is not valid JSON: ", e.what());
  }
  TORCH_CHECK(v.kind == kind, file.path, ": metadata \"", key, "\" must be ",
              json::kind_name(kind), ", got ", json::kind_name(v.kind));
  return v;
}

std::vector<std::string> string_list(const SafetensorsFile& file, const std::string& key) {
  std::vector<std::string> out;
  for (const auto& item : metadata_json(file, key, Value::Kind::Array).items) {
    TORCH_CHECK(item.kind == Value::Kind::String, file.path, ": metadata \"", key,
                "\" must be a list of strings, found ", json::kind_name(item.kind));
    out.push_back(item.text);
  }
  return out;
}

std::vector<int64_t> int_list(const SafetensorsFile& file, const std::string& key,
                              const Value& list) {
  std::vector<int64_t> out;
  try {
    for (const auto& item : list.items) out.push_back(item.as_int("each entry"));
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, file.path, ": metadata \"", key, "\": ", e.what());
  }
  return out;
}

// The tensor key of gate point `index`: logits.000, logits.001, ...
std::string logits_key(size_t index) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "logits.%03zu", index);
  return buf;
}

}  // namespace

MaskBank MaskBank::load(const std::string& path) {
  const SafetensorsFile file = read_safetensors(path);
  const auto format = file.metadata.find("format");
  TORCH_CHECK(format != file.metadata.end(), path,
              ": not a mask bank: metadata \"format\" is missing");
  TORCH_CHECK(format->second == kFormat, path, ": unsupported mask bank format \"",
              format->second, "\" (this library reads ", kFormat, ")");

  MaskBank bank;
  bank.path_ = path;
  bank.verified_ = file.verified;
  if (!file.verified)
    TORCH_WARN("mask bank ", path, " has no checksums (written by an earlier nad-ext): loaded ",
               "without verifying its tensors");
  const auto model_id = file.metadata.find("model_id");
  TORCH_CHECK(model_id != file.metadata.end(), path, ": metadata \"model_id\" is missing");
  bank.model_id_ = model_id->second;
  bank.gate_points_ = string_list(file, "gate_points");
  bank.channels_ = int_list(file, "channels", metadata_json(file, "channels", Value::Kind::Array));
  bank.tasks_ = string_list(file, "tasks");
  for (const auto& classes : metadata_json(file, "task_classes", Value::Kind::Array).items) {
    TORCH_CHECK(classes.kind == Value::Kind::Array, path,
                ": metadata \"task_classes\" must be a list of lists of class indices");
    bank.task_classes_.push_back(int_list(file, "task_classes", classes));
  }
  metadata_json(file, "config", Value::Kind::Object);  // validated, kept as written
  bank.config_json_ = file.metadata.at("config");
  const auto epoch = file.metadata.find("epoch");
  TORCH_CHECK(epoch != file.metadata.end(), path, ": metadata \"epoch\" is missing");
  const auto& e = epoch->second;
  const auto [end, err] = std::from_chars(e.data(), e.data() + e.size(), bank.epoch_);
  TORCH_CHECK(err == std::errc() && end == e.data() + e.size() && bank.epoch_ >= 0, path,
              ": metadata \"epoch\" must be a non-negative integer, got \"", e, "\"");

  const size_t L = bank.gate_points_.size();
  const int64_t T = bank.num_tasks();
  TORCH_CHECK(bank.channels_.size() == L, path, ": ", L, " gate points but ",
              bank.channels_.size(), " channel counts");
  TORCH_CHECK(bank.task_classes_.size() == bank.tasks_.size(), path, ": ", T,
              " tasks but ", bank.task_classes_.size(), " entries in task_classes");
  TORCH_CHECK(file.tensors.size() == L, path, ": ", L, " gate points but ", file.tensors.size(),
              " tensors (expected logits.000 ... one per gate point)");
  for (size_t l = 0; l < L; ++l) {
    const std::string key = logits_key(l);
    TORCH_CHECK(file.tensors.count(key), path, ": tensor \"", key, "\" (gate point ", l, ", ",
                bank.gate_points_[l], ") is missing");
    const at::Tensor& t = file.tensors.at(key);
    TORCH_CHECK(t.scalar_type() == at::kFloat, path, ": tensor \"", key,
                "\" must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == T && t.size(1) == bank.channels_[l], path,
                ": tensor \"", key, "\" (", bank.gate_points_[l], ") must have shape (", T, ", ",
                bank.channels_[l], ") for ", T, " tasks and ", bank.channels_[l],
                " channels, got ", t.sizes());
    bank.logits_.push_back(t);
  }
  return bank;
}

at::Tensor MaskBank::binary() const {
  if (logits_.empty()) return at::zeros({num_tasks(), 0}, at::kBool);
  return at::cat(logits_, 1).gt(0);
}

void MaskBank::check_matches(const std::vector<std::string>& gate_points,
                             const std::vector<int64_t>& channels) const {
  TORCH_CHECK(gate_points.size() == channels.size(), "check_matches: ", gate_points.size(),
              " gate point names but ", channels.size(), " channel counts");
  const std::string bank = "mask bank " + path_ + " (model " + model_id_ + ")";
  TORCH_CHECK(gate_points.size() == gate_points_.size(), bank, " does not match the model: it has ",
              gate_points_.size(), " gate points, the model ", gate_points.size());
  for (size_t l = 0; l < gate_points.size(); ++l) {
    TORCH_CHECK(gate_points[l] == gate_points_[l], bank, " does not match the model: gate point ",
                l, " is \"", gate_points_[l], "\" in the bank but \"", gate_points[l],
                "\" in the model");
    TORCH_CHECK(channels[l] == channels_[l], bank, " does not match the model: gate point ", l,
                " (\"", gate_points_[l], "\") has ", channels_[l], " channels in the bank but ",
                channels[l], " in the model");
  }
}

}  // namespace nad
