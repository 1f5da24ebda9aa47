#include "checkpoint/peft_adapter.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "io/error.h"
#include "io/json_input.h"
#include "io/safetensors.h"
#include "io/torch_archive.h"

namespace llava::checkpoint {

namespace fs = std::filesystem;

namespace {

const std::string kPrefix = "base_model.model.";

// name -> tensor from adapter_model.safetensors, else adapter_model.bin.
std::map<std::string, torch::Tensor> read_adapter_tensors(const fs::path& dir) {
  std::map<std::string, torch::Tensor> tensors;
  if (fs::exists(dir / "adapter_model.safetensors")) {
    auto file = io::SafetensorsFile::open((dir / "adapter_model.safetensors").string());
    for (auto& t : file.tensors()) tensors[t.name] = file.get(t.name);
    return tensors;
  }
  const auto bin = dir / "adapter_model.bin";
  if (!fs::exists(bin)) fail(dir.string(), "no adapter_model.safetensors or adapter_model.bin");
  auto value = io::load_pt(bin.string());
  if (!value.isGenericDict()) fail(bin.string(), "expected a dict of tensors");
  for (auto& e : value.toGenericDict()) {
    if (!e.key().isString() || !e.value().isTensor()) fail(bin.string(), "expected a dict of name -> tensor");
    tensors[e.key().toStringRef()] = e.value().toTensor();
  }
  return tensors;
}

bool is_set(const nlohmann::json& config, const char* key) {
  if (!config.contains(key)) return false;
  const auto& v = config[key];
  return !(v.is_null() || v == false || (v.is_object() && v.empty()) || (v.is_array() && v.empty()));
}

}  // namespace

PeftLoraAdapter read_peft_lora_adapter(const std::string& dir_name) {
  const fs::path dir(dir_name);
  const std::string config_path = (dir / "adapter_config.json").string();
  if (!fs::exists(config_path)) fail(dir_name, "no adapter_config.json (not a PEFT adapter directory)");
  const nlohmann::json config = io::read_json_file(config_path);
  if (config.value("peft_type", std::string()) != "LORA") fail(config_path, "peft_type must be LORA");
  for (const char* unsupported : {"use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication"})
    if (is_set(config, unsupported)) fail(config_path, std::string("'") + unsupported + "' is not supported");
  PeftLoraAdapter adapter;
  try {
    adapter.r = config.at("r").get<int64_t>();
    adapter.lora_alpha = config.at("lora_alpha").get<double>();
    adapter.use_rslora = config.value("use_rslora", false);
  } catch (const nlohmann::json::exception& e) {
    fail(config_path, std::string("needs integer 'r' and number 'lora_alpha': ") + e.what());
  }
  if (adapter.r < 1) fail(config_path, "'r' must be >= 1");

  for (auto& [name, tensor] : read_adapter_tensors(dir)) {
    const bool is_a = name.size() > 14 && name.compare(name.size() - 14, 14, ".lora_A.weight") == 0;
    const bool is_b = name.size() > 14 && name.compare(name.size() - 14, 14, ".lora_B.weight") == 0;
    if (name.rfind(kPrefix, 0) != 0 || !(is_a || is_b))
      fail(dir_name, "unexpected adapter tensor '" + name + "' (expected base_model.model.<module>.lora_{A,B}.weight)");
    const std::string path = name.substr(kPrefix.size(), name.size() - kPrefix.size() - 14);
    auto& weights = adapter.modules[path];
    (is_a ? weights.A : weights.B) = tensor;
  }
  if (adapter.modules.empty()) fail(dir_name, "the adapter holds no LoRA weights");
  for (auto& [path, w] : adapter.modules) {
    if (!w.A.defined() || !w.B.defined()) fail(dir_name, "module '" + path + "' has only one of lora_A / lora_B");
    if (w.A.dim() != 2 || w.B.dim() != 2 || w.A.size(0) != adapter.r || w.B.size(1) != adapter.r)
      fail(dir_name, "module '" + path + "': lora_A " + c10::str(w.A.sizes()) + " / lora_B " + c10::str(w.B.sizes()) +
                         " do not fit r = " + std::to_string(adapter.r));
  }
  return adapter;
}

void write_peft_lora_adapter(const std::string& dir, const PeftLoraAdapter& adapter, double lora_dropout,
                             const nlohmann::json& target_modules, const std::string& base_model_name_or_path) {
  fs::create_directories(dir);
  nlohmann::json config = {  // nlohmann's object keeps keys sorted, like PEFT's sort_keys=True
      {"alpha_pattern", nlohmann::json::object()},
      {"auto_mapping", nullptr},
      {"base_model_name_or_path", base_model_name_or_path},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"inference_mode", true},
      {"init_lora_weights", true},
      {"layers_pattern", nullptr},
      {"layers_to_transform", nullptr},
      {"lora_alpha", adapter.lora_alpha},
      {"lora_dropout", lora_dropout},
      {"modules_to_save", nullptr},
      {"peft_type", "LORA"},
      {"r", adapter.r},
      {"rank_pattern", nlohmann::json::object()},
      {"revision", nullptr},
      {"target_modules", target_modules},
      {"task_type", "CAUSAL_LM"},
      {"use_dora", false},
      {"use_rslora", adapter.use_rslora},
  };
  io::NamedTensors tensors;
  for (auto& [path, w] : adapter.modules) {
    tensors.emplace_back(kPrefix + path + ".lora_A.weight", w.A);
    tensors.emplace_back(kPrefix + path + ".lora_B.weight", w.B);
  }
  io::save_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), tensors);
  io::write_file_atomic((fs::path(dir) / "adapter_config.json").string(), config.dump(2) + "\n");
}

}  // namespace llava::checkpoint
