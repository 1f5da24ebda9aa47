#include "train/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>

#include "io/error.h"
#include "io/file_util.h"
#include "io/json_input.h"
#include "io/safetensors.h"
#include "train/schedule.h"

namespace llava::train {

namespace fs = std::filesystem;

namespace {

// ------------------------------------------------------------------------------------- the key table

using Setter = std::function<void(TrainConfig&, const YAML::Node&, const std::string& key, const std::string& where)>;

template <typename T>
const char* type_name() {
  if constexpr (std::is_same_v<T, bool>) return "true or false";
  else if constexpr (std::is_same_v<T, std::string>) return "a string";
  else if constexpr (std::is_same_v<T, std::vector<std::string>>) return "a list of strings";
  else if constexpr (std::is_integral_v<T>) return "an integer";
  else return "a number";
}

template <typename T>
T read_as(const YAML::Node& node, const std::string& key, const std::string& where) {
  try {
    if constexpr (std::is_same_v<T, std::vector<std::string>>) {
      if (node.IsScalar()) return {node.as<std::string>()};
    }
    if constexpr (std::is_same_v<T, bool>) {  // yaml-cpp would also take "yes"/"on"; HF takes true/false
      auto text = node.as<std::string>();
      if (text != "true" && text != "false" && text != "True" && text != "False") throw YAML::Exception({}, "");
    }
    if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
      if (!node.IsScalar()) throw YAML::Exception({}, "");
      double as_double = node.as<double>();  // accept 1e3, refuse 2.5
      if (as_double != static_cast<double>(static_cast<T>(as_double))) throw YAML::Exception({}, "");
      return static_cast<T>(as_double);
    }
    if (!std::is_same_v<T, std::vector<std::string>> && !node.IsScalar()) throw YAML::Exception({}, "");
    if constexpr (std::is_floating_point_v<T>) {  // .nan / .inf are YAML floats but no setting's value
      const T value = node.as<T>();
      if (!std::isfinite(value)) throw YAML::Exception({}, "");
      return value;
    }
    return node.as<T>();
  } catch (const YAML::Exception&) {
    std::string got = node.IsScalar() ? "'" + node.Scalar() + "'" : node.IsSequence() ? "a list" : "a map";
    fail(where, "key '" + key + "': expected " + type_name<T>() + ", got " + got);
  }
}

template <typename T>
Setter set(T TrainConfig::*member) {
  return [member](TrainConfig& c, const YAML::Node& n, const std::string& key, const std::string& where) {
    c.*member = read_as<T>(n, key, where);
  };
}

// Keys LLaVA/HF scripts pass that mean nothing here (CPU/GPU details handled elsewhere, reporting).
Setter accepted_and_ignored() {
  return [](TrainConfig&, const YAML::Node&, const std::string&, const std::string&) {};
}

const std::map<std::string, Setter>& train_fields() {
  static const std::map<std::string, Setter> fields = {
      {"model_name_or_path", set(&TrainConfig::model_name_or_path)},
      {"vision_tower", set(&TrainConfig::vision_tower)},
      {"pretrain_mm_mlp_adapter", set(&TrainConfig::pretrain_mm_mlp_adapter)},
      {"tune_mm_mlp_adapter", set(&TrainConfig::tune_mm_mlp_adapter)},
      {"unfreeze_mm_vision_tower", set(&TrainConfig::unfreeze_mm_vision_tower)},
      {"freeze_backbone", set(&TrainConfig::freeze_backbone)},
      {"mm_vision_select_layer", set(&TrainConfig::mm_vision_select_layer)},
      {"mm_projector_type", set(&TrainConfig::mm_projector_type)},
      {"output_dir", set(&TrainConfig::output_dir)},
      {"learning_rate", set(&TrainConfig::learning_rate)},
      {"mm_projector_lr", set(&TrainConfig::mm_projector_lr)},
      {"weight_decay", set(&TrainConfig::weight_decay)},
      {"adam_beta1", set(&TrainConfig::adam_beta1)},
      {"adam_beta2", set(&TrainConfig::adam_beta2)},
      {"adam_epsilon", set(&TrainConfig::adam_epsilon)},
      {"max_grad_norm", set(&TrainConfig::max_grad_norm)},
      {"num_train_epochs", set(&TrainConfig::num_train_epochs)},
      {"max_steps", set(&TrainConfig::max_steps)},
      {"lr_scheduler_type", set(&TrainConfig::lr_scheduler_type)},
      {"lr_scheduler_kwargs.min_lr", set(&TrainConfig::min_lr)},
      {"lr_scheduler_kwargs.min_lr_rate", set(&TrainConfig::min_lr_rate)},
      {"lr_scheduler_kwargs.num_cycles", set(&TrainConfig::num_cycles)},
      {"warmup_ratio", set(&TrainConfig::warmup_ratio)},
      {"warmup_steps", set(&TrainConfig::warmup_steps)},
      {"gradient_accumulation_steps", set(&TrainConfig::gradient_accumulation_steps)},
      {"logging_steps", set(&TrainConfig::logging_steps)},
      {"save_steps", set(&TrainConfig::save_steps)},
      {"save_strategy", set(&TrainConfig::save_strategy)},
      {"save_total_limit", set(&TrainConfig::save_total_limit)},
      {"max_shard_size", set(&TrainConfig::max_shard_size)},
      {"bf16", set(&TrainConfig::bf16)},
      {"gradient_checkpointing", set(&TrainConfig::gradient_checkpointing)},
      {"resume_from_checkpoint", set(&TrainConfig::resume_from_checkpoint)},
      {"save_on_interrupt", set(&TrainConfig::save_on_interrupt)},
      {"skip_nonfinite_steps", set(&TrainConfig::skip_nonfinite_steps)},
      {"lora_enable", set(&TrainConfig::lora_enable)},
      {"lora_r", set(&TrainConfig::lora_r)},
      {"lora_alpha", set(&TrainConfig::lora_alpha)},
      {"lora_dropout", set(&TrainConfig::lora_dropout)},
      {"lora_bias", set(&TrainConfig::lora_bias)},
      {"lora_target_modules", set(&TrainConfig::lora_target_modules)},
      {"lora_target_regex", set(&TrainConfig::lora_target_regex)},
      {"use_rslora", set(&TrainConfig::use_rslora)},
      {"modules_to_save", set(&TrainConfig::modules_to_save)},
      {"zero_stage", set(&TrainConfig::zero_stage)},
      {"deepspeed", set(&TrainConfig::deepspeed)},
      {"ddp_timeout", set(&TrainConfig::ddp_timeout)},
      {"consolidate_optimizer_max_size", set(&TrainConfig::consolidate_optimizer_max_size)},
      {"reduce_bucket_size", set(&TrainConfig::reduce_bucket_size)},
      // Read by the data section (data::read_data_config).
      {"data_path", accepted_and_ignored()},
      {"image_folder", accepted_and_ignored()},
      {"version", accepted_and_ignored()},
      {"conv_template", accepted_and_ignored()},
      {"model_max_length", accepted_and_ignored()},
      {"image_aspect_ratio", accepted_and_ignored()},
      {"per_device_train_batch_size", accepted_and_ignored()},
      {"dataloader_num_workers", accepted_and_ignored()},
      {"dataloader_drop_last", accepted_and_ignored()},
      {"group_by_modality_length", accepted_and_ignored()},
      {"seed", accepted_and_ignored()},
      {"skip_missing_images", accepted_and_ignored()},
      {"tokenizer_path", accepted_and_ignored()},
      {"image_processor_path", accepted_and_ignored()},
      // LLaVA launch-script keys with no effect on a CPU/c10d trainer; accepted so scripts port as they are.
      {"lazy_preprocess", accepted_and_ignored()},
      {"is_multimodal", accepted_and_ignored()},
      {"mm_use_im_start_end", accepted_and_ignored()},
      {"mm_use_im_patch_token", accepted_and_ignored()},
      {"mm_vision_select_feature", accepted_and_ignored()},
      {"mm_patch_merge_type", accepted_and_ignored()},
      {"tf32", accepted_and_ignored()},
      {"report_to", accepted_and_ignored()},
      {"run_name", accepted_and_ignored()},
      {"evaluation_strategy", accepted_and_ignored()},
      {"eval_strategy", accepted_and_ignored()},
      {"per_device_eval_batch_size", accepted_and_ignored()},
      {"fp16", accepted_and_ignored()},  // checked below: only false is allowed
      {"optim", accepted_and_ignored()}, // checked below: adamw_torch only
  };
  return fields;
}

// "a.b: 1" and "a: {b: 1}" are the same key "a.b".
void flatten(const YAML::Node& node, const std::string& prefix, std::vector<std::pair<std::string, YAML::Node>>& out) {
  for (auto it = node.begin(); it != node.end(); ++it) {
    const std::string key = prefix + it->first.as<std::string>();
    if (it->second.IsMap() && key == "lr_scheduler_kwargs") flatten(it->second, key + ".", out);
    else out.emplace_back(key, it->second);
  }
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] != b[j - 1])});
      diagonal = up;
    }
  }
  return row[b.size()];
}

void check_combinations(const TrainConfig& c, const YAML::Node& root, const std::string& where) {
  auto bad = [&](const std::string& key, const std::string& why) { fail(where, "key '" + key + "': " + why); };
  if (root["fp16"] && read_as<bool>(root["fp16"], "fp16", where)) bad("fp16", "fp16 is not supported; use bf16: true");
  if (root["optim"] && root["optim"].as<std::string>() != "adamw_torch" && root["optim"].as<std::string>() != "adamw_torch_fused")
    bad("optim", "only adamw_torch (AdamW with torch's numerics) is supported");
  if (root["mm_use_im_start_end"] && read_as<bool>(root["mm_use_im_start_end"], "mm_use_im_start_end", where))
    bad("mm_use_im_start_end", "image start/end tokens (LLaVA-1.0) are not supported; LLaVA-1.5 uses false");
  if (c.model_name_or_path.empty()) bad("model_name_or_path", "required");
  if (c.output_dir.empty()) bad("output_dir", "required");
  if (c.learning_rate <= 0) bad("learning_rate", "must be > 0");
  if (c.max_steps <= 0 && c.num_train_epochs <= 0) bad("max_steps", "set max_steps > 0 or num_train_epochs > 0");
  if (c.gradient_accumulation_steps < 1) bad("gradient_accumulation_steps", "must be >= 1");
  if (c.max_grad_norm < 0) bad("max_grad_norm", "must be >= 0 (0 disables clipping)");
  if (c.lora_enable && c.tune_mm_mlp_adapter)
    bad("lora_enable", "stage 1 (tune_mm_mlp_adapter: true) trains only the projector; LoRA needs stage 2");
  if (c.lora_enable && c.lora_r < 1) bad("lora_r", "must be >= 1");
  if (c.lora_bias != "none") bad("lora_bias", "only 'none' is supported (as LLaVA-1.5 trains)");
  if (!c.lora_target_modules.empty() && !c.lora_target_regex.empty())
    bad("lora_target_regex", "give lora_target_modules or lora_target_regex, not both");
  if (c.zero_stage < 0 || c.zero_stage > 2) bad("zero_stage", "must be 0, 1 or 2 (ZeRO-3 is not supported)");
  if (c.reduce_bucket_size < 1) bad("reduce_bucket_size", "must be >= 1 (elements per gradient bucket)");
  if (c.save_strategy != "steps" && c.save_strategy != "no") bad("save_strategy", "expected steps or no");
  for (auto [key, value] : {std::pair{"max_shard_size", &c.max_shard_size},
                            std::pair{"consolidate_optimizer_max_size", &c.consolidate_optimizer_max_size}}) {
    try {
      io::parse_size(*value);
    } catch (const Error&) {
      bad(key, "expected a size like 5GB, 200MB or 1000 (bytes), got '" + *value + "'");
    }
  }
  if (c.mm_projector_type != "mlp2x_gelu" && c.mm_projector_type != "linear")
    bad("mm_projector_type", "expected mlp2x_gelu or linear");
  try {
    schedule_from_name(c.lr_scheduler_type);
  } catch (const Error& e) {
    fail(where, e.what());
  }
}

}  // namespace

const std::vector<std::string>& config_keys() {
  static const std::vector<std::string> keys = [] {
    std::vector<std::string> k;
    for (auto& [name, _] : train_fields()) k.push_back(name);
    return k;
  }();
  return keys;
}

std::string nearest_key(const std::string& key) {
  std::string best;
  size_t best_distance = std::max<size_t>(3, key.size() / 3) + 1;
  for (auto& candidate : config_keys()) {
    size_t d = edit_distance(key, candidate);
    if (d < best_distance) best = candidate, best_distance = d;
  }
  return best;
}

TrainConfig parse_train_config(const YAML::Node& root, const std::string& where) {
  if (!root.IsMap()) fail(where, "expected a YAML map of settings");
  TrainConfig c;
  std::vector<std::pair<std::string, YAML::Node>> entries;
  flatten(root, "", entries);
  for (auto& [key, value] : entries) {
    auto field = train_fields().find(key);
    if (field == train_fields().end()) {
      std::string hint = nearest_key(key);
      fail(where, "unknown key '" + key + "'" + (hint.empty() ? "" : " (did you mean '" + hint + "'?)"));
    }
    if (!value.IsNull()) field->second(c, value, key, where);
  }
  c.data = data::read_data_config(root, where);
  if (!c.deepspeed.empty()) {
    const nlohmann::json ds = io::read_json_file(c.deepspeed);
    if (!ds.is_object() || (ds.contains("zero_optimization") && !ds["zero_optimization"].is_object()))
      fail(c.deepspeed, "expected a DeepSpeed config object with a 'zero_optimization' object");
    auto stage = ds.value("/zero_optimization/stage"_json_pointer, nlohmann::json(0));
    if (!stage.is_number_integer()) fail(c.deepspeed, "zero_optimization.stage must be an integer");
    c.zero_stage = io::json_integer(stage, c.deepspeed + ": zero_optimization.stage", 0, 3);
    auto bucket = ds.value("/zero_optimization/reduce_bucket_size"_json_pointer, nlohmann::json(c.reduce_bucket_size));
    if (bucket.is_number())  // DeepSpeed configs often write 5e8
      c.reduce_bucket_size = io::json_integer(bucket, c.deepspeed + ": zero_optimization.reduce_bucket_size", 1);
    else if (bucket != "auto")  // "auto" (HF Trainer fills it in): our default
      fail(c.deepspeed, "zero_optimization.reduce_bucket_size must be a number or \"auto\"");
  }
  check_combinations(c, root, where);
  return c;
}

TrainConfig load_train_config(const std::string& path, const std::vector<std::string>& overrides) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    fail(path, "cannot open config file");
  } catch (const YAML::Exception& e) {
    fail(path, std::string("not valid YAML: ") + e.what());
  }
  for (auto& o : overrides) {
    auto eq = o.find('=');
    if (eq == std::string::npos || eq == 0) throw Error("--set '" + o + "': expected key=value");
    std::string key = o.substr(0, eq);
    YAML::Node value;
    try {
      value = YAML::Load(o.substr(eq + 1));
    } catch (const YAML::Exception& e) {
      throw Error("--set " + key + ": value is not valid YAML: " + e.what());
    }
    auto dot = key.find('.');
    if (dot == std::string::npos) root[key] = value;
    else root[key.substr(0, dot)][key.substr(dot + 1)] = value;
  }
  // Paths in the file are relative to the file, like the data section's.
  const fs::path base = fs::path(path).parent_path();
  if (root.IsMap() && root["deepspeed"] && root["deepspeed"].IsScalar() && fs::path(root["deepspeed"].Scalar()).is_relative())
    root["deepspeed"] = (base / root["deepspeed"].Scalar()).string();  // read while parsing
  TrainConfig c = parse_train_config(root, path);
  for (std::string* p : {&c.model_name_or_path, &c.output_dir, &c.vision_tower, &c.pretrain_mm_mlp_adapter})
    if (!p->empty() && fs::path(*p).is_relative()) *p = (base / *p).string();
  if (c.resume_from_checkpoint != "" && c.resume_from_checkpoint != "auto" && fs::path(c.resume_from_checkpoint).is_relative())
    c.resume_from_checkpoint = (base / c.resume_from_checkpoint).string();
  data::resolve_relative_paths(c.data, base.string());
  return c;
}

}  // namespace llava::train
