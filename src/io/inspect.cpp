#include "io/inspect.h"

#include <filesystem>
#include <sstream>

#include "io/error.h"
#include "io/safetensors.h"
#include "io/torch_archive.h"

namespace llava::io {

namespace fs = std::filesystem;

namespace {

std::string shape_text(c10::IntArrayRef shape) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

std::string torch_dtype_name(c10::ScalarType t) {
  switch (t) {
    case torch::kFloat32: return "float32";
    case torch::kFloat64: return "float64";
    case torch::kFloat16: return "float16";
    case torch::kBFloat16: return "bfloat16";
    case torch::kInt64: return "int64";
    case torch::kInt32: return "int32";
    case torch::kInt16: return "int16";
    case torch::kInt8: return "int8";
    case torch::kUInt8: return "uint8";
    case torch::kBool: return "bool";
    default: return c10::toString(t);
  }
}

struct Totals {
  size_t tensors = 0;
  uint64_t bytes = 0;
};

void print_tensor_line(std::ostream& out, const std::string& name, const std::string& dtype, c10::IntArrayRef shape,
                       uint64_t bytes, Totals& totals) {
  out << name << "  " << dtype << "  " << shape_text(shape) << "  " << bytes << " bytes\n";
  totals.tensors++;
  totals.bytes += bytes;
}

void inspect_safetensors(const ShardedSafetensors& model, std::ostream& out, Totals& totals) {
  for (auto& name : model.names()) {
    const TensorInfo& t = model.info(name);
    print_tensor_line(out, name, dtype_to_safetensors(t.dtype), t.shape, t.end - t.begin, totals);
  }
}

std::string scalar_text(const c10::IValue& v) {
  if (v.isNone()) return "None";
  if (v.isBool()) return v.toBool() ? "True" : "False";
  if (v.isInt()) return std::to_string(v.toInt());
  if (v.isDouble()) {
    std::ostringstream s;
    s.precision(17);
    s << v.toDouble();
    return s.str();
  }
  if (v.isString()) return "'" + v.toStringRef() + "'";
  return "<" + v.tagKind() + ">";
}

void walk(const c10::IValue& v, const std::string& path, std::ostream& out, Totals& totals) {
  auto child = [&](const std::string& key) { return path.empty() ? key : path + "." + key; };
  if (v.isTensor()) {
    auto t = v.toTensor();
    return print_tensor_line(out, path.empty() ? "<tensor>" : path, torch_dtype_name(t.scalar_type()), t.sizes(),
                             t.numel() * t.element_size(), totals);
  }
  if (v.isGenericDict()) {
    auto dict = v.toGenericDict();
    if (dict.empty()) out << (path.empty() ? "<root>" : path) << " = {}\n";
    for (auto& e : dict) {
      const auto& k = e.key();
      walk(e.value(), child(k.isString() ? k.toStringRef() : scalar_text(k)), out, totals);
    }
    return;
  }
  if (v.isList() || v.isTuple()) {
    std::vector<c10::IValue> items;
    if (v.isTuple()) items = v.toTupleRef().elements().vec();
    else for (size_t i = 0; i < v.toList().size(); ++i) items.push_back(v.toList().get(i));
    bool all_scalars = true;
    for (auto& i : items) all_scalars = all_scalars && !i.isTensor() && !i.isGenericDict() && !i.isList() && !i.isTuple();
    if (all_scalars) {  // print short scalar sequences on one line, like Python would
      out << (path.empty() ? "<root>" : path) << " = " << (v.isTuple() ? "(" : "[");
      for (size_t i = 0; i < items.size(); ++i) out << (i ? ", " : "") << scalar_text(items[i]);
      out << (v.isTuple() ? ")" : "]") << "\n";
      return;
    }
    for (size_t i = 0; i < items.size(); ++i) walk(items[i], child(std::to_string(i)), out, totals);
    return;
  }
  out << (path.empty() ? "<root>" : path) << " = " << scalar_text(v) << "\n";
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

void inspect_file(const fs::path& file, std::ostream& out, Totals& totals) {
  const std::string name = file.string();
  if (ends_with(name, ".safetensors") || ends_with(name, ".safetensors.index.json"))
    return inspect_safetensors(ShardedSafetensors::open(name), out, totals);
  // The widest restricted set: DeepSpeed's files and HF's rng_state.pth (NumPy arrays) list too, every
  // global still rebuilt as plain data, never run.
  if (is_zip_file(name)) return walk(load_pt(name, pickle::Globals::kDeepSpeed), "", out, totals);
  fail(name, "not a safetensors file, safetensors index or torch.save archive");
}

}  // namespace

void inspect_path(const std::string& path, std::ostream& out) {
  Totals totals;
  if (!fs::exists(path)) fail(path, "no such file or directory");
  if (!fs::is_directory(path)) {
    inspect_file(path, out, totals);
  } else {
    std::vector<fs::path> files;
    for (auto& entry : fs::directory_iterator(path))
      if (entry.is_regular_file()) files.push_back(entry.path());
    std::sort(files.begin(), files.end());
    const bool sharded = fs::exists(fs::path(path) / "model.safetensors.index.json");
    bool any = false;
    for (auto& f : files) {
      const std::string base = f.filename().string();
      bool weights = ends_with(base, ".safetensors") || ends_with(base, ".pt") || ends_with(base, ".bin") ||
                     ends_with(base, ".pth") || ends_with(base, ".safetensors.index.json");
      if (!weights) continue;
      if (sharded && ends_with(base, ".safetensors") && base.rfind("model-", 0) == 0) continue;  // via the index
      out << "== " << base << "\n";
      inspect_file(f, out, totals);
      any = true;
    }
    if (!any) fail(path, "directory holds no .safetensors, .pt, .bin or .pth files");
  }
  out << totals.tensors << " tensors, " << totals.bytes << " bytes\n";
}

}  // namespace llava::io
