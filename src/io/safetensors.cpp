#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "io/error.h"
#include "io/file_util.h"
#include "io/json_input.h"

namespace llava::io {

namespace fs = std::filesystem;
using nlohmann::json;

// The Rust reader's limit: a larger header is refused before anything is allocated.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// ---------------------------------------------------------------------------------------------- dtypes

namespace {
const std::vector<std::pair<std::string, c10::ScalarType>>& dtype_table() {
  static const std::vector<std::pair<std::string, c10::ScalarType>> table = {
      {"F32", torch::kFloat32}, {"F16", torch::kFloat16}, {"BF16", torch::kBFloat16}, {"F64", torch::kFloat64},
      {"I64", torch::kInt64},   {"I32", torch::kInt32},   {"I16", torch::kInt16},     {"I8", torch::kInt8},
      {"U8", torch::kUInt8},    {"BOOL", torch::kBool}};
  return table;
}
}  // namespace

c10::ScalarType dtype_from_safetensors(const std::string& name, const std::string& where) {
  for (auto& [text, dtype] : dtype_table())
    if (text == name) return dtype;
  fail(where, "unsupported dtype '" + name + "' (expected one of F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL)");
}

std::string dtype_to_safetensors(c10::ScalarType dtype) {
  for (auto& [text, type] : dtype_table())
    if (type == dtype) return text;
  throw Error(std::string("safetensors cannot store dtype ") + c10::toString(dtype));
}

// ------------------------------------------------------------------------------------------ mmap file

class MappedFile {
 public:
  explicit MappedFile(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) fail(path, std::string("cannot open: ") + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      fail(path, "not a regular file");
    }
    size_ = static_cast<uint64_t>(st.st_size);
    if (size_ > 0) {
      // Private + writable: a tensor view modified in place copies the page instead of faulting.
      void* p = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        fail(path, std::string("mmap failed: ") + std::strerror(errno));
      }
      data_ = static_cast<uint8_t*>(p);
    }
    fd_ = fd;  // kept for read_into's pread
  }
  ~MappedFile() {
    if (data_) ::munmap(data_, size_);
    ::close(fd_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  // Drops the pages wholly inside [offset, offset + n) from this process's memory once a tensor was
  // copied out of them (a model loaded with a dtype conversion or onto a GPU would otherwise keep every
  // file page it read mapped: a second copy of the model). Only whole pages of that one tensor, which
  // the caller's view alone used: pages shared with a neighbour stay. Read again, they come from the file.
  void release(uint64_t offset, uint64_t n) const {
    const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    const uint64_t begin = (offset + page - 1) / page * page, end = (offset + n) / page * page;
    if (data_ && end > begin && end <= size_) ::madvise(data_ + begin, end - begin, MADV_DONTNEED);
  }

  uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }

  // Reads `n` bytes at `offset` into dst with pread (the caller checked the range against size()).
  void read(uint64_t offset, void* dst, uint64_t n, const std::string& path) const {
    auto* out = static_cast<uint8_t*>(dst);
    while (n > 0) {
      const ssize_t got = ::pread(fd_, out, std::min<uint64_t>(n, 1u << 30), static_cast<off_t>(offset));
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) fail(path, got < 0 ? std::string("read failed: ") + std::strerror(errno) : "file shrank while reading");
      out += got;
      offset += static_cast<uint64_t>(got);
      n -= static_cast<uint64_t>(got);
    }
  }

 private:
  int fd_ = -1;
  uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
};

// ------------------------------------------------------------------------------------- header parsing

namespace {

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// numel * itemsize with overflow detection (a hostile header can claim absurd shapes).
uint64_t checked_nbytes(const std::vector<int64_t>& shape, size_t itemsize, const std::string& where) {
  uint64_t n = itemsize;
  for (int64_t d : shape) {
    if (d != 0 && n > UINT64_MAX / static_cast<uint64_t>(d)) fail(where, "shape overflows 64-bit byte count");
    n *= static_cast<uint64_t>(d);
  }
  return n;
}

uint64_t as_u64(const json& v, const std::string& where, const std::string& what) {
  if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<int64_t>() >= 0))
    fail(where, what + " must be a non-negative integer, got " + v.dump());
  return v.get<uint64_t>();
}

// Parses the JSON header (bounded like every JSON input), refusing duplicate top-level keys (nlohmann
// would silently keep the last).
json parse_header(const std::string& text, const std::string& path) {
  std::set<std::string> seen;
  JsonParseOptions options;
  options.on_event = [&](int depth, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::key && depth == 1) {
      auto key = parsed.get<std::string>();
      if (!seen.insert(key).second) fail(path, "duplicate tensor name '" + key + "' in header");
    }
  };
  json header = parse_json(text, path + ": header", options);
  if (!header.is_object()) fail(path, "header must be a JSON object");
  return header;
}

TensorInfo parse_tensor_entry(const std::string& name, const json& entry, const std::string& path) {
  const std::string where = path + ": tensor '" + name + "'";
  if (!entry.is_object()) throw Error(where + ": entry must be an object");
  for (const char* key : {"dtype", "shape", "data_offsets"})
    if (!entry.contains(key)) throw Error(where + ": missing '" + key + "'");
  if (!entry["dtype"].is_string()) throw Error(where + ": dtype must be a string");
  TensorInfo info;
  info.name = name;
  info.dtype = dtype_from_safetensors(entry["dtype"].get<std::string>(), where);
  if (!entry["shape"].is_array()) throw Error(where + ": shape must be an array");
  for (auto& d : entry["shape"]) {
    uint64_t dim = as_u64(d, where, "shape entry");
    if (dim > static_cast<uint64_t>(INT64_MAX)) throw Error(where + ": shape entry too large");
    info.shape.push_back(static_cast<int64_t>(dim));
  }
  auto& offsets = entry["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2) throw Error(where + ": data_offsets must be [begin, end]");
  info.begin = as_u64(offsets[0], where, "data_offsets[0]");
  info.end = as_u64(offsets[1], where, "data_offsets[1]");
  if (info.end < info.begin) throw Error(where + ": data_offsets end < begin");
  uint64_t expected = checked_nbytes(info.shape, c10::elementSize(info.dtype), where);
  if (info.end - info.begin != expected)
    throw Error(where + ": dtype/shape/byte-count mismatch: " + entry["dtype"].get<std::string>() + " " +
                entry["shape"].dump() + " needs " + std::to_string(expected) + " bytes, offsets span " +
                std::to_string(info.end - info.begin));
  return info;
}

}  // namespace

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile file;
  file.path_ = path;
  file.map_ = std::make_shared<MappedFile>(path);
  const uint64_t size = file.map_->size();
  if (size < 8) fail(path, "truncated: " + std::to_string(size) + " bytes, a safetensors file starts with an 8-byte header length");
  const uint64_t header_len = read_u64_le(file.map_->data());
  if (header_len > kMaxHeaderBytes)
    fail(path, "header length " + std::to_string(header_len) + " exceeds the limit of " + std::to_string(kMaxHeaderBytes) + " bytes");
  if (8 + header_len > size)
    fail(path, "header length " + std::to_string(header_len) + " runs past the end of the file (" + std::to_string(size) + " bytes)");
  file.data_start_ = 8 + header_len;
  json header = parse_header(std::string(reinterpret_cast<const char*>(file.map_->data()) + 8, header_len), path);

  for (auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) fail(path, "__metadata__ must be an object of strings");
      for (auto& [k, v] : entry.items()) {
        if (!v.is_string()) fail(path, "__metadata__['" + k + "'] must be a string, got " + v.dump());
        file.metadata_[k] = v.get<std::string>();
      }
      continue;
    }
    file.tensors_.push_back(parse_tensor_entry(name, entry, path));
  }

  // Offsets must tile the data section exactly: no holes, no overlaps, nothing past the end.
  std::stable_sort(file.tensors_.begin(), file.tensors_.end(),
                   [](const TensorInfo& a, const TensorInfo& b) { return a.begin < b.begin || (a.begin == b.begin && a.end < b.end); });
  uint64_t cursor = 0;
  for (auto& t : file.tensors_) {
    if (t.begin != cursor)
      fail(path, "tensor '" + t.name + "' data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "] " +
                     (t.begin < cursor ? "overlap the previous tensor" : "leave a hole after byte " + std::to_string(cursor)));
    cursor = t.end;
  }
  const uint64_t data_size = size - file.data_start_;
  if (cursor != data_size)
    fail(path, cursor > data_size ? "data_offsets run past the end of the file (need " + std::to_string(cursor) +
                                        " data bytes, file has " + std::to_string(data_size) + ")"
                                  : "file has " + std::to_string(data_size - cursor) + " trailing bytes after the last tensor");
  for (size_t i = 0; i < file.tensors_.size(); ++i) file.index_[file.tensors_[i].name] = i;
  return file;
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) fail(path_, "no tensor named '" + name + "'");
  return tensors_[it->second];
}

torch::Tensor SafetensorsFile::get(const std::string& name) const {
  const TensorInfo& t = info(name);
  auto options = torch::TensorOptions().dtype(t.dtype);
  if (t.end == t.begin) return torch::empty(t.shape, options);
  uint8_t* ptr = map_->data() + data_start_ + t.begin;
  if (reinterpret_cast<uintptr_t>(ptr) % c10::elementSize(t.dtype) != 0) {
    auto out = torch::empty(t.shape, options);
    std::memcpy(out.data_ptr(), ptr, t.end - t.begin);
    return out;
  }
  auto keep_alive = map_;
  return torch::from_blob(ptr, t.shape, [keep_alive](void*) {}, options);
}

void SafetensorsFile::read_into(const std::string& name, torch::Tensor& dst) const {
  const TensorInfo& t = info(name);
  const bool direct = dst.is_cpu() && dst.is_contiguous() && dst.scalar_type() == t.dtype &&
                      dst.sizes().vec() == t.shape;
  if (!direct) {
    dst.copy_(get(name));  // synchronous: the view is consumed before its pages go
    map_->release(data_start_ + t.begin, t.end - t.begin);
    return;
  }
  map_->read(data_start_ + t.begin, dst.data_ptr(), t.end - t.begin, path_);
}

// ------------------------------------------------------------------------------------------- writing

namespace {

torch::Tensor cpu_contiguous(const torch::Tensor& t) { return t.detach().to(torch::kCPU).contiguous(); }

}  // namespace

void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<std::pair<std::string, torch::Tensor>> sorted;
  std::set<std::string> names;
  for (auto& [name, tensor] : tensors) {
    if (!names.insert(name).second) fail(path, "duplicate tensor name '" + name + "'");
    if (name == "__metadata__") fail(path, "'__metadata__' cannot be a tensor name");
    sorted.emplace_back(name, cpu_contiguous(tensor));
  }
  // Like the Rust writer: wider dtypes first (keeps every tensor aligned), then by name.
  std::sort(sorted.begin(), sorted.end(), [](auto& a, auto& b) {
    size_t ia = a.second.element_size(), ib = b.second.element_size();
    return ia != ib ? ia > ib : a.first < b.first;
  });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (auto& [name, t] : sorted) {
    uint64_t nbytes = t.numel() * t.element_size();
    header[name] = {{"dtype", dtype_to_safetensors(t.scalar_type())},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string header_text = header.dump();
  header_text.append((8 - header_text.size() % 8) % 8, ' ');

  write_file_atomic(path, [&](std::FILE* f) {
    uint8_t len[8];
    uint64_t n = header_text.size();
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
    auto put = [&](const void* data, size_t bytes) {
      if (bytes && std::fwrite(data, 1, bytes, f) != bytes) fail(path, std::string("write failed: ") + std::strerror(errno));
    };
    put(len, 8);
    put(header_text.data(), header_text.size());
    for (auto& [name, t] : sorted) put(t.data_ptr(), t.numel() * t.element_size());
  });
}

uint64_t parse_size(const std::string& text) {
  size_t pos = 0;
  double value = 0;
  try {
    value = std::stod(text, &pos);
  } catch (...) {
    throw Error("size '" + text + "': expected a number with an optional unit (e.g. 5GB, 200MB)");
  }
  std::string unit = text.substr(pos);
  unit.erase(std::remove(unit.begin(), unit.end(), ' '), unit.end());
  std::transform(unit.begin(), unit.end(), unit.begin(), ::toupper);
  static const std::map<std::string, double> units = {
      {"", 1},      {"B", 1},        {"KB", 1e3},     {"MB", 1e6},        {"GB", 1e9},
      {"TB", 1e12}, {"KIB", 1024.0}, {"MIB", 1048576.0}, {"GIB", 1073741824.0}, {"TIB", 1099511627776.0}};
  auto it = units.find(unit);
  if (it == units.end()) throw Error("size '" + text + "': unknown unit (use B, KB, MB, GB, TB, KiB, MiB, GiB)");
  // A double beyond 2^63 (or NaN/inf, or negative) has no uint64 value: the cast would be undefined.
  const double bytes = value * it->second;
  if (!std::isfinite(bytes) || bytes < 0 || bytes > 9.2e18)
    throw Error("size '" + text + "': expected a size from 0 to 9.2e18 bytes (e.g. 5GB, 200MB)");
  return static_cast<uint64_t>(bytes);
}

// ------------------------------------------------------------------------------------------- sharding

ShardedSafetensors ShardedSafetensors::open(const std::string& path) {
  ShardedSafetensors model;
  fs::path p(path);
  fs::path index_path;
  if (fs::is_directory(p)) {
    if (fs::exists(p / "model.safetensors.index.json")) index_path = p / "model.safetensors.index.json";
    else if (fs::exists(p / "model.safetensors")) p = p / "model.safetensors";
    else fail(path, "no model.safetensors or model.safetensors.index.json in this directory");
  } else if (p.string().size() > 11 && p.string().substr(p.string().size() - 11) == ".index.json") {
    index_path = p;
  }

  if (index_path.empty()) {
    model.files_.push_back(SafetensorsFile::open(p.string()));
    for (auto& t : model.files_[0].tensors()) model.where_[t.name] = 0;
    return model;
  }

  const std::string where = index_path.string();
  const json index = read_json_file(where);
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
    fail(where, "expected an object with a 'weight_map' object");
  std::map<std::string, size_t> shard_ids;
  for (auto& [name, shard] : index["weight_map"].items()) {
    if (!shard.is_string()) fail(where, "weight_map['" + name + "'] must be a file name");
    auto file = shard.get<std::string>();
    if (file.empty() || file.find('/') != std::string::npos || file.find('\\') != std::string::npos || file == "." || file == "..")
      fail(where, "weight_map['" + name + "'] = '" + file + "' is not a plain file name in the checkpoint directory");
    auto [it, inserted] = shard_ids.emplace(file, model.files_.size());
    if (inserted) model.files_.push_back(SafetensorsFile::open((index_path.parent_path() / file).string()));
    if (!model.files_[it->second].contains(name))
      fail(where, "weight_map says '" + name + "' is in " + file + ", but that shard has no such tensor");
    model.where_[name] = it->second;
  }
  return model;
}

std::vector<std::string> ShardedSafetensors::names() const {
  std::vector<std::string> out;
  for (auto& [name, _] : where_) out.push_back(name);
  return out;
}

const TensorInfo& ShardedSafetensors::info(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) throw Error("no tensor named '" + name + "' in the checkpoint");
  return files_[it->second].info(name);
}

void ShardedSafetensors::read_into(const std::string& name, torch::Tensor& dst) const {
  auto it = where_.find(name);
  if (it == where_.end()) throw Error("no tensor named '" + name + "' in the checkpoint");
  files_[it->second].read_into(name, dst);
}

torch::Tensor ShardedSafetensors::get(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) throw Error("no tensor named '" + name + "' in the checkpoint");
  return files_[it->second].get(name);
}

std::vector<std::string> save_sharded(const std::string& dir, const NamedTensors& tensors, uint64_t max_shard_bytes,
                                      const std::string& base) {
  fs::create_directories(dir);
  std::vector<NamedTensors> shards(1);
  uint64_t shard_bytes = 0, total_bytes = 0;
  for (auto& [name, t] : tensors) {
    uint64_t nbytes = t.numel() * t.element_size();
    if (!shards.back().empty() && shard_bytes + nbytes > max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().emplace_back(name, t);
    shard_bytes += nbytes;
    total_bytes += nbytes;
  }
  std::vector<std::string> written;
  const fs::path index_path = fs::path(dir) / (base + ".safetensors.index.json");
  if (shards.size() == 1) {
    written.push_back((fs::path(dir) / (base + ".safetensors")).string());
    save_safetensors(written.back(), shards[0]);
    fs::remove(index_path);  // a stale index would point loaders at shards we did not write
    return written;
  }
  json weight_map = json::object();
  char name_buf[64];
  for (size_t i = 0; i < shards.size(); ++i) {
    std::snprintf(name_buf, sizeof name_buf, "-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    const std::string file = base + name_buf;
    written.push_back((fs::path(dir) / file).string());
    save_safetensors(written.back(), shards[i]);
    for (auto& [name, _] : shards[i]) weight_map[name] = file;
  }
  json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
  write_file_atomic(index_path.string(), index.dump(2) + "\n");
  written.push_back(index_path.string());
  return written;
}

}  // namespace llava::io
