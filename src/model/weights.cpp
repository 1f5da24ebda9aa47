#include "model/weights.h"

#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "io/error.h"
#include "io/file_util.h"
#include "io/json_input.h"
#include "io/safetensors.h"
#include "io/torch_archive.h"

namespace llava::model {
namespace {

namespace fs = std::filesystem;

bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The tensors of one checkpoint dir, read lazily (safetensors) or all at once (.bin).
struct TensorSource {
  std::string where;
  std::map<std::string, std::vector<int64_t>> shapes;
  std::function<torch::Tensor(const std::string&)> get;
  // Copies a floating-point tensor into a parameter of its shape (Error otherwise); when absent, the
  // loader copies get(name) itself.
  std::function<void(const std::string&, torch::Tensor&)> read_into;

  bool has_prefix(const std::string& prefix) const {
    auto it = shapes.lower_bound(prefix);
    return it != shapes.end() && starts_with(it->first, prefix);
  }
};

TensorSource open_safetensors(const std::string& path, const std::string& where) {
  auto files = std::make_shared<io::ShardedSafetensors>(io::ShardedSafetensors::open(path));
  TensorSource source{where, {}, [files](const std::string& name) { return files->get(name); },
                      [files, where](const std::string& name, torch::Tensor& dst) {
                        if (!c10::isFloatingType(files->info(name).dtype))
                          fail(where, name + ": expected a floating-point tensor");
                        files->read_into(name, dst);
                      }};
  for (const auto& name : files->names()) source.shapes[name] = files->info(name).shape;
  return source;
}

void add_bin_file(const std::string& path, std::map<std::string, torch::Tensor>& tensors) {
  c10::IValue value = io::load_pt(path);
  if (!value.isGenericDict()) fail(path, "expected a state dict (a dict of name -> tensor)");
  for (const auto& item : value.toGenericDict()) {
    if (!item.key().isString() || !item.value().isTensor())
      fail(path, "expected a state dict (a dict of name -> tensor)");
    tensors[item.key().toStringRef()] = item.value().toTensor();
  }
}

TensorSource open_bin(const std::vector<std::string>& paths, const std::string& where) {
  auto tensors = std::make_shared<std::map<std::string, torch::Tensor>>();
  for (const auto& path : paths) add_bin_file(path, *tensors);
  TensorSource source{where, {}, [tensors](const std::string& name) { return tensors->at(name); }, nullptr};
  for (const auto& [name, tensor] : *tensors) source.shapes[name] = tensor.sizes().vec();
  return source;
}

// pytorch_model.bin.index.json -> its shard files, in order.
std::vector<std::string> bin_shards(const fs::path& index) {
  const nlohmann::json j = io::read_json_file(index.string());
  if (!j.contains("weight_map") || !j["weight_map"].is_object()) fail(index.string(), "no weight_map object");
  std::set<std::string> files;
  for (const auto& item : j["weight_map"].items()) {
    if (!item.value().is_string()) fail(index.string(), "weight_map['" + item.key() + "'] is not a file name");
    files.insert(item.value().get<std::string>());
  }
  std::vector<std::string> paths;
  for (const auto& f : files) paths.push_back((index.parent_path() / f).string());
  return paths;
}

// Like HF: safetensors (sharded or not) first, then torch.save .bin files.
TensorSource open_weights(const std::string& dir) {
  fs::path d(dir);
  if (fs::exists(d / "model.safetensors.index.json") || fs::exists(d / "model.safetensors"))
    return open_safetensors(dir, dir);
  if (fs::exists(d / "pytorch_model.bin.index.json")) return open_bin(bin_shards(d / "pytorch_model.bin.index.json"), dir);
  if (fs::exists(d / "pytorch_model.bin")) return open_bin({(d / "pytorch_model.bin").string()}, dir);
  fail(dir, "no weights found (model.safetensors[.index.json] or pytorch_model.bin[.index.json])");
}

const std::string kVision = "model.vision_tower.vision_model.";
const std::string kProjector = "model.multi_modal_projector.";
const std::string kText = "model.language_model.";
const std::string kHead = "lm_head.";

KeyLayout detect_layout(const TensorSource& source) {
  if (source.has_prefix("model.language_model.")) return KeyLayout::kHfModern;
  if (source.has_prefix("language_model.")) return KeyLayout::kHfClassic;
  if (source.has_prefix("model.layers.") || source.has_prefix("model.embed_tokens.")) return KeyLayout::kOriginal;
  std::string example = source.shapes.empty() ? "(no tensors)" : source.shapes.begin()->first;
  fail(source.where, "cannot tell the key layout: expected keys under language_model.model.*, "
                     "model.language_model.* or model.layers.* (first key: " + example + ")");
}

// Names that are buffers or duplicates in some files, never parameters of ours.
bool ignorable(const std::string& name) {
  return ends_with(name, "rotary_emb.inv_freq") || ends_with(name, "embeddings.position_ids");
}

std::string list_some(const std::vector<std::string>& items, size_t limit = 4) {
  std::ostringstream out;
  for (size_t i = 0; i < items.size() && i < limit; ++i) out << (i ? ", " : "") << items[i];
  if (items.size() > limit) out << ", ...";
  return out.str();
}

std::string shape_str(const std::vector<int64_t>& shape) { return c10::str(c10::IntArrayRef(shape)); }

}  // namespace

std::string to_string(KeyLayout layout) {
  switch (layout) {
    case KeyLayout::kHfClassic: return "llava-hf classic";
    case KeyLayout::kHfModern: return "transformers>=4.52";
    case KeyLayout::kOriginal: return "original LLaVA";
  }
  return "?";
}

std::string checkpoint_name(const std::string& canonical, const WeightLayout& w) {
  const std::string level = w.vision_model_level ? "vision_model." : "";
  auto rest = [&](const std::string& prefix) { return canonical.substr(prefix.size()); };
  if (starts_with(canonical, kVision)) {
    switch (w.layout) {
      case KeyLayout::kHfModern: return "model.vision_tower." + level + rest(kVision);
      case KeyLayout::kHfClassic: return "vision_tower." + level + rest(kVision);
      case KeyLayout::kOriginal:
        return (w.vision_tower_dir.empty() ? "model.vision_tower.vision_tower." : "") + level + rest(kVision);
    }
  }
  if (starts_with(canonical, kProjector)) {
    if (w.layout == KeyLayout::kHfClassic) return "multi_modal_projector." + rest(kProjector);
    if (w.layout == KeyLayout::kOriginal) {  // nn.Sequential(Linear, GELU, Linear)
      std::string r = rest(kProjector);
      if (starts_with(r, "linear_1.")) return "model.mm_projector.0." + r.substr(9);
      if (starts_with(r, "linear_2.")) return "model.mm_projector.2." + r.substr(9);
    }
    return canonical;
  }
  if (starts_with(canonical, kText)) {
    if (w.layout == KeyLayout::kHfClassic) return "language_model.model." + rest(kText);
    if (w.layout == KeyLayout::kOriginal) return "model." + rest(kText);
    return canonical;
  }
  if (starts_with(canonical, kHead) && w.layout == KeyLayout::kHfClassic) return "language_model." + canonical;
  return canonical;
}

std::map<std::string, std::string> names_in_any_layout(const std::vector<std::string>& canonical_names,
                                                       bool own_tower_dir) {
  std::map<std::string, std::string> to_canonical;
  for (auto layout : {KeyLayout::kHfModern, KeyLayout::kHfClassic, KeyLayout::kOriginal})
    for (bool vision_level : {true, false})
      for (const char* tower_dir : {"", "clip"}) {
        if (*tower_dir && !own_tower_dir) continue;
        WeightLayout w{layout, vision_level, tower_dir};
        for (auto& name : canonical_names) to_canonical.emplace(checkpoint_name(name, w), name);
      }
  return to_canonical;
}

WeightLayout load_weights(LlavaForConditionalGeneration& model, const std::string& dir,
                          const std::string& vision_tower_dir) {
  TensorSource main = open_weights(dir);
  WeightLayout w;
  w.layout = detect_layout(main);

  // Where the CLIP weights are, and whether their keys carry ".vision_model.".
  std::optional<TensorSource> clip;
  std::string tower_prefix = w.layout == KeyLayout::kHfModern ? "model.vision_tower."
                             : w.layout == KeyLayout::kHfClassic ? "vision_tower."
                                                                 : "model.vision_tower.vision_tower.";
  if (w.layout == KeyLayout::kOriginal && !main.has_prefix(tower_prefix)) {
    w.vision_tower_dir = resolve_vision_tower_dir(dir, model->config, vision_tower_dir);
    clip = open_weights(w.vision_tower_dir);
    tower_prefix = "";
  }
  const TensorSource& vision_source = clip ? *clip : main;
  w.vision_model_level = vision_source.has_prefix(tower_prefix + "vision_model.");

  std::vector<std::string> missing, wrong_shape;
  std::set<std::string> used;
  struct Assignment {
    torch::Tensor param;
    std::string name;
    const TensorSource* source;
  };
  std::vector<Assignment> assignments;  // filled only after every check passed
  for (const auto& item : model->named_parameters()) {
    const std::string name = checkpoint_name(item.key(), w);
    const TensorSource& source = starts_with(item.key(), kVision) ? vision_source : main;
    auto it = source.shapes.find(name);
    if (it == source.shapes.end()) {
      missing.push_back(name);
      continue;
    }
    used.insert(name);
    if (it->second != item.value().sizes().vec()) {
      wrong_shape.push_back(name + " (file " + shape_str(it->second) + ", model " +
                            shape_str(item.value().sizes().vec()) + ")");
      continue;
    }
    assignments.push_back({item.value(), name, &source});
  }

  std::vector<std::string> unexpected;
  const bool tied = model->config.tie_word_embeddings;
  for (const auto& entry : main.shapes) {
    const std::string& name = entry.first;
    if (used.count(name) || ignorable(name)) continue;
    if (tied && (name == "lm_head.weight" || name == "language_model.lm_head.weight")) continue;
    unexpected.push_back(name);
  }
  if (clip)  // a full CLIPModel dir also holds the text tower and projections: only the vision keys count
    for (const auto& entry : clip->shapes)
      if (starts_with(entry.first, w.vision_model_level ? "vision_model." : "") && !used.count(entry.first) &&
          !ignorable(entry.first) && !starts_with(entry.first, "text_model.") &&
          entry.first != "logit_scale" && !starts_with(entry.first, "visual_projection.") &&
          !starts_with(entry.first, "text_projection."))
        unexpected.push_back(clip->where + ":" + entry.first);

  if (!missing.empty() || !unexpected.empty() || !wrong_shape.empty()) {
    std::vector<std::string> parts;
    if (!missing.empty()) parts.push_back(std::to_string(missing.size()) + " missing: " + list_some(missing));
    if (!unexpected.empty())
      parts.push_back(std::to_string(unexpected.size()) + " unexpected: " + list_some(unexpected));
    if (!wrong_shape.empty())
      parts.push_back(std::to_string(wrong_shape.size()) + " with the wrong shape: " + list_some(wrong_shape, 3));
    std::ostringstream msg;
    msg << "the weights (" << to_string(w.layout) << " layout) do not match the model of config.json: ";
    for (size_t i = 0; i < parts.size(); ++i) msg << (i ? "; " : "") << parts[i];
    fail(dir, msg.str());
  }

  torch::NoGradGuard no_grad;
  for (auto& a : assignments) {
    if (a.source->read_into) {
      a.source->read_into(a.name, a.param);
      continue;
    }
    auto tensor = a.source->get(a.name);
    if (!tensor.is_floating_point()) fail(a.source->where, a.name + ": expected a floating-point tensor");
    a.param.copy_(tensor);
  }
  return w;
}

c10::ScalarType parse_dtype(const std::string& name) {
  if (name == "fp32" || name == "float32") return torch::kFloat32;
  if (name == "bf16" || name == "bfloat16") return torch::kBFloat16;
  fail("--dtype", "'" + name + "' is not supported (fp32 or bf16)");
}

LoadedModel load_model(const std::string& dir, c10::ScalarType dtype, const std::string& vision_tower_dir,
                       const torch::Device& device) {
  LoadedModel loaded;
  loaded.config = load_config(dir, vision_tower_dir);
  loaded.model = LlavaForConditionalGeneration(loaded.config, torch::TensorOptions().dtype(dtype).device(device));
  if (!device.is_cpu()) loaded.model->to(device);  // any buffer a module made on the host (a no-op for the rest)
  loaded.layout = load_weights(loaded.model, dir, vision_tower_dir);
  loaded.model->eval();
  return loaded;
}

}  // namespace llava::model
