// The training config: one YAML file whose keys are HF TrainingArguments' and LLaVA's Model/Data/
// TrainingArguments' names, so a LLaVA launch script ports line by line. `--set key=value` overrides any
// key (dots reach into maps: lr_scheduler_kwargs.min_lr=1e-5).
//
// Every key is declared once in train_schema() (config.cpp): its type and range or allowed values, and
// whether it acts or is accepted and ignored (README.md lists those). Checks happen in three layers, all
// before anything is written: each key's value (the schema), keys that must agree with each other
// (load_train_config), and keys against the model and the data (check_against_model_and_data, called by
// the trainer once both are read). Every error names the file (line) and the key.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "data/config.h"

namespace llava::model {
struct LlavaConfig;
}

namespace llava::train {

struct TrainConfig {
  data::DataConfig data;  // data_path, image_folder, version, model_max_length, batch size, workers, ...

  // ModelArguments
  std::string model_name_or_path;
  std::string vision_tower;             // original-LLaVA checkpoints: the CLIP dir when not inside the model
  std::string pretrain_mm_mlp_adapter;  // stage 2: mm_projector.bin from stage 1
  bool tune_mm_mlp_adapter = false;     // stage 1: only the projector trains
  bool unfreeze_mm_vision_tower = false;
  bool freeze_backbone = false;
  // The model's config.json decides these; given, they must agree with it (check_against_model_and_data).
  std::optional<int64_t> mm_vision_select_layer;
  std::optional<std::string> mm_projector_type;
  std::optional<std::string> mm_vision_select_feature;  // patch (HF "default") | cls_patch (HF "full")

  // TrainingArguments
  std::string output_dir;
  double learning_rate = 5e-5;
  double mm_projector_lr = 0;  // 0 = the projector uses learning_rate
  double weight_decay = 0;
  double adam_beta1 = 0.9, adam_beta2 = 0.999, adam_epsilon = 1e-8;
  double max_grad_norm = 1.0;
  double num_train_epochs = 3;
  int64_t max_steps = -1;
  std::string lr_scheduler_type = "linear";
  double min_lr = 0, min_lr_rate = 0, num_cycles = 0.5;  // lr_scheduler_kwargs
  double warmup_ratio = 0;
  double warmup_steps = 0;
  int64_t gradient_accumulation_steps = 1;
  int64_t logging_steps = 500;
  int64_t save_steps = 500;
  std::string save_strategy = "steps";
  int64_t save_total_limit = 0;  // 0 = keep all
  std::string max_shard_size = "5GB";
  bool bf16 = false;
  bool gradient_checkpointing = false;
  std::string resume_from_checkpoint;  // "", "auto", or a checkpoint dir
  bool save_on_interrupt = false;      // SIGTERM/SIGINT: finish the step, save a checkpoint, exit
  bool skip_nonfinite_steps = false;   // NaN/Inf loss or grad_norm: skip the update (else stop the run)

  // LoRA (LLaVA's names, plus PEFT's)
  bool lora_enable = false;
  int64_t lora_r = 64;
  double lora_alpha = 16;
  double lora_dropout = 0.05;
  std::string lora_bias = "none";
  std::vector<std::string> lora_target_modules;  // empty = LLaVA's default: every LLM Linear but lm_head
  std::string lora_target_regex;                  // PEFT's regex form (whole-path match)
  bool use_rslora = false;
  std::vector<std::string> modules_to_save;

  // Scale-out
  int64_t zero_stage = 0;
  std::string deepspeed;  // a DeepSpeed JSON; sets zero_stage, reduce_bucket_size, max_grad_norm (gradient_clipping)
  double ddp_timeout = 1800;
  double step_timeout = 0;  // seconds without a finished step before a rank reports where it is and exits; 0: off
  std::string consolidate_optimizer_max_size = "2GB";  // ZeRO: also write optimizer.pt up to this state size
  // ZeRO 1/2: elements per gradient bucket (DeepSpeed's zero_optimization.reduce_bucket_size); also the
  // largest fp32 gradient chunk the update converts at once.
  int64_t reduce_bucket_size = 50'000'000;

  // Where training runs (device.h): "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu",
  // "cuda" (cuda:LOCAL_RANK) or "cuda:N". HF's use_cpu: true means cpu.
  std::string device = "auto";
  bool use_cpu = false;
  // Checkpoints written by a background thread once staged in host memory (default: on for CUDA, off
  // for CPU); unset = that default.
  std::optional<bool> async_save;
  // HF's tf32: TF32 for CUDA's fp32 matmuls and cuDNN (torch.backends.cuda.matmul.allow_tf32 and
  // torch.backends.cudnn.allow_tf32) when set; unset = torch's defaults. Nothing on the CPU.
  std::optional<bool> tf32;

  std::string source;  // the config file (errors name it)
  // Keys given that are accepted for HF/LLaVA compatibility and do nothing here (the trainer logs them).
  std::vector<std::string> ignored_keys;
};

// Reads a config file, applies `overrides` ("key=value"), validates. `where` for errors is the file path.
TrainConfig load_train_config(const std::string& path, const std::vector<std::string>& overrides = {});
TrainConfig parse_train_config(const YAML::Node& root, const std::string& where);

// The config against the model it trains (its config.json) and the data set (`samples` records) on
// `world_size` ranks: keys that contradict the model, sizes the model or the data cannot take.
void check_against_model_and_data(const TrainConfig& c, const model::LlavaConfig& model, int64_t samples,
                                  int world_size);

// Every key a config may hold, sorted (for suggestions and docs).
const std::vector<std::string>& config_keys();
// The keys accepted for compatibility that do nothing here.
std::vector<std::string> ignored_config_keys();

// The valid key closest to `key` by edit distance, or "" when none is close.
std::string nearest_key(const std::string& key);

}  // namespace llava::train
