// safetensors files and HF sharded checkpoints.
//
// Format: u64 LE header length N | N bytes of JSON {name: {dtype, shape, data_offsets:[b,e]}, "__metadata__":
// {str: str}} | data. We validate every offset against the file before any tensor is touched.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

namespace llava::io {

struct TensorInfo {
  std::string name;
  c10::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte offsets relative to the data section
};

// "F32" <-> torch dtype. Error for names we do not support.
c10::ScalarType dtype_from_safetensors(const std::string& name, const std::string& where);
std::string dtype_to_safetensors(c10::ScalarType dtype);

class MappedFile;  // read-only mmap, shared by every tensor view into it

class SafetensorsFile {
 public:
  // Maps and validates `path` (header size, JSON, dtypes, shapes, contiguous non-overlapping offsets,
  // file size). Error names the file and the fault.
  static SafetensorsFile open(const std::string& path);

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // in data-offset order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return index_.count(name) > 0; }
  const TensorInfo& info(const std::string& name) const;

  // A CPU tensor over the mapped bytes (no copy when the bytes are aligned for the dtype; the view
  // keeps the mapping alive), or a copy otherwise.
  torch::Tensor get(const std::string& name) const;
  // Copies the tensor into `dst` (same shape). A contiguous CPU dst of the same dtype is filled with
  // read(2) straight from the file: on a cold page cache about twice as fast as faulting in the mapping.
  void read_into(const std::string& name, torch::Tensor& dst) const;

 private:
  std::string path_;
  std::shared_ptr<MappedFile> map_;
  uint64_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// Writes one safetensors file atomically, laid out like the Rust writer (larger dtypes first, then by
// name), header padded with spaces to 8 bytes. Tensors may live on any device and be non-contiguous.
void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

// "5GB", "200MB", "10KB", "123" (bytes). Decimal units like huggingface_hub.
uint64_t parse_size(const std::string& text);

// An HF checkpoint directory: `<base>.safetensors` or `<base>.safetensors.index.json` + shards.
class ShardedSafetensors {
 public:
  // `dir` is a directory (looks for model.safetensors.index.json, then model.safetensors) or a single
  // .safetensors / .index.json file.
  static ShardedSafetensors open(const std::string& path);

  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return where_.count(name) > 0; }
  const TensorInfo& info(const std::string& name) const;
  torch::Tensor get(const std::string& name) const;
  void read_into(const std::string& name, torch::Tensor& dst) const;  // as SafetensorsFile::read_into
  const std::vector<SafetensorsFile>& files() const { return files_; }

 private:
  std::vector<SafetensorsFile> files_;
  std::map<std::string, size_t> where_;  // tensor name -> index into files_
};

// Writes `dir/<base>.safetensors` when everything fits in `max_shard_bytes`, otherwise
// `dir/<base>-0000i-of-0000n.safetensors` + `dir/<base>.safetensors.index.json` (HF's split rule: keep
// state-dict order, start a new shard when the next tensor would overflow). Returns the files written.
std::vector<std::string> save_sharded(const std::string& dir, const NamedTensors& tensors,
                                      uint64_t max_shard_bytes, const std::string& base = "model");

}  // namespace llava::io
