#include "train/config.h"

#include <unistd.h>
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
#include "io/yaml_config.h"
#include "model/config.h"
#include "train/schedule.h"

namespace llava::train {

namespace fs = std::filesystem;

namespace {

// ----------------------------------------------------------------------------------------- the schema

using C = TrainConfig;

template <class T>
io::ConfigKey<C> optional_key(std::string name, std::optional<T> C::*m, std::function<T(const YAML::Node&)> read) {
  return {std::move(name), [m, read](C& c, const YAML::Node& n) { c.*m = read(n); }};
}

io::ConfigKey<C> scheduler_key() {
  return {"lr_scheduler_type", [](C& c, const YAML::Node& n) {
            const std::string name = io::read_string(n);
            try {
              schedule_from_name(name);
            } catch (const Error&) {
              throw io::BadValue{"one of linear, cosine, constant, constant_with_warmup, cosine_with_min_lr"};
            }
            c.lr_scheduler_type = name;
          }};
}

// device: auto | cpu | cuda | cuda:N (N a device index below 1024). Whether the device exists is
// checked when the trainer starts (device.h), as it depends on the machine, not the file.
io::ConfigKey<C> device_key() {
  return {"device", [](C& c, const YAML::Node& n) {
            const std::string value = io::read_string(n);
            const std::string expected = "auto, cpu, cuda or cuda:N (N a device index, 0 to 1023)";
            if (value == "auto" || value == "cpu" || value == "cuda") {
              c.device = value;
              return;
            }
            const std::string index = value.rfind("cuda:", 0) == 0 ? value.substr(5) : "";
            if (index.empty() || index.size() > 4 || index.find_first_not_of("0123456789") != std::string::npos ||
                std::stoi(index) > 1023)
              throw io::BadValue{expected};
            c.device = "cuda:" + std::to_string(std::stoi(index));
          }};
}

const std::vector<std::string> kFalse = {"false", "False"};

// Every key of the config, one line each: the field it sets and what it takes. Ranges are finite and
// far above any real run, so a typo cannot make the trainer allocate or loop without bound; what depends
// on the model or the data is checked in check_against_model_and_data.
const io::Schema<C>& train_schema() {
  static const io::Schema<C> schema = [] {
    io::Schema<C> s;
    s.include(data::data_schema(), &C::data);  // data_path, image_folder, version, model_max_length, ...
    // ModelArguments
    s.add({"model_name_or_path", [](C& c, const YAML::Node& n) {  // also the data section's tokenizer dir
           c.model_name_or_path = c.data.model_name_or_path = io::read_string(n);
         }})
        .add(io::text("vision_tower", &C::vision_tower))
        .add(io::text("pretrain_mm_mlp_adapter", &C::pretrain_mm_mlp_adapter))
        .add(io::boolean("tune_mm_mlp_adapter", &C::tune_mm_mlp_adapter))
        .add(io::boolean("unfreeze_mm_vision_tower", &C::unfreeze_mm_vision_tower))
        .add(io::boolean("freeze_backbone", &C::freeze_backbone))
        .add(optional_key<int64_t>("mm_vision_select_layer", &C::mm_vision_select_layer,
                                   [](const YAML::Node& n) { return io::read_integer(n, -1000, 1000); }))
        .add(optional_key<std::string>("mm_projector_type", &C::mm_projector_type,
                                       [](const YAML::Node& n) { return io::read_choice(n, {"mlp2x_gelu", "linear"}); }))
        .add(optional_key<std::string>("mm_vision_select_feature", &C::mm_vision_select_feature,
                                       [](const YAML::Node& n) { return io::read_choice(n, {"patch", "cls_patch"}); }))
        .add(io::only<C>("mm_use_im_start_end", kFalse))    // LLaVA-1.0's image start/end tokens
        .add(io::only<C>("mm_use_im_patch_token", kFalse))  // LLaVA-1.0's image patch tokens
        .add(io::only<C>("mm_patch_merge_type", {"flat"}))  // spatial_unpad is LLaVA-NeXT's
        // TrainingArguments
        .add(io::text("output_dir", &C::output_dir))
        .add(io::number("learning_rate", &C::learning_rate, 0, 10))
        .add(io::number("mm_projector_lr", &C::mm_projector_lr, 0, 10))
        .add(io::number("weight_decay", &C::weight_decay, 0, 10))
        .add(io::number("adam_beta1", &C::adam_beta1, 0, 1, /*max_excluded=*/true))
        .add(io::number("adam_beta2", &C::adam_beta2, 0, 1, /*max_excluded=*/true))
        .add(io::number("adam_epsilon", &C::adam_epsilon, 0, 1))
        .add(io::number("max_grad_norm", &C::max_grad_norm, 0, 1e9))
        .add(io::number("num_train_epochs", &C::num_train_epochs, 0, 1e6))
        .add(io::integer("max_steps", &C::max_steps, -1, 1'000'000'000))
        .add(scheduler_key())
        .add(io::number("lr_scheduler_kwargs.min_lr", &C::min_lr, 0, 10))
        .add(io::number("lr_scheduler_kwargs.min_lr_rate", &C::min_lr_rate, 0, 1))
        .add(io::number("lr_scheduler_kwargs.num_cycles", &C::num_cycles, 0, 1e6))
        .add(io::number("warmup_ratio", &C::warmup_ratio, 0, 1))
        .add(io::number("warmup_steps", &C::warmup_steps, 0, 1e9))
        .add(io::integer("gradient_accumulation_steps", &C::gradient_accumulation_steps, 1, 1'000'000))
        .add(io::integer("logging_steps", &C::logging_steps, 0, 1'000'000'000))  // 0: no log lines
        .add(io::integer("save_steps", &C::save_steps, 0, 1'000'000'000))        // 0: only the final save
        .add(io::choice("save_strategy", &C::save_strategy, {"steps", "no"}))
        .add(io::integer("save_total_limit", &C::save_total_limit, 0, 1'000'000))  // 0: keep all
        .add(io::byte_size("max_shard_size", &C::max_shard_size))
        .add(io::boolean("bf16", &C::bf16))
        .add(io::only<C>("fp16", kFalse))                                  // bf16 is the half precision here
        .add(io::only<C>("optim", {"adamw_torch", "adamw_torch_fused"}))  // AdamW with torch's numerics
        .add(io::boolean("gradient_checkpointing", &C::gradient_checkpointing))
        .add(io::text("resume_from_checkpoint", &C::resume_from_checkpoint))
        .add(io::boolean("save_on_interrupt", &C::save_on_interrupt))
        .add(io::boolean("skip_nonfinite_steps", &C::skip_nonfinite_steps))
        .add(io::only<C>("evaluation_strategy", {"no"}))  // there is no evaluation loop
        .add(io::only<C>("eval_strategy", {"no"}))
        // LoRA
        .add(io::boolean("lora_enable", &C::lora_enable))
        .add(io::integer("lora_r", &C::lora_r, 1, 65536))
        .add(io::number("lora_alpha", &C::lora_alpha, 0, 1e6))
        .add(io::number("lora_dropout", &C::lora_dropout, 0, 1, /*max_excluded=*/true))
        .add(io::choice("lora_bias", &C::lora_bias, {"none"}))  // as LLaVA-1.5 trains
        .add(io::texts("lora_target_modules", &C::lora_target_modules))
        .add(io::regex("lora_target_regex", &C::lora_target_regex))
        .add(io::boolean("use_rslora", &C::use_rslora))
        .add(io::texts("modules_to_save", &C::modules_to_save))
        // Scale-out
        .add(io::integer("zero_stage", &C::zero_stage, 0, 2))  // ZeRO-3 is not supported
        .add(io::text("deepspeed", &C::deepspeed))
        .add(io::number("ddp_timeout", &C::ddp_timeout, 1, 1e7))
        .add(io::number("step_timeout", &C::step_timeout, 0, 1e7))  // 0: no hang detection
        .add(io::byte_size("consolidate_optimizer_max_size", &C::consolidate_optimizer_max_size))
        .add(io::integer("reduce_bucket_size", &C::reduce_bucket_size, 1, int64_t{1} << 40))
        .add(device_key())
        .add(io::boolean("use_cpu", &C::use_cpu))
        .add(optional_key<bool>("async_save", &C::async_save, [](const YAML::Node& n) { return io::read_bool(n); }))
        .add(optional_key<bool>("tf32", &C::tf32, [](const YAML::Node& n) { return io::read_bool(n); }))
        // Accepted for HF/LLaVA compatibility, no effect here (README.md: "Accepted and ignored keys").
        .add(io::ignored<C>("lazy_preprocess"))             // records are always read lazily
        .add(io::ignored<C>("is_multimodal"))               // the model's config.json says it
        .add(io::ignored<C>("report_to"))                   // no wandb/tensorboard; see --metrics-out
        .add(io::ignored<C>("run_name"))
        .add(io::ignored<C>("per_device_eval_batch_size"));  // there is no evaluation loop
    return s;
  }();
  return schema;
}

// Keys that must agree with each other.
void check_relations(const TrainConfig& c, const std::string& where) {
  auto bad = [&](const std::string& key, const std::string& why) { fail(where, "key '" + key + "': " + why); };
  if (c.model_name_or_path.empty()) bad("model_name_or_path", "required");
  if (c.output_dir.empty()) bad("output_dir", "required");
  if (c.learning_rate <= 0) bad("learning_rate", "must be > 0");
  if (c.max_steps <= 0 && c.num_train_epochs <= 0) bad("max_steps", "set max_steps > 0 or num_train_epochs > 0");
  if (c.lora_enable && c.tune_mm_mlp_adapter)
    bad("lora_enable", "stage 1 (tune_mm_mlp_adapter: true) trains only the projector; LoRA needs stage 2");
  if (!c.lora_target_modules.empty() && !c.lora_target_regex.empty())
    bad("lora_target_regex", "give lora_target_modules or lora_target_regex, not both");
  if (c.use_cpu && c.device != "auto" && c.device != "cpu")
    bad("use_cpu", "use_cpu: true contradicts device: " + c.device + "; give one of them");
  data::check_data_config(c.data, where);
}

// A DeepSpeed JSON: its zero_optimization.stage, reduce_bucket_size and gradient_clipping.
void read_deepspeed(TrainConfig& c) {
  const nlohmann::json ds = io::read_json_file(c.deepspeed);
  if (!ds.is_object() || (ds.contains("zero_optimization") && !ds["zero_optimization"].is_object()))
    fail(c.deepspeed, "expected a DeepSpeed config object (with a 'zero_optimization' object, if any)");
  auto stage = ds.value("/zero_optimization/stage"_json_pointer, nlohmann::json(0));
  if (!stage.is_number_integer() || stage.get<int64_t>() < 0 || stage.get<int64_t>() > 2)
    fail(c.deepspeed, "zero_optimization.stage: expected 0, 1 or 2 (ZeRO-3 is not supported), got " + stage.dump());
  c.zero_stage = stage.get<int64_t>();
  auto bucket = ds.value("/zero_optimization/reduce_bucket_size"_json_pointer, nlohmann::json(c.reduce_bucket_size));
  if (bucket.is_number()) {  // DeepSpeed configs often write 5e8
    const double value = bucket.get<double>();
    if (!(value >= 1 && value <= static_cast<double>(int64_t{1} << 40)))
      fail(c.deepspeed, "zero_optimization.reduce_bucket_size: expected a number in [1, 2^40], got " + bucket.dump());
    c.reduce_bucket_size = static_cast<int64_t>(value);
  } else if (bucket != "auto") {  // "auto" (HF Trainer fills it in): our default
    fail(c.deepspeed, "zero_optimization.reduce_bucket_size: expected a number or \"auto\", got " + bucket.dump());
  }  // DeepSpeed clips at its gradient_clipping whatever max_grad_norm says; absent it clips at its own default
  // 1.0 (LLaVA's zero2.json names none); "auto" is HF Trainer's max_grad_norm.
  auto clipping = ds.value("gradient_clipping", nlohmann::json(1.0));
  if (clipping.is_number()) {
    const double value = clipping.get<double>();
    if (!(value >= 0 && value <= 1e9))
      fail(c.deepspeed, "gradient_clipping: expected a number in [0, 1e9] or \"auto\", got " + clipping.dump());
    c.max_grad_norm = value;
  } else if (clipping != "auto") {
    fail(c.deepspeed, "gradient_clipping: expected a number in [0, 1e9] or \"auto\", got " + clipping.dump());
  }
}

// Paths in the file (and in --set) are relative to the file, like the data section's.
void resolve_relative_paths(TrainConfig& c, const fs::path& base) {
  for (std::string* p : {&c.model_name_or_path, &c.output_dir, &c.vision_tower, &c.pretrain_mm_mlp_adapter, &c.deepspeed})
    if (!p->empty() && fs::path(*p).is_relative()) *p = (base / *p).string();
  if (c.resume_from_checkpoint != "" && c.resume_from_checkpoint != "auto" && fs::path(c.resume_from_checkpoint).is_relative())
    c.resume_from_checkpoint = (base / c.resume_from_checkpoint).string();
  data::resolve_relative_paths(c.data, base.string());
}

TrainConfig read_settings(const std::vector<io::Setting>& settings, const std::string& where, const fs::path& base) {
  TrainConfig c;
  c.source = where;
  c.ignored_keys = train_schema().read(c, settings);
  if (!base.empty()) resolve_relative_paths(c, base);
  if (!c.deepspeed.empty()) read_deepspeed(c);
  check_relations(c, where);
  return c;
}

std::string layer_range(int64_t layers) {
  return "[" + std::to_string(-(layers + 1)) + ", " + std::to_string(layers) + "]";
}

}  // namespace

const std::vector<std::string>& config_keys() {
  static const std::vector<std::string> keys = train_schema().names();
  return keys;
}

std::vector<std::string> ignored_config_keys() {
  std::vector<std::string> out;
  for (const auto& [name, key] : train_schema().keys())
    if (key.use == io::KeyUse::kIgnored) out.push_back(name);
  return out;
}

std::string nearest_key(const std::string& key) { return io::nearest_name(key, config_keys()); }

TrainConfig parse_train_config(const YAML::Node& root, const std::string& where) {
  return read_settings(io::settings_of(root, where, {"lr_scheduler_kwargs"}), where, "");
}

TrainConfig load_train_config(const std::string& path, const std::vector<std::string>& overrides) {
  auto settings = io::settings_of(io::load_yaml_config(path), path, {"lr_scheduler_kwargs"});
  for (const auto& o : overrides) settings.push_back(io::setting_from_override(o));
  fs::path base = fs::path(path).parent_path();
  if (base.empty()) base = ".";
  return read_settings(settings, path, base);
}

void check_against_model_and_data(const TrainConfig& c, const model::LlavaConfig& m, int64_t samples, int world_size) {
  const std::string model_config = (fs::path(c.model_name_or_path) / "config.json").string();
  auto bad = [&](const std::string& key, const std::string& why) {
    fail(c.source, "key '" + key + "': " + why + " (" + model_config + ")");
  };
  // Keys the model's config.json decides: they may only repeat it.
  const int64_t layers = m.vision.num_hidden_layers;
  if (auto layer = c.mm_vision_select_layer) {
    if (*layer < -(layers + 1) || *layer > layers)
      bad("mm_vision_select_layer", "expected a hidden state of the vision tower's " + std::to_string(layers) +
                                        " layers, in " + layer_range(layers) + ", got " + std::to_string(*layer));
    auto absolute = [&](int64_t l) { return l < 0 ? l + layers + 1 : l; };
    if (m.vision_feature_layers.size() != 1 || absolute(m.vision_feature_layers[0]) != absolute(*layer))
      bad("mm_vision_select_layer", std::to_string(*layer) + " contradicts the model, which selects layer " +
                                        std::to_string(m.vision_feature_layers[0]) +
                                        " (vision_feature_layer); remove the key or give the model's value");
  }
  const std::string projector = "mlp2x_" + m.projector_hidden_act;
  if (c.mm_projector_type && *c.mm_projector_type != projector)
    bad("mm_projector_type", "'" + *c.mm_projector_type + "' contradicts the model, whose projector is " + projector +
                                 "; remove the key or give the model's value");
  if (c.mm_vision_select_feature) {
    const std::string feature = m.vision_feature_select_strategy == "full" ? "cls_patch" : "patch";
    if (*c.mm_vision_select_feature != feature)
      bad("mm_vision_select_feature", "'" + *c.mm_vision_select_feature + "' contradicts the model, which uses " +
                                          feature + " (vision_feature_select_strategy '" +
                                          m.vision_feature_select_strategy + "')");
  }
  // Sizes the model cannot take.
  if (c.data.model_max_length > m.text.max_position_embeddings)
    bad("model_max_length", std::to_string(c.data.model_max_length) + " is more than the model's max_position_embeddings " +
                                std::to_string(m.text.max_position_embeddings));
  // lora_r above a layer's width is wasteful but legal (PEFT takes it, tiny test models use it); a rank
  // whose adapters and their optimizer state cannot fit in this machine's memory is refused here, before
  // anything is allocated (an upper bound: LoRA on every Linear of every decoder layer).
  if (c.lora_enable) {
    const auto& t = m.text;
    const double per_layer = 4.0 * t.hidden_size + 2.0 * t.num_attention_heads * t.head_dim +
                             2.0 * t.num_key_value_heads * t.head_dim + 3.0 * (t.hidden_size + t.intermediate_size);
    const double bytes = 16.0 * static_cast<double>(c.lora_r) * per_layer * static_cast<double>(t.num_hidden_layers);
    const double available = static_cast<double>(::sysconf(_SC_PHYS_PAGES)) * static_cast<double>(::sysconf(_SC_PAGE_SIZE));
    if (available > 0 && bytes > available)
      bad("lora_r", std::to_string(c.lora_r) + " needs up to " + std::to_string(static_cast<int64_t>(bytes / (1 << 30))) +
                        " GiB for the adapters with their gradients and Adam state (fp32), more than this machine's " +
                        std::to_string(static_cast<int64_t>(available / (1 << 30))) + " GiB of memory");
  }
  // Sizes the data cannot take. Like torch's DistributedSampler, an epoch is padded to whole global
  // batches with samples from the start of its order (dataloader_drop_last: the rest is dropped). A global
  // batch that needs more padding than the data set has samples (more than twice its size) is a config
  // mistake, not a recipe: refused, as is one that drop_last would leave with no batch at all.
  std::string data_files;
  for (const auto& f : c.data.data_path) data_files += (data_files.empty() ? "" : ", ") + f;
  auto bad_for_data = [&](const std::string& key, const std::string& why) {
    fail(c.source, "key '" + key + "': " + why + " (" + data_files + ")");
  };
  const int64_t global_batch = c.data.per_device_train_batch_size * world_size;
  const int64_t most = c.data.dataloader_drop_last ? samples : 2 * samples;
  if (global_batch > most)
    bad_for_data("per_device_train_batch_size",
                 std::to_string(c.data.per_device_train_batch_size) + " x " + std::to_string(world_size) +
                     " rank(s) = " + std::to_string(global_batch) + " samples per batch, but the data set has " +
                     std::to_string(samples) + " samples; expected at most " + std::to_string(most) +
                     (c.data.dataloader_drop_last ? " (dataloader_drop_last: true)" : " (each sample at most twice)"));
  if (c.max_steps <= 0) {
    const int64_t batches = c.data.dataloader_drop_last ? samples / global_batch : (samples + global_batch - 1) / global_batch;
    const int64_t steps_per_epoch = (batches + c.gradient_accumulation_steps - 1) / c.gradient_accumulation_steps;
    if (c.num_train_epochs * static_cast<double>(steps_per_epoch) > 1e9)
      bad_for_data("num_train_epochs", std::to_string(c.num_train_epochs) + " epochs of " +
                           std::to_string(steps_per_epoch) + " steps is more than 10^9 optimizer steps");
  }
}

}  // namespace llava::train
