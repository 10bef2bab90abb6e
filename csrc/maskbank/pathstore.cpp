#include <nad/pathstore.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nad/safetensors.h>

#include "json.h"

namespace nad {
namespace {

using json::Value;

std::string shard_name(int64_t index) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "shard-%05lld.safetensors", static_cast<long long>(index));
  return buf;
}

// The manifest's member `key` of kind `kind`.
const Value& member(const Value& manifest, const std::string& key, Value::Kind kind, const std::string& where) {
  const Value* v = manifest.find(key);
  TORCH_CHECK(v, where, ": \"", key, "\" is missing");
  TORCH_CHECK(v->kind == kind, where, ": \"", key, "\" must be ", json::kind_name(kind), ", got ",
              json::kind_name(v->kind));
  return *v;
}

int64_t integer(const Value& v, const std::string& what, const std::string& where) {
  try {
    return v.as_int(what);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, where, ": ", e.what());
  }
}

// A JSON value as compact text, keys in file order (Python writes them sorted), numbers as written,
// strings as Python's json.dumps writes them: what json.dumps(value, sort_keys=True) gives.
std::string dump(const Value& v) {
  switch (v.kind) {
    case Value::Kind::Null: return "null";
    case Value::Kind::Bool: return v.boolean ? "true" : "false";
    case Value::Kind::Number: return v.text;
    case Value::Kind::String: return json::quote(v.text);
    case Value::Kind::Array: {
      std::string out = "[";
      for (size_t i = 0; i < v.items.size(); ++i) out += (i ? ", " : "") + dump(v.items[i]);
      return out + "]";
    }
    case Value::Kind::Object: {
      std::string out = "{";
      for (size_t i = 0; i < v.members.size(); ++i)
        out += (i ? ", " : "") + json::quote(v.members[i].first) + ": " + dump(v.members[i].second);
      return out + "}";
    }
  }
  return "null";
}

}  // namespace

PathStore PathStore::open(const std::string& folder) {
  namespace fs = std::filesystem;
  TORCH_CHECK(fs::is_directory(folder), "path store ", folder, " does not exist");
  const std::string path = (fs::path(folder) / "manifest.json").string();
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, folder, " is not a path store (it has no manifest.json)");
  std::stringstream text;
  text << in.rdbuf();
  Value m;
  try {
    m = json::parse(text.str());
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, "path store manifest ", path, " is corrupted: ", e.what());
  }
  TORCH_CHECK(m.kind == Value::Kind::Object, "path store manifest ", path, " is corrupted: not a JSON object");
  const Value* format = m.find("format");
  TORCH_CHECK(format && format->kind == Value::Kind::String && format->text == kFormat, path,
              ": unknown path store format \"", format && format->kind == Value::Kind::String ? format->text : "",
              "\" (this library reads ", kFormat, ")");
  const std::string where = "path store manifest " + path;

  PathStore store;
  store.folder_ = folder;
  store.model_id_ = member(m, "model_id", Value::Kind::String, where).text;
  const auto& names = member(m, "gate_points", Value::Kind::Array, where).items;
  const auto& channels = member(m, "channels", Value::Kind::Array, where).items;
  const auto& axes = member(m, "channel_axes", Value::Kind::Array, where).items;
  const auto& units = member(m, "units", Value::Kind::Array, where).items;
  const auto& records = member(m, "records", Value::Kind::Array, where).items;
  const size_t L = names.size();
  TORCH_CHECK(L > 0 && channels.size() == L && axes.size() == L && units.size() == L && records.size() == L, where,
              ": gate_points, channels, channel_axes, units and records must be non-empty lists of one length");
  for (size_t l = 0; l < L; ++l) {
    TORCH_CHECK(names[l].kind == Value::Kind::String && units[l].kind == Value::Kind::String &&
                    records[l].kind == Value::Kind::String,
                where, ": gate point ", l, ": name, units and record must be strings");
    GatePoint p{names[l].text, integer(channels[l], "channels", where), integer(axes[l], "channel_axes", where),
                units[l].text, records[l].text};
    TORCH_CHECK(p.channels >= 1 && p.channel_axis >= 1, where, ": gate point \"", p.name,
                "\" must have channels and channel axis >= 1");
    TORCH_CHECK(p.units == "channels" || p.units == "heads", where, ": gate point \"", p.name, "\" has units \"",
                p.units, "\"");
    TORCH_CHECK(p.record == "output" || p.record == "relu", where, ": gate point \"", p.name, "\" records \"",
                p.record, "\"");
    store.channels_total_ += p.channels;
    store.points_.push_back(std::move(p));
  }
  TORCH_CHECK(integer(member(m, "channels_total", Value::Kind::Number, where), "channels_total", where) ==
                      store.channels_total_ &&
                  integer(member(m, "mask_bytes", Value::Kind::Number, where), "mask_bytes", where) ==
                      store.mask_bytes() &&
                  member(m, "bit_order", Value::Kind::String, where).text == "little",
              where, ": channels_total, mask_bytes or bit_order disagree with the gate points");
  store.logits_ = member(m, "logits", Value::Kind::Bool, where).boolean;
  store.shard_size_ = integer(member(m, "shard_size", Value::Kind::Number, where), "shard_size", where);
  TORCH_CHECK(store.shard_size_ >= 1, where, ": shard_size must be >= 1");
  store.meta_json_ = dump(member(m, "meta", Value::Kind::Object, where));
  const auto& shards = member(m, "shards", Value::Kind::Array, where).items;
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string entry = where + ": shard entry " + std::to_string(i);
    TORCH_CHECK(shards[i].kind == Value::Kind::Object, entry, " must be an object");
    TORCH_CHECK(member(shards[i], "file", Value::Kind::String, entry).text == shard_name(static_cast<int64_t>(i)),
                entry, " must name ", shard_name(static_cast<int64_t>(i)));
    const int64_t n = integer(member(shards[i], "images", Value::Kind::Number, entry), "images", entry);
    TORCH_CHECK(n >= 1 && n <= store.shard_size_, entry, ": images must lie in [1, shard_size], got ", n);
    store.shard_images_.push_back(n);
  }
  TORCH_CHECK(integer(member(m, "images", Value::Kind::Number, where), "images", where) == store.num_images(), where,
              ": images is not the sum of the shards' images");
  return store;
}

int64_t PathStore::num_images() const {
  int64_t n = 0;
  for (const int64_t k : shard_images_) n += k;
  return n;
}

PathStore::Shard PathStore::shard(int64_t index) const {
  TORCH_CHECK(index >= 0 && index < num_shards(), "path store ", folder_, " has ", num_shards(), " shards, not ",
              index + 1);
  const std::string path = (std::filesystem::path(folder_) / shard_name(index)).string();
  TORCH_CHECK(std::filesystem::is_regular_file(path), "path store ", folder_, ": shard ", shard_name(index),
              " is missing (the manifest lists ", num_shards(), " shards)");
  const SafetensorsFile file = read_safetensors(path);  // verifies the checksums, naming the tensor
  TORCH_CHECK(file.verified, "path store shard ", path, " has no checksums");
  const auto meta = [&](const std::string& key) {
    const auto it = file.metadata.find(key);
    return it == file.metadata.end() ? std::string() : it->second;
  };
  TORCH_CHECK(meta("format") == kFormat && meta("shard") == std::to_string(index), "path store shard ", path,
              " is not shard ", index, " of a ", kFormat, " store");
  const int64_t n = shard_images_[static_cast<size_t>(index)];
  const auto get = [&](const std::string& name, at::ScalarType type, std::vector<int64_t> shape) {
    const auto it = file.tensors.find(name);
    TORCH_CHECK(it != file.tensors.end(), "path store shard ", path, " is corrupted: it has no tensor \"", name, "\"");
    const at::Tensor& t = it->second;
    TORCH_CHECK(t.scalar_type() == type && t.sizes() == at::IntArrayRef(shape), "path store shard ", path,
                ": tensor \"", name, "\" is ", t.scalar_type(), " ", t.sizes(), ", but the manifest says ", type, " ",
                at::IntArrayRef(shape), " (", n, " images, ", channels_total_, " channels)");
    return t;
  };
  Shard s;
  s.image_index = get("image_index", at::kLong, {n});
  s.label = get("label", at::kLong, {n});
  s.target = get("target", at::kLong, {n});
  s.prediction = get("prediction", at::kLong, {n});
  s.status = get("status", at::kChar, {n});
  s.masks = get("masks", at::kByte, {n, mask_bytes()});
  if (logits_) s.logits = get("logits", at::kHalf, {n, channels_total_});
  return s;
}

at::Tensor PathStore::image_indices() const {
  std::vector<at::Tensor> parts;
  for (int64_t i = 0; i < num_shards(); ++i) parts.push_back(shard(i).image_index);
  return parts.empty() ? at::empty({0}, at::kLong) : at::cat(parts);
}

at::Tensor PathStore::packed() const {
  at::Tensor out = at::empty({num_images(), mask_bytes()}, at::kByte);
  int64_t row = 0;
  for (int64_t i = 0; i < num_shards(); ++i) {
    const at::Tensor m = shard(i).masks;
    out.narrow(0, row, m.size(0)).copy_(m);
    row += m.size(0);
  }
  return out;
}

std::vector<at::Tensor> PathStore::masks() const {
  const at::Tensor all = packed();
  std::vector<at::Tensor> out;
  int64_t start = 0;
  for (const auto& p : points_) {
    out.push_back(unpack(all, p.channels, start));
    start += p.channels;
  }
  return out;
}

at::Tensor PathStore::unpack(const at::Tensor& packed, int64_t channels, int64_t start) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte, "PathStore::unpack: expected an (N, B) uint8 ",
              "tensor, got ", packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(start >= 0 && channels >= 0 && start + channels <= packed.size(1) * 8, "PathStore::unpack: bits ",
              start, "..", start + channels, " exceed the ", packed.size(1), " bytes of a row");
  const int64_t first = start / 8, last = (start + channels + 7) / 8;
  const at::Tensor shifts = at::arange(8, packed.options());
  const at::Tensor bits = packed.narrow(1, first, last - first).unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and(1);
  return bits.reshape({packed.size(0), -1}).narrow(1, start - 8 * first, channels).to(at::kBool);
}

}  // namespace nad
