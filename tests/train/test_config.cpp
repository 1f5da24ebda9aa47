// The training config: LLaVA/HF key names, --set overrides, and one clear error per bad config.
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>

#include "io/error.h"
#include "io/file_util.h"
#include "io/yaml_config.h"
#include "model/config.h"
#include "train/config.h"
#include "io/test_helpers.h"

using namespace llava;

namespace {

std::string write_config(const std::string& name, const std::string& body) {
  static const std::filesystem::path dir = test::temp_dir("config");
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
  CHECK(msg.find("key 'lora_r': expected an integer in [1, 65536], got 'eight'") != std::string::npos);
  CHECK(error_of(kStage2, {"lora_r=2.5"}).find("expected an integer") != std::string::npos);
  CHECK(error_of(kStage2, {"bf16=maybe"}).find("key 'bf16': expected true or false") != std::string::npos);
  CHECK(error_of(kStage2, {"learning_rate=[1, 2]"}).find("expected a number") != std::string::npos);
}

TEST_CASE("impossible combinations are refused with the key that causes them") {
  CHECK(error_of(kStage2, {"tune_mm_mlp_adapter=true"}).find("key 'lora_enable'") != std::string::npos);
  CHECK(error_of(kStage2, {"fp16=true"}).find("key 'fp16'") != std::string::npos);
  CHECK(error_of(kStage2, {"zero_stage=3"}).find("key 'zero_stage'") != std::string::npos);
  CHECK(error_of(kStage2, {"lr_scheduler_type=cosine_restarts"}).find("key 'lr_scheduler_type': expected one of linear") != std::string::npos);
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

TEST_CASE("a DeepSpeed JSON's gradient_clipping sets max_grad_norm as DeepSpeed clips: default 1.0, auto = max_grad_norm") {
  auto load = [](const std::string& name, const std::string& json) {
    return train::load_train_config(write_config("s2.yaml", kStage2), {"max_grad_norm=0.3", "deepspeed=" + write_config(name, json)});
  };
  CHECK(load("clip_none.json", R"({"zero_optimization": {"stage": 2}})").max_grad_norm == 1.0);
  CHECK(load("clip_auto.json", R"({"gradient_clipping": "auto"})").max_grad_norm == 0.3);
  CHECK(load("clip_num.json", R"({"gradient_clipping": 0.5})").max_grad_norm == 0.5);
  CHECK_THROWS_WITH(load("clip_bad.json", R"({"gradient_clipping": -1})"), Catch::Contains("gradient_clipping"));
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

// ------------------------------------------------------------------------------------ the bounded loader

namespace {

std::string repeat(const std::string& s, int n) {
  std::string out;
  for (int i = 0; i < n; ++i) out += s;
  return out;
}

std::string block_map(int depth) {
  std::string out;
  for (int i = 0; i < depth; ++i) out += std::string(i, ' ') + "a:\n";
  return out + std::string(depth, ' ') + "b: 1\n";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// kStage2 with `line` in place of its key's line (or appended).
std::string stage2_with(const std::string& line) {
  const std::string key = line.substr(0, line.find(':')) + ":";
  std::string out, rest = kStage2;
  for (size_t start = 0, end; start < rest.size(); start = end + 1) {
    end = rest.find('\n', start);
    const std::string l = rest.substr(start, end - start);
    if (l.rfind(key, 0) != 0) out += l + "\n";
  }
  return out + line + "\n";
}

}  // namespace

TEST_CASE("nesting deeper than the cap is refused before yaml-cpp parses it, in every shape") {
  const std::vector<std::pair<std::string, std::string>> shapes = {
      {"flow lists", "data_path: " + repeat("[", 100000) + repeat("]", 100000) + "\n"},
      {"flow maps", "lr_scheduler_kwargs: " + repeat("{a: ", 100000) + "1" + repeat("}", 100000) + "\n"},
      {"unclosed flow", "x: " + repeat("[", 200000)},
      {"block maps", block_map(2000)},
      {"block lists on one line", "data_path:\n  " + repeat("- ", 50000) + "x\n"},
      {"block lists by indentation", [] {
         std::string t = "data_path:\n";
         for (int i = 0; i < 2000; ++i) t += std::string(i, ' ') + "-\n";
         return t;
       }()},
      {"mixed", "a:\n  b: [" + repeat("{c: [", 5000) + "\n"},
  };
  for (const auto& [shape, body] : shapes) {
    INFO(shape);
    const std::string msg = error_of(body);
    CHECK(contains(msg, "bad.yaml"));
    CHECK(contains(msg, "nested more than 32 levels"));
  }
  // Within the cap: parsed (and then refused for what it is, not for its depth).
  CHECK(contains(error_of("data_path: " + repeat("[", 20) + repeat("]", 20) + "\n"), "key 'data_path'"));
  CHECK(!contains(error_of(std::string(kStage2) + "# [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\nrun_name: '[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[['\n"), "nested"));
}

TEST_CASE("a second document, a key given twice and files that are no config are refused with lines") {
  auto msg = error_of(std::string(kStage2) + "---\nlora_r: 8\n");
  CHECK(contains(msg, "line 25: a second YAML document"));
  msg = error_of(std::string(kStage2) + "lora_r: 8\n");
  CHECK(contains(msg, "line 25: key 'lora_r' given twice (first at line 7)"));
  msg = error_of(std::string(kStage2) + "lr_scheduler_kwargs:\n  min_lr: 1.0e-5\n  min_lr: 2.0e-5\n");
  CHECK(contains(msg, "line 27: key 'min_lr' given twice (first at line 26)"));
  msg = error_of(std::string(kStage2) + "lr_scheduler_kwargs.min_lr: 1.0e-5\nlr_scheduler_kwargs: {min_lr: 2.0e-5}\n");
  CHECK(contains(msg, "key 'lr_scheduler_kwargs.min_lr' given twice"));
  CHECK(contains(msg, "bad.yaml:26"));
  // Data keys too: the data section used to keep the first value, the trainer the last.
  CHECK(contains(error_of(std::string(kStage2) + "per_device_train_batch_size: 2\n"), "key 'per_device_train_batch_size' given twice"));
  auto dir = std::filesystem::path(write_config("x.yaml", "")).parent_path();
  CHECK_THROWS_WITH(train::load_train_config(dir.string()), Catch::Contains("expected a regular YAML config file"));
  CHECK_THROWS_WITH(train::load_train_config("/dev/zero"),
                    Catch::Contains("/dev/zero: is a character device, expected a regular YAML config file"));
  CHECK_THROWS_WITH(train::load_train_config(write_config("big.yaml", std::string(io::kMaxYamlConfigFileBytes + 1, '#'))),
                    Catch::Contains("more than the limit of 4194304 bytes"));
  CHECK_THROWS_WITH(data::load_data_config(write_config("d.yaml", "data_path: a\ndata_path: b\nmodel_name_or_path: m\n")),
                    Catch::Contains("line 2: key 'data_path' given twice (first at line 1)"));
  CHECK_THROWS_WITH(data::load_data_config(write_config("d2.yaml", "data_path: " + repeat("[", 100000))),
                    Catch::Contains("nested more than 32 levels"));
}

TEST_CASE("every wrong value names the key, the value and what the key takes") {
  const std::vector<std::pair<std::string, std::string>> cases = {
      // maps and lists where a path or a string is expected
      {"data_path: {a: 1}", "key 'data_path': expected a string or a list of strings, got a map"},
      {"data_path: [[a]]", "key 'data_path': expected a string or a list of strings, got a list"},
      {"output_dir: {x: 1}", "key 'output_dir': expected a string, got a map"},
      {"model_name_or_path: [a, b]", "key 'model_name_or_path': expected a string, got a list"},
      {"lr_scheduler_kwargs: 5", "key 'lr_scheduler_kwargs': expected a map of lr_scheduler_kwargs.* settings, got '5'"},
      // what a library would have said in its own words
      {"lora_target_regex: '.*(q_proj'", "key 'lora_target_regex': expected a regular expression in RE2 syntax"},
      {"lora_target_regex: '(?=q)q_proj'", "without backreferences or lookaround): invalid perl operator: (?="},
      {"lora_target_regex: '[a-'", "got '[a-'"},
      {"lora_dropout: 1.0", "key 'lora_dropout': expected a number in [0, 1), got '1.0'"},
      {"lora_dropout: -0.1", "key 'lora_dropout': expected a number in [0, 1), got '-0.1'"},
      {"lora_dropout: .nan", "key 'lora_dropout'"},
      // sizes without bound
      {"per_device_train_batch_size: 1000000000000", "key 'per_device_train_batch_size': expected an integer in [1, 65536]"},
      {"gradient_accumulation_steps: 1e12", "key 'gradient_accumulation_steps': expected an integer in [1, 1000000]"},
      {"max_steps: 1e15", "key 'max_steps': expected an integer in [-1, 1000000000]"},
      {"model_max_length: 1e9", "key 'model_max_length': expected an integer in [1, 1048576]"},
      {"save_steps: -5", "key 'save_steps'"},
      {"logging_steps: 1e300", "key 'logging_steps'"},
      {"warmup_steps: 1e300", "key 'warmup_steps'"},
      {"lora_r: 1e9", "key 'lora_r': expected an integer in [1, 65536]"},
      {"dataloader_num_workers: 100000", "key 'dataloader_num_workers': expected an integer in [0, 256]"},
      {"num_train_epochs: 1e300", "key 'num_train_epochs'"},
      {"ddp_timeout: 1e300", "key 'ddp_timeout'"},
      {"seed: -1", "key 'seed'"},
      // one meaning here
      {"fp16: true", "key 'fp16': expected one of false, False, got 'true'"},
      {"optim: sgd", "key 'optim': expected one of adamw_torch, adamw_torch_fused, got 'sgd'"},
      {"mm_patch_merge_type: spatial_unpad", "key 'mm_patch_merge_type'"},
      {"eval_strategy: steps", "key 'eval_strategy'"},
      {"mm_projector_type: qformer", "key 'mm_projector_type': expected one of mlp2x_gelu, linear"},
      {"version: v9", "key 'version': expected a conversation template"},
      {"? [a, b]\n: 1", "expected a key name, got a list"},
  };
  for (const auto& [line, expected] : cases) {
    INFO(line);
    const std::string msg = error_of(stage2_with(line));
    CHECK(contains(msg, expected));
    CHECK(contains(msg, "bad.yaml:"));
  }
}

TEST_CASE("bad --set forms name the override") {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"max_steps", "--set max_steps: expected key=value"},
      {"=5", "--set =5: expected key=value"},
      {"data_path.x=1", "unknown key 'data_path.x' (did you mean 'data_path'?)"},
      {"lora_r.x=1", "unknown key 'lora_r.x'"},
      {"lr_scheduler_kwargs.bogus=1", "unknown key 'lr_scheduler_kwargs.bogus'"},
      {"lora_r={a: 1}", "--set lora_r={a: 1}: key 'lora_r': expected an integer in [1, 65536], got a map"},
      {"data_path=[a, b", "--set data_path=[a, b: not valid YAML"},
      {"data_path=" + repeat("[", 100000), "nested more than 32 levels"},
      {"lora_r=1\n---\n2", "--set lora_r=1\\n---\\n2: line 2: a second YAML document"},
  };
  for (const auto& [set, expected] : cases) {
    INFO(set);
    CHECK(contains(error_of(kStage2, {set}), expected));
  }
}

TEST_CASE("accepted-and-ignored keys are reported and each is listed in README.md") {
  auto c = train::load_train_config(write_config("s2.yaml", kStage2));  // tf32, lazy_preprocess, report_to
  CHECK(c.ignored_keys == std::vector<std::string>{"lazy_preprocess", "report_to"});
  CHECK(c.tf32 == true);  // acts on CUDA (device.h apply_tf32)
  CHECK(c.lora_dropout == Approx(0.05));
  std::ifstream in(std::string(LLAVA_SOURCE_DIR) + "/README.md");
  const std::string readme((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t section = readme.find("Accepted and ignored config keys");
  REQUIRE(section != std::string::npos);
  for (const auto& key : train::ignored_config_keys()) {
    INFO(key);
    CHECK(readme.find("`" + key + "`", section) != std::string::npos);
  }
}

TEST_CASE("keys are checked against the model and the data before training") {
  auto c = train::load_train_config(write_config("s2.yaml", kStage2));
  c.data.per_device_train_batch_size = 2;
  c.lora_r = 8;
  c.data.model_max_length = 128;
  model::LlavaConfig m;
  m.vision.num_hidden_layers = 2;
  m.text.hidden_size = 32;
  m.text.max_position_embeddings = 256;
  m.vision_feature_layers = {-2};
  auto error = [&](train::TrainConfig changed, int64_t samples = 10, int world = 1) {
    try {
      train::check_against_model_and_data(changed, m, samples, world);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  CHECK(error(c).empty());
  auto changed = c;
  changed.mm_vision_select_layer = 1;  // the same layer as -2 of 2 layers (hidden states 0..2)
  CHECK(error(changed).empty());
  changed.mm_vision_select_layer = -30;
  CHECK(contains(error(changed), "key 'mm_vision_select_layer': expected a hidden state of the vision tower's 2 layers, in [-3, 2], got -30"));
  changed.mm_vision_select_layer = -1;
  CHECK(contains(error(changed), "key 'mm_vision_select_layer': -1 contradicts the model, which selects layer -2"));
  changed = c;
  changed.mm_projector_type = "linear";
  CHECK(contains(error(changed), "key 'mm_projector_type': 'linear' contradicts the model, whose projector is mlp2x_gelu"));
  changed.mm_projector_type = "mlp2x_gelu";
  CHECK(error(changed).empty());
  changed.mm_vision_select_feature = "cls_patch";
  CHECK(contains(error(changed), "key 'mm_vision_select_feature'"));
  changed = c;
  changed.data.model_max_length = 4096;
  CHECK(contains(error(changed), "key 'model_max_length': 4096 is more than the model's max_position_embeddings 256"));
  changed = c;
  changed.lora_r = 64;  // above hidden_size: wasteful, legal in PEFT
  CHECK(error(changed).empty());
  changed.lora_r = 65536;  // the schema's largest rank on this 32-layer decoder: ~100 TiB of adapter state
  CHECK((contains(error(changed), "key 'lora_r': 65536 needs up to ") && contains(error(changed), "GiB of memory")));
  changed = c;
  changed.data.per_device_train_batch_size = 4;
  CHECK(contains(error(changed, 7, 4), "key 'per_device_train_batch_size': 4 x 4 rank(s) = 16 samples per batch, but the data set has 7"));
  CHECK(error(changed, 8, 4).empty());  // padded: each sample at most twice
  changed.data.dataloader_drop_last = true;
  CHECK(contains(error(changed, 15, 4), "dataloader_drop_last"));
  CHECK(error(changed, 16, 4).empty());
  changed = c;
  changed.max_steps = -1;
  changed.num_train_epochs = 1e6;
  CHECK(contains(error(changed, 10000), "key 'num_train_epochs'"));
  for (const auto& msg : {error(changed, 10000)}) CHECK(contains(msg, "s2.yaml"));
}
