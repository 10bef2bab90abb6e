#include <nad/maskbank.h>

#include <charconv>
#include <cstdio>
#include <map>

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

// An optional per-gate-point list (absent from older banks: `fallback` for every gate point).
template <typename T, typename Read>
std::vector<T> optional_list(const SafetensorsFile& file, const std::string& key, size_t count, T fallback,
                             Read read) {
  if (!file.metadata.count(key)) return std::vector<T>(count, fallback);
  std::vector<T> out = read();
  TORCH_CHECK(out.size() == count, file.path, ": ", count, " gate points but ", out.size(),
              " entries in metadata \"", key, "\"");
  return out;
}

// The tensor key of gate point `index`: logits.000, logits.001, ...
std::string logits_key(size_t index) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "logits.%03zu", index);
  return buf;
}

void check_json_object(const std::string& text, const std::string& where) {
  Value v;
  try {
    v = json::parse(text);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, where, " is not valid JSON: ", e.what());
  }
  TORCH_CHECK(v.kind == Value::Kind::Object, where, " must be a JSON object, got ", json::kind_name(v.kind));
}

template <typename T, typename Write>
std::string json_list(const std::vector<T>& items, Write write) {
  std::string out = "[";
  for (size_t i = 0; i < items.size(); ++i) out += (i ? ", " : "") + write(items[i]);
  return out + "]";
}

std::string quoted(const std::string& s) { return json::quote(s); }
std::string number(int64_t v) { return std::to_string(v); }

}  // namespace

MaskBank::MaskBank(std::string model_id, std::vector<GatePoint> points, std::vector<Task> tasks,
                   std::vector<at::Tensor> logits, std::string config_json, int64_t epoch,
                   std::optional<std::string> calibration_json, std::optional<std::string> fidelity_json)
    : model_id_(std::move(model_id)),
      points_(std::move(points)),
      tasks_(std::move(tasks)),
      config_json_(std::move(config_json)),
      epoch_(epoch),
      calibration_json_(std::move(calibration_json)),
      fidelity_json_(std::move(fidelity_json)) {
  TORCH_CHECK(logits.size() == points_.size(), "MaskBank: ", logits.size(), " logits tensors for ",
              points_.size(), " gate points");
  for (size_t l = 0; l < logits.size(); ++l) {
    TORCH_CHECK(logits[l].defined(), "MaskBank: logits of gate point \"", points_[l].name, "\" are undefined");
    logits_.push_back(logits[l].detach().to(at::kCPU, at::kFloat).contiguous().clone());
  }
  validate("MaskBank");
}

void MaskBank::validate(const std::string& where) const {
  const int64_t T = num_tasks();
  for (size_t l = 0; l < points_.size(); ++l) {
    const auto& p = points_[l];
    TORCH_CHECK(p.units == "channels" || p.units == "heads", where, ": gate point \"", p.name,
                "\" has units \"", p.units, "\" (expected \"channels\" or \"heads\")");
    TORCH_CHECK(p.record == "output" || p.record == "relu", where, ": gate point \"", p.name,
                "\" records \"", p.record, "\" (expected \"output\" or \"relu\")");
    TORCH_CHECK(p.channel_axis >= 1, where, ": gate point \"", p.name, "\" has channel axis ", p.channel_axis,
                " (the batch is axis 0)");
    TORCH_CHECK(p.channels >= 0, where, ": gate point \"", p.name, "\" has ", p.channels, " channels");
    const at::Tensor& t = logits_[l];
    TORCH_CHECK(t.dim() == 2 && t.size(0) == T && t.size(1) == p.channels, where, ": logits of gate point \"",
                p.name, "\" must have shape (", T, ", ", p.channels, ") for ", T, " tasks and ", p.channels, " ",
                p.units, ", got ", t.sizes());
  }
  check_json_object(config_json_, where + ": config");
  if (calibration_json_) check_json_object(*calibration_json_, where + ": calibration");
  if (fidelity_json_) check_json_object(*fidelity_json_, where + ": fidelity");
  TORCH_CHECK(epoch_ >= 0, where, ": epoch must be non-negative, got ", epoch_);
}

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
  const auto names = string_list(file, "gate_points");
  const auto channels = int_list(file, "channels", metadata_json(file, "channels", Value::Kind::Array));
  const size_t L = names.size();
  TORCH_CHECK(channels.size() == L, path, ": ", L, " gate points but ", channels.size(), " channel counts");
  // Banks written before channel axes, head units and records existed: Python's defaults.
  const auto axes = optional_list<int64_t>(file, "channel_axes", L, 1, [&] {
    return int_list(file, "channel_axes", metadata_json(file, "channel_axes", Value::Kind::Array));
  });
  const auto units = optional_list<std::string>(file, "units", L, "channels", [&] { return string_list(file, "units"); });
  const auto records = optional_list<std::string>(file, "records", L, "output", [&] { return string_list(file, "records"); });
  for (size_t l = 0; l < L; ++l) bank.points_.push_back({names[l], channels[l], axes[l], units[l], records[l]});

  const auto task_names = string_list(file, "tasks");
  const auto& classes = metadata_json(file, "task_classes", Value::Kind::Array).items;
  TORCH_CHECK(classes.size() == task_names.size(), path, ": ", task_names.size(), " tasks but ", classes.size(),
              " entries in task_classes");
  for (size_t t = 0; t < task_names.size(); ++t) {
    TORCH_CHECK(classes[t].kind == Value::Kind::Array, path,
                ": metadata \"task_classes\" must be a list of lists of class indices");
    bank.tasks_.push_back({task_names[t], int_list(file, "task_classes", classes[t])});
  }
  metadata_json(file, "config", Value::Kind::Object);  // validated, kept as written
  bank.config_json_ = file.metadata.at("config");
  if (file.metadata.count("calibration")) {
    metadata_json(file, "calibration", Value::Kind::Object);
    bank.calibration_json_ = file.metadata.at("calibration");
  }
  if (file.metadata.count("fidelity")) {
    metadata_json(file, "fidelity", Value::Kind::Object);
    bank.fidelity_json_ = file.metadata.at("fidelity");
  }
  const auto epoch = file.metadata.find("epoch");
  TORCH_CHECK(epoch != file.metadata.end(), path, ": metadata \"epoch\" is missing");
  const auto& e = epoch->second;
  const auto [end, err] = std::from_chars(e.data(), e.data() + e.size(), bank.epoch_);
  TORCH_CHECK(err == std::errc() && end == e.data() + e.size() && bank.epoch_ >= 0, path,
              ": metadata \"epoch\" must be a non-negative integer, got \"", e, "\"");

  const int64_t T = bank.num_tasks();
  TORCH_CHECK(file.tensors.size() == L, path, ": ", L, " gate points but ", file.tensors.size(),
              " tensors (expected logits.000 ... one per gate point)");
  for (size_t l = 0; l < L; ++l) {
    const std::string key = logits_key(l);
    TORCH_CHECK(file.tensors.count(key), path, ": tensor \"", key, "\" (gate point ", l, ", ",
                names[l], ") is missing");
    const at::Tensor& t = file.tensors.at(key);
    TORCH_CHECK(t.scalar_type() == at::kFloat, path, ": tensor \"", key,
                "\" must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == T && t.size(1) == channels[l], path,
                ": tensor \"", key, "\" (", names[l], ") must have shape (", T, ", ",
                channels[l], ") for ", T, " tasks and ", channels[l],
                " channels, got ", t.sizes());
    TORCH_CHECK(channels[l] >= 1, path, ": gate point \"", names[l], "\" has ", channels[l],
                " channels (expected at least 1)");
    // As Python's reader: no run commits a NaN or infinite gate logit (the trainer stops or skips
    // such steps), so one is damage.
    const int64_t bad = (~at::isfinite(t)).sum().item<int64_t>();
    TORCH_CHECK(bad == 0, path, ": tensor \"", key, "\" (gate point \"", names[l], "\") holds ", bad,
                " NaN or infinite values; gate logits must be finite");
    bank.logits_.push_back(t);
  }
  bank.validate(path);
  return bank;
}

void MaskBank::save(const std::string& path) const {
  std::map<std::string, at::Tensor> tensors;
  for (size_t l = 0; l < logits_.size(); ++l) tensors[logits_key(l)] = logits_[l];
  std::map<std::string, std::string> metadata;
  try {
    metadata = {
        {"format", kFormat},
        {"model_id", model_id_},
        {"gate_points", json_list(points_, [](const GatePoint& p) { return quoted(p.name); })},
        {"channels", json_list(points_, [](const GatePoint& p) { return number(p.channels); })},
        {"channel_axes", json_list(points_, [](const GatePoint& p) { return number(p.channel_axis); })},
        {"units", json_list(points_, [](const GatePoint& p) { return quoted(p.units); })},
        {"records", json_list(points_, [](const GatePoint& p) { return quoted(p.record); })},
        {"tasks", json_list(tasks_, [](const Task& t) { return quoted(t.name); })},
        {"task_classes", json_list(tasks_, [](const Task& t) { return json_list(t.classes, number); })},
        {"config", config_json_},
        {"epoch", std::to_string(epoch_)},
    };
  } catch (const std::runtime_error& e) {  // json::quote: a name that is not UTF-8
    TORCH_CHECK(false, "cannot write ", path, ": a gate point or task name: ", e.what());
  }
  if (calibration_json_) metadata["calibration"] = *calibration_json_;
  if (fidelity_json_) metadata["fidelity"] = *fidelity_json_;
  save_safetensors(path, tensors, metadata);
}

std::vector<std::string> MaskBank::gate_points() const {
  std::vector<std::string> out;
  for (const auto& p : points_) out.push_back(p.name);
  return out;
}

std::vector<int64_t> MaskBank::channels() const {
  std::vector<int64_t> out;
  for (const auto& p : points_) out.push_back(p.channels);
  return out;
}

std::vector<int64_t> MaskBank::channel_axes() const {
  std::vector<int64_t> out;
  for (const auto& p : points_) out.push_back(p.channel_axis);
  return out;
}

std::vector<std::string> MaskBank::units() const {
  std::vector<std::string> out;
  for (const auto& p : points_) out.push_back(p.units);
  return out;
}

std::vector<std::string> MaskBank::records() const {
  std::vector<std::string> out;
  for (const auto& p : points_) out.push_back(p.record);
  return out;
}

std::vector<std::string> MaskBank::tasks() const {
  std::vector<std::string> out;
  for (const auto& t : tasks_) out.push_back(t.name);
  return out;
}

std::vector<std::vector<int64_t>> MaskBank::task_classes() const {
  std::vector<std::vector<int64_t>> out;
  for (const auto& t : tasks_) out.push_back(t.classes);
  return out;
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
  TORCH_CHECK(gate_points.size() == points_.size(), bank, " does not match the model: it has ",
              points_.size(), " gate points, the model ", gate_points.size());
  for (size_t l = 0; l < gate_points.size(); ++l) {
    TORCH_CHECK(gate_points[l] == points_[l].name, bank, " does not match the model: gate point ",
                l, " is \"", points_[l].name, "\" in the bank but \"", gate_points[l],
                "\" in the model");
    TORCH_CHECK(channels[l] == points_[l].channels, bank, " does not match the model: gate point ", l,
                " (\"", points_[l].name, "\") has ", points_[l].channels, " channels in the bank but ",
                channels[l], " in the model");
  }
}

void MaskBank::check_matches(const std::vector<GatePoint>& gate_points) const {
  std::vector<std::string> names;
  std::vector<int64_t> channels;
  for (const auto& p : gate_points) {
    names.push_back(p.name);
    channels.push_back(p.channels);
  }
  check_matches(names, channels);
  const std::string bank = "mask bank " + path_ + " (model " + model_id_ + ")";
  for (size_t l = 0; l < gate_points.size(); ++l) {
    const auto &mine = points_[l], &theirs = gate_points[l];
    TORCH_CHECK(mine.units == theirs.units, bank, " does not match the model: gate point \"", mine.name,
                "\" gates ", mine.units, " in the bank but ", theirs.units, " in the model");
    TORCH_CHECK(mine.channel_axis == theirs.channel_axis, bank, " does not match the model: gate point \"",
                mine.name, "\" gates axis ", mine.channel_axis, " in the bank but axis ", theirs.channel_axis,
                " in the model");
  }
}

}  // namespace nad
