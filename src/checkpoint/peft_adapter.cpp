#include "checkpoint/peft_adapter.h"

#include <cmath>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include <nlohmann/json.hpp>
#include <re2/re2.h>

#include "io/error.h"
#include "io/json_input.h"
#include "io/safetensors.h"
#include "io/torch_archive.h"

namespace llava::checkpoint {

namespace fs = std::filesystem;

namespace {

const std::string kPrefix = "base_model.model.";

struct AdapterTensors {
  std::string file;
  std::map<std::string, torch::Tensor> by_name;
};

// name -> tensor from adapter_model.safetensors, else adapter_model.bin.
AdapterTensors read_adapter_tensors(const fs::path& dir) {
  AdapterTensors out;
  if (fs::exists(dir / "adapter_model.safetensors")) {
    out.file = (dir / "adapter_model.safetensors").string();
    auto file = io::SafetensorsFile::open(out.file);
    for (auto& t : file.tensors()) out.by_name[t.name] = file.get(t.name);
    return out;
  }
  out.file = (dir / "adapter_model.bin").string();
  if (!fs::exists(out.file)) fail(dir.string(), "no adapter_model.safetensors or adapter_model.bin");
  auto value = io::load_pt(out.file);
  if (!value.isGenericDict()) fail(out.file, "expected a dict of tensors");
  for (auto& e : value.toGenericDict()) {
    if (!e.key().isString() || !e.value().isTensor()) fail(out.file, "expected a dict of name -> tensor");
    out.by_name[e.key().toStringRef()] = e.value().toTensor();
  }
  return out;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// A LoRA tensor key split into its module path and which matrix it is; nullopt for any other key.
struct LoraKey {
  std::string path;
  bool is_a = false;
};
std::optional<LoraKey> parse_lora_key(const std::string& key) {
  if (key.rfind(kPrefix, 0) != 0) return std::nullopt;
  for (const char* matrix : {"A", "B"})
    for (const char* adapter_name : {"", ".default"}) {  // a raw state_dict() keeps PEFT's adapter name
      const std::string suffix = std::string(".lora_") + matrix + adapter_name + ".weight";
      if (ends_with(key, suffix) && key.size() > kPrefix.size() + suffix.size())
        return LoraKey{key.substr(kPrefix.size(), key.size() - kPrefix.size() - suffix.size()), matrix[0] == 'A'};
    }
  return std::nullopt;
}

bool is_set(const nlohmann::json& config, const char* key) {
  if (!config.contains(key)) return false;
  const auto& v = config[key];
  return !(v.is_null() || v == false || (v.is_object() && v.empty()) || (v.is_array() && v.empty()));
}

// PEFT's check_target_module_exists: a list names modules by their last components (the module's name is one
// of them, or ends with "." + one); a string is a regular expression the whole module name must match.
class TargetModules {
 public:
  TargetModules(const nlohmann::json& config, const std::string& config_path) : config_path_(config_path) {
    if (!config.contains("target_modules") || config["target_modules"].is_null()) return;  // nothing to check
    const auto& t = config["target_modules"];
    if (t.is_string()) {
      RE2::Options options;
      options.set_log_errors(false);
      regex_ = std::make_shared<RE2>(t.get<std::string>(), options);
      if (!regex_->ok()) fail(config_path, "'target_modules': not a regular expression: " + regex_->error());
    } else if (t.is_array()) {
      for (const auto& name : t) {
        if (!name.is_string()) fail(config_path, "'target_modules': expected a string or a list of strings");
        names_.push_back(name.get<std::string>());
      }
    } else {
      fail(config_path, "'target_modules': expected a string or a list of strings");
    }
    given_ = true;
  }

  // Whether PEFT would have put LoRA on the module named `path` (in any of the namings it goes by).
  bool names(const std::vector<std::string>& paths) const {
    if (!given_) return true;
    for (const auto& path : paths) {
      if (regex_ && RE2::FullMatch(path, *regex_)) return true;
      for (const auto& n : names_)
        if (path == n || (path.size() > n.size() && ends_with(path, "." + n))) return true;
    }
    return false;
  }

 private:
  std::string config_path_;
  bool given_ = false;
  std::shared_ptr<RE2> regex_;
  std::vector<std::string> names_;
};

}  // namespace

PeftLoraAdapter read_peft_lora_adapter(const std::string& dir_name, const AdapterModuleNames& module_names) {
  const fs::path dir(dir_name);
  const std::string config_path = (dir / "adapter_config.json").string();
  if (!fs::exists(config_path)) fail(dir_name, "no adapter_config.json (not a PEFT adapter directory)");
  const nlohmann::json config = io::read_json_file(config_path);
  if (!config.is_object()) fail(config_path, "expected a JSON object (a PEFT adapter config)");
  if (!config.contains("peft_type") || config["peft_type"] != "LORA") fail(config_path, "peft_type must be \"LORA\"");
  for (const char* unsupported : {"use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication",
                                  "layers_to_transform", "layers_pattern", "exclude_modules", "target_parameters",
                                  "trainable_token_indices"})
    if (is_set(config, unsupported)) fail(config_path, std::string("'") + unsupported + "' is not supported");
  PeftLoraAdapter adapter;
  if (!config.contains("r") || !config.contains("lora_alpha") || !config["lora_alpha"].is_number() ||
      (config.contains("use_rslora") && !config["use_rslora"].is_boolean()))
    fail(config_path, "needs an integer 'r', a number 'lora_alpha' and (optionally) true/false 'use_rslora'");
  adapter.r = io::json_integer(config["r"], config_path + ": 'r'", 1, int64_t{1} << 20);
  adapter.lora_alpha = config["lora_alpha"].get<double>();
  // alpha / r scales every update: past 1e6 (LLaVA uses 256) the outputs overflow to inf.
  if (!std::isfinite(adapter.lora_alpha) || std::abs(adapter.lora_alpha) > 1e6)
    fail(config_path, "'lora_alpha' must be a finite number from -1e6 to 1e6, got " + config["lora_alpha"].dump());
  const TargetModules targets(config, config_path);
  std::map<std::string, std::vector<std::string>> namings;  // canonical module -> every name it goes by
  for (const auto& [name, canonical] : module_names) namings[canonical].push_back(name);
  adapter.use_rslora = config.value("use_rslora", false);

  const auto tensors = read_adapter_tensors(dir);
  adapter.tensor_file = tensors.file;
  std::map<std::string, std::string> b_keys;  // module -> its lora_B key, for the duplicate check
  for (auto& [key, tensor] : tensors.by_name) {
    const auto lora_key = parse_lora_key(key);
    if (!lora_key)
      fail(tensors.file, "unexpected adapter tensor '" + key +
                             "' (expected base_model.model.<module>.lora_{A,B}[.default].weight)");
    const auto module = module_names.find(lora_key->path);
    if (module == module_names.end())
      fail(tensors.file, "adapter tensor '" + key + "': '" + lora_key->path +
                             "' is no Linear of this model (looked it up as llava-hf classic, "
                             "transformers >= 4.52 and original-LLaVA names)");
    if (!targets.names(namings[module->second]))
      fail(config_path, "'target_modules' " + config["target_modules"].dump() + " does not name module '" +
                            lora_key->path + "', whose LoRA weights " + tensors.file + " holds (PEFT would not load them)");
    auto& weights = adapter.modules[module->second];
    std::string& seen_key = lora_key->is_a ? weights.key : b_keys[module->second];
    if (!seen_key.empty())  // e.g. one file holding two namings of the same module
      fail(tensors.file, "adapter tensors '" + seen_key + "' and '" + key + "' are both lora_" +
                             (lora_key->is_a ? "A" : "B") + " of module '" + module->second + "'");
    seen_key = key;
    (lora_key->is_a ? weights.A : weights.B) = tensor;
  }
  if (adapter.modules.empty()) fail(tensors.file, "the adapter holds no LoRA weights");
  for (auto& [path, w] : adapter.modules) {
    const std::string key = w.key.empty() ? b_keys[path] : w.key;
    if (!w.A.defined() || !w.B.defined())
      fail(tensors.file, "adapter tensor '" + key + "' has no lora_" + (w.A.defined() ? "B" : "A") + " partner");
    if (w.A.dim() != 2 || w.B.dim() != 2 || w.A.size(0) != adapter.r || w.B.size(1) != adapter.r)
      fail(tensors.file, "'" + key + "': lora_A " + c10::str(w.A.sizes()) + " / lora_B " + c10::str(w.B.sizes()) +
                             " do not fit r = " + std::to_string(adapter.r) + " of adapter_config.json");
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
