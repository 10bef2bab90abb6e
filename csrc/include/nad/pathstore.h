#pragma once
// Per-image path stores (format nad-ext.pathstore/1, docs/DESIGN.md) without Python, read-only:
// a folder with manifest.json and safetensors shards of bit-packed binary paths, as Python's
// nad_ext.gates.pathstore.PathStore writes them. Only the shards the manifest lists are read (an
// orphan shard left by a crash is ignored), each tensor verified against its CRC-32.
//
//   auto store = nad::PathStore::open("paths/");
//   at::Tensor packed = store.packed();                  // (N, ceil(C / 8)) uint8, every image
//   std::vector<at::Tensor> masks = store.masks();       // per gate point, (N, C_l) bool
//   for (int64_t s = 0; s < store.num_shards(); ++s) {   // or shard by shard
//     auto shard = store.shard(s);                       // image_index, ..., masks, logits
//   }
#include <cstdint>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include <nad/export.h>
#include <nad/maskbank.h>  // nad::GatePoint

namespace nad {

class NAD_API PathStore {
 public:
  static constexpr const char* kFormat = "nad-ext.pathstore/1";

  // The rows of one shard: image_index, label, target, prediction (n,) int64; status (n,) int8;
  // masks (n, mask_bytes) uint8, packed; logits (n, C) float16 when the store keeps them (else
  // undefined).
  struct Shard {
    at::Tensor image_index, label, target, prediction, status, masks, logits;
  };

  // Reads and checks the manifest; throws c10::Error naming the folder or file and what is wrong
  // (no folder, no manifest, an unknown format version, fields that disagree).
  static PathStore open(const std::string& folder);

  const std::string& folder() const { return folder_; }
  const std::string& model_id() const { return model_id_; }
  const std::vector<GatePoint>& points() const { return points_; }
  // The run's settings (Python's PathStore.meta), as compact JSON with keys sorted.
  const std::string& meta_json() const { return meta_json_; }
  bool has_logits() const { return logits_; }
  int64_t shard_size() const { return shard_size_; }
  int64_t channels_total() const { return channels_total_; }
  int64_t mask_bytes() const { return (channels_total_ + 7) / 8; }
  int64_t num_shards() const { return static_cast<int64_t>(shard_images_.size()); }
  const std::vector<int64_t>& shard_images() const { return shard_images_; }  // images per shard
  int64_t num_images() const;

  // Shard `index`, every tensor verified against its checksum and checked against the manifest
  // (row count, mask width, dtypes); throws c10::Error naming the shard file (and the tensor).
  Shard shard(int64_t index) const;
  // (N,) int64: every committed image's index, in store order.
  at::Tensor image_indices() const;
  // (N, mask_bytes) uint8: every committed path, packed, in store order.
  at::Tensor packed() const;
  // Per gate point, (N, C_l) bool: every committed path, unpacked, in store order.
  std::vector<at::Tensor> masks() const;

  // Bits start .. start + channels - 1 of each row of an (N, B) uint8 matrix packed in the
  // store's bit order (channel j is bit j % 8, value 1 << (j % 8), of byte j / 8), as (N, channels) bool.
  static at::Tensor unpack(const at::Tensor& packed, int64_t channels, int64_t start = 0);

 private:
  PathStore() = default;
  std::string folder_, model_id_, meta_json_ = "{}";
  std::vector<GatePoint> points_;
  std::vector<int64_t> shard_images_;
  int64_t shard_size_ = 0, channels_total_ = 0;
  bool logits_ = false;
};

}  // namespace nad
