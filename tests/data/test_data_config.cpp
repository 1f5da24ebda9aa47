// DataConfig: LLaVA/HF key names, only its own keys, errors that name the key.
#include <catch2/catch.hpp>
#include <yaml-cpp/yaml.h>

#include "data/config.h"
#include "data/conversation.h"
#include "io/error.h"

using namespace llava::data;

TEST_CASE("DataConfig reads its keys and ignores the trainer's") {
  auto cfg = read_data_config(YAML::Load(R"(
data_path: [a.json, b.jsonl]
image_folder: imgs
version: plain
model_max_length: 512
image_aspect_ratio: pad
per_device_train_batch_size: 4
dataloader_num_workers: 2
group_by_modality_length: true
seed: 9
skip_missing_images: true
model_name_or_path: /m
learning_rate: 2e-5
lora_enable: true
)"), "cfg.yaml");
  REQUIRE(cfg.data_path == std::vector<std::string>{"a.json", "b.jsonl"});
  REQUIRE(cfg.version == "plain");
  REQUIRE(cfg.model_max_length == 512);
  REQUIRE(cfg.per_device_train_batch_size == 4);
  REQUIRE(cfg.dataloader_num_workers == 2);
  REQUIRE(cfg.group_by_modality_length);
  REQUIRE(cfg.seed == 9);
  REQUIRE(cfg.skip_missing_images);
  REQUIRE(cfg.tokenizer_dir() == "/m");
  auto single = read_data_config(YAML::Load("data_path: one.json\ntokenizer_path: /t\nmodel_name_or_path: /m"), "c");
  REQUIRE(single.data_path == std::vector<std::string>{"one.json"});
  REQUIRE(single.tokenizer_dir() == "/t");
}

TEST_CASE("DataConfig errors name the file and the key") {
  REQUIRE_THROWS_WITH(read_data_config(YAML::Load("model_name_or_path: m"), "c.yaml"),
                      Catch::Contains("c.yaml") && Catch::Contains("data_path"));
  REQUIRE_THROWS_WITH(read_data_config(YAML::Load("data_path: d\nmodel_name_or_path: m\nmodel_max_length: lots"), "c.yaml"),
                      Catch::Contains("model_max_length"));
  REQUIRE_THROWS_WITH(read_data_config(YAML::Load("data_path: d\nmodel_name_or_path: m\nversion: v9"), "c.yaml"),
                      Catch::Contains("version") && Catch::Contains("v9"));
  REQUIRE_THROWS_WITH(read_data_config(YAML::Load("data_path: d\nmodel_name_or_path: m\nimage_aspect_ratio: x"), "c"),
                      Catch::Contains("image_aspect_ratio"));
}

TEST_CASE("move_image_to_front is LLaVA's preprocess_multimodal") {
  auto turns = move_image_to_front({{"human", "What is this?\n<image>"}, {"gpt", "A cat."}});
  REQUIRE(turns[0].value == "<image>\nWhat is this?");
  REQUIRE(turns[1].value == "A cat.");
  REQUIRE(move_image_to_front({{"human", " <image> "}})[0].value == "<image>");
}
