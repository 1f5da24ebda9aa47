#include "checkpoint/pretrained_parts.h"

#include <cstring>
#include <filesystem>
#include <map>
#include <set>

#include "checkpoint/peft_adapter.h"
#include "io/error.h"
#include "io/pickle.h"
#include "io/safetensors.h"
#include "io/torch_archive.h"
#include "model/weights.h"

namespace llava::checkpoint {

namespace {

std::string strip_suffix(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0
             ? s.substr(0, s.size() - suffix.size())
             : s;
}

}  // namespace

std::map<std::string, std::shared_ptr<model::LinearImpl>> linear_modules(model::LlavaForConditionalGeneration& model) {
  std::map<std::string, std::shared_ptr<model::LinearImpl>> linears;
  for (auto& item : model->named_modules("", false))
    if (auto linear = std::dynamic_pointer_cast<model::LinearImpl>(item.value())) linears[item.key()] = linear;
  return linears;
}

AdapterModuleNames adapter_module_names(model::LlavaForConditionalGeneration& model) {
  std::vector<std::string> weight_names;
  for (auto& [path, linear] : linear_modules(model)) weight_names.push_back(path + ".weight");
  AdapterModuleNames names;  // PEFT names modules, not weights: drop ".weight" on both sides
  for (auto& [name, canonical] : model::names_in_any_layout(weight_names, /*own_tower_dir=*/false))
    names.emplace(strip_suffix(name, ".weight"), strip_suffix(canonical, ".weight"));
  return names;
}

PeftLoraAdapter read_lora_adapter(model::LlavaForConditionalGeneration& model, const std::string& dir) {
  return read_peft_lora_adapter(dir, adapter_module_names(model));
}

namespace {
std::string regex_escape(const std::string& s) {
  std::string out;
  for (char c : s) out += std::string(std::strchr(".^$|()[]{}*+?\\", c) ? "\\" : "") + c;
  return out;
}

// adapter_config.json's target_modules: what makes PEFT wrap exactly the modules we trained.
nlohmann::json peft_target_modules(const PeftLoraSettings& settings, const std::set<std::string>& suffixes,
                                   const std::vector<std::string>& module_paths) {
  using Targets = PeftLoraSettings::Targets;
  // Suffix lists and all-linear mean in PEFT what they mean here (attach_lora follows PEFT on the same
  // module tree), in either key layout.
  if (settings.targets == Targets::kSuffixes)  // none given (adapters loaded from files): theirs
    return settings.suffixes.empty() ? std::vector<std::string>(suffixes.begin(), suffixes.end()) : settings.suffixes;
  if (settings.targets == Targets::kAllLinear) return "all-linear";
  std::string alternatives;
  // LLaVA's default, every LLM Linear: PEFT's regex form (re.fullmatch on the module name) that matches the
  // language model in both key layouts (model.language_model.* and language_model.model.*). A suffix list
  // would also wrap the CLIP tower's q_proj/k_proj/v_proj.
  if (settings.targets == Targets::kLlavaLanguageModel) {
    for (auto& s : suffixes) alternatives += (alternatives.empty() ? "" : "|") + s;
    return ".*language_model.*\\.(" + alternatives + ")";
  }
  // Any other regex was matched against our module names; spell out the modules it picked, in the base
  // checkpoint's names, so PEFT wraps exactly those.
  for (auto& p : module_paths) alternatives += (alternatives.empty() ? "" : "|") + regex_escape(p);
  return "(" + alternatives + ")";
}
}  // namespace

void save_lora_adapter(const std::string& dir, const std::vector<LoraModuleWeights>& modules,
                       const PeftLoraSettings& settings, const model::WeightLayout& layout,
                       const std::string& base_model_name_or_path) {
  PeftLoraAdapter adapter;
  adapter.r = settings.r;
  adapter.lora_alpha = settings.alpha;
  adapter.use_rslora = settings.use_rslora;
  std::set<std::string> suffixes;
  std::vector<std::string> paths;
  for (auto& m : modules) {
    const std::string path = strip_suffix(model::checkpoint_name(m.path + ".weight", layout), ".weight");
    adapter.modules[path] = {m.A, m.B, ""};
    suffixes.insert(path.substr(path.rfind('.') + 1));
    paths.push_back(path);
  }
  const auto target_modules = peft_target_modules(settings, suffixes, paths);
  write_peft_lora_adapter(dir, adapter, settings.dropout, target_modules, base_model_name_or_path);
}

void load_projector_weights(model::LlavaForConditionalGeneration& model, const std::string& path) {
  std::map<std::string, torch::Tensor> file_tensors;
  if (path.size() > 12 && path.compare(path.size() - 12, 12, ".safetensors") == 0) {
    auto file = io::SafetensorsFile::open(path);
    for (auto& t : file.tensors()) file_tensors[t.name] = file.get(t.name);
  } else {
    auto value = io::load_pt(path);
    if (!value.isGenericDict()) fail(path, "expected a dict of name -> tensor");
    for (auto& e : value.toGenericDict())
      if (e.key().isString() && e.value().isTensor()) file_tensors[e.key().toStringRef()] = e.value().toTensor();
  }
  auto params = model->model->multi_modal_projector->named_parameters();
  std::vector<std::string> canonical;
  for (auto& p : params) canonical.push_back("model.multi_modal_projector." + p.key());
  const auto to_canonical = model::names_in_any_layout(canonical);

  std::map<std::string, torch::Tensor> found;  // canonical -> tensor
  for (auto& [name, tensor] : file_tensors) {
    std::string key = name.rfind("base_model.model.", 0) == 0 ? name.substr(17) : name;  // PEFT-wrapped names
    auto it = to_canonical.find(key);
    if (it != to_canonical.end()) found[it->second] = tensor;
  }
  torch::NoGradGuard no_grad;
  for (auto& p : params) {
    const std::string name = "model.multi_modal_projector." + p.key();
    auto it = found.find(name);
    if (it == found.end())
      fail(path, "no projector weight for '" + name + "' (looked for LLaVA's model.mm_projector.*, llava-hf's and ours)");
    if (it->second.sizes() != p.value().sizes())
      fail(path, "projector weight for '" + name + "' has shape " + c10::str(it->second.sizes()) + ", the model needs " +
                     c10::str(p.value().sizes()));
    p.value().copy_(it->second);
  }
}

void save_projector_weights(const std::string& path, model::LlavaForConditionalGeneration& model,
                            const model::WeightLayout& layout, bool peft_prefix) {
  std::vector<std::pair<std::string, torch::Tensor>> projector;
  for (auto& p : model->model->multi_modal_projector->named_parameters())
    projector.emplace_back("model.multi_modal_projector." + p.key(), p.value().detach());
  save_projector_weights(path, projector, layout, peft_prefix);
}

void save_projector_weights(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& projector,
                            const model::WeightLayout& layout, bool peft_prefix) {
  auto dict = io::pickle::new_dict();
  for (auto& [canonical, tensor] : projector)
    dict.insert((peft_prefix ? "base_model.model." : "") + model::checkpoint_name(canonical, layout), tensor.to(torch::kCPU));
  io::save_pt(path, dict);
}

std::vector<std::string> save_full_model(const std::string& dir, model::LlavaForConditionalGeneration& model,
                                         model::WeightLayout layout, uint64_t max_shard_bytes) {
  std::vector<std::pair<std::string, torch::Tensor>> params;
  for (auto& p : model->named_parameters()) params.emplace_back(p.key(), p.value().detach());
  return save_full_model(dir, params, std::move(layout), max_shard_bytes);
}

std::vector<std::string> save_full_model(const std::string& dir, const std::vector<std::pair<std::string, torch::Tensor>>& params,
                                         model::WeightLayout layout, uint64_t max_shard_bytes) {
  layout.vision_tower_dir.clear();
  io::NamedTensors tensors;
  for (auto& [canonical, tensor] : params) tensors.emplace_back(model::checkpoint_name(canonical, layout), tensor);
  return io::save_sharded(dir, tensors, max_shard_bytes);
}

}  // namespace llava::checkpoint
