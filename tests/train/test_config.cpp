// The training config: LLaVA/HF key names, --set overrides, and one clear error per bad config.
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>

#include "io/error.h"
#include "train/config.h"

using namespace llava;

namespace {

std::string write_config(const std::string& name, const std::string& body) {
  auto dir = std::filesystem::temp_directory_path() / ("llava-config-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  auto path = (dir / name).string();
  std::ofstream(path) << body;
  return path;
}

const char* kStage2 = R"(model_name_or_path: /models/tiny
data_path: [/data/a.json, /data/b.jsonl]
image_folder: /data/images
version: v1
output_dir: /out/stage2
lora_enable: true
lora_r: 128
lora_alpha: 256
mm_projector_lr: 2.0e-5
learning_rate: 2.0e-4
per_device_train_batch_size: 16
gradient_accumulation_steps: 1
num_train_epochs: 1
warmup_ratio: 0.03
lr_scheduler_type: cosine
weight_decay: 0.0
bf16: true
tf32: true
model_max_length: 2048
gradient_checkpointing: true
lazy_preprocess: true
report_to: wandb
group_by_modality_length: true
image_aspect_ratio: pad
)";

std::string error_of(const std::string& body, const std::vector<std::string>& overrides = {}) {
  auto path = write_config("bad.yaml", body);
  try {
    train::load_train_config(path, overrides);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("LLaVA's stage-2 LoRA script keys map 1:1 onto the config") {
  auto c = train::load_train_config(write_config("s2.yaml", kStage2));
  CHECK(c.lora_enable);
  CHECK(c.lora_r == 128);
  CHECK(c.lora_alpha == 256);
  CHECK(c.mm_projector_lr == Approx(2e-5));
  CHECK(c.learning_rate == Approx(2e-4));
  CHECK(c.lr_scheduler_type == "cosine");
  CHECK(c.warmup_ratio == Approx(0.03));
  CHECK(c.bf16);
  CHECK(c.gradient_checkpointing);
  CHECK(c.data.data_path.size() == 2);
  CHECK(c.data.per_device_train_batch_size == 16);
  CHECK(c.data.group_by_modality_length);
  CHECK(c.data.image_aspect_ratio == "pad");
}

TEST_CASE("set overrides change any key with YAML typing including nested scheduler kwargs") {
  auto c = train::load_train_config(write_config("s2.yaml", kStage2),
                                    {"learning_rate=1e-3", "lora_r=8", "lr_scheduler_type=cosine_with_min_lr",
                                     "lr_scheduler_kwargs.min_lr_rate=0.1", "per_device_train_batch_size=2"});
  CHECK(c.learning_rate == Approx(1e-3));
  CHECK(c.lora_r == 8);
  CHECK(c.min_lr_rate == Approx(0.1));
  CHECK(c.data.per_device_train_batch_size == 2);
}

TEST_CASE("unknown, misspelled and mistyped keys name the key and suggest the nearest one") {
  auto msg = error_of(std::string(kStage2) + "learning_rte: 1e-4\n");
  CHECK(msg.find("unknown key 'learning_rte'") != std::string::npos);
  CHECK(msg.find("did you mean 'learning_rate'") != std::string::npos);
  msg = error_of(kStage2, {"gradient_acumulation_steps=4"});
  CHECK(msg.find("did you mean 'gradient_accumulation_steps'") != std::string::npos);
  CHECK(error_of(std::string(kStage2) + "completely_unrelated_setting_xyz: 1\n").find("unknown key") != std::string::npos);
  msg = error_of(kStage2, {"lora_r=eight"});
  CHECK(msg.find("key 'lora_r': expected an integer, got 'eight'") != std::string::npos);
  CHECK(error_of(kStage2, {"lora_r=2.5"}).find("expected an integer") != std::string::npos);
  CHECK(error_of(kStage2, {"bf16=maybe"}).find("key 'bf16': expected true or false") != std::string::npos);
  CHECK(error_of(kStage2, {"learning_rate=[1, 2]"}).find("expected a number") != std::string::npos);
}

TEST_CASE("impossible combinations are refused with the key that causes them") {
  CHECK(error_of(kStage2, {"tune_mm_mlp_adapter=true"}).find("key 'lora_enable'") != std::string::npos);
  CHECK(error_of(kStage2, {"fp16=true"}).find("key 'fp16'") != std::string::npos);
  CHECK(error_of(kStage2, {"zero_stage=3"}).find("key 'zero_stage'") != std::string::npos);
  CHECK(error_of(kStage2, {"lr_scheduler_type=cosine_restarts"}).find("unknown schedule") != std::string::npos);
  CHECK(error_of(kStage2, {"max_steps=0", "num_train_epochs=0"}).find("key 'max_steps'") != std::string::npos);
  CHECK(error_of(kStage2, {"lora_target_modules=[q_proj]", "lora_target_regex=.*q_proj"}).find("lora_target_regex") != std::string::npos);
  CHECK(error_of("[1, 2]").find("expected a YAML map") != std::string::npos);
  CHECK(error_of("a: [1,").find("not valid YAML") != std::string::npos);
}

TEST_CASE("a DeepSpeed JSON's zero_optimization.stage sets zero_stage") {
  auto ds = write_config("zero2.json", R"({"zero_optimization": {"stage": 2, "overlap_comm": true}, "bf16": {"enabled": "auto"}})");
  auto c = train::load_train_config(write_config("s2.yaml", kStage2), {"deepspeed=" + ds});
  CHECK(c.zero_stage == 2);
  CHECK(c.reduce_bucket_size == 50'000'000);  // not given: our default
  auto sized = write_config("zero2b.json", R"({"zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8}})");
  CHECK(train::load_train_config(write_config("s2.yaml", kStage2), {"deepspeed=" + sized}).reduce_bucket_size == 500'000'000);
  auto bad = write_config("zero2c.json", R"({"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}})");
  CHECK_THROWS_WITH(train::load_train_config(write_config("s2.yaml", kStage2), {"deepspeed=" + bad}),
                    Catch::Contains("reduce_bucket_size"));
  CHECK_THROWS_WITH(train::load_train_config(write_config("s2.yaml", kStage2), {"reduce_bucket_size=0"}),
                    Catch::Contains("reduce_bucket_size"));
}

TEST_CASE("the LLaVA-1.5 recipes in configs/ parse") {
  for (const char* name : {"llava-1.5-stage1-pretrain.yaml", "llava-1.5-stage2-lora.yaml", "llava-1.5-stage2-full.yaml"}) {
    INFO(name);
    auto c = train::load_train_config(std::string(LLAVA_SOURCE_DIR) + "/configs/" + name);
    CHECK(c.zero_stage == 2);
    CHECK(c.lr_scheduler_type == "cosine");
    CHECK(c.warmup_ratio == Approx(0.03));
    CHECK(c.bf16);
  }
  auto stage1 = train::load_train_config(std::string(LLAVA_SOURCE_DIR) + "/configs/llava-1.5-stage1-pretrain.yaml");
  CHECK(stage1.tune_mm_mlp_adapter);
  CHECK(stage1.data.version == "plain");
  CHECK(stage1.learning_rate == Approx(1e-3));
  CHECK(stage1.data.per_device_train_batch_size == 32);
}
