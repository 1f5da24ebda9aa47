// The data section of a training config, with LLaVA/HF key names. The training config embeds it: this
// reads only its own keys from a YAML map and leaves the rest alone.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/loader.h"
#include "io/yaml_config.h"

namespace llava::data {

struct DataConfig {
  std::vector<std::string> data_path;     // `data_path`: a file or a list of files (JSON list or JSONL)
  std::string image_folder;               // `image_folder`
  std::string version = "v1";             // `version` (or `conv_template`): plain | v1/vicuna_v1 | llava_hf
  int64_t model_max_length = 2048;        // `model_max_length`
  std::string image_aspect_ratio = "square";  // `image_aspect_ratio`: pad | square
  int64_t per_device_train_batch_size = 1;
  int dataloader_num_workers = 0;
  // HF's dataloader_pin_memory: batches built in page-locked memory, when training on a CUDA device.
  bool dataloader_pin_memory = true;
  bool dataloader_drop_last = false;
  bool group_by_modality_length = false;
  uint64_t seed = 42;
  bool skip_missing_images = false;       // `skip_missing_images`: false = an unreadable image is an error
  std::string model_name_or_path;         // tokenizer (and preprocessor_config.json) directory ...
  std::string tokenizer_path;             // ... unless `tokenizer_path` says otherwise
  std::string image_processor_path;       // dir or file of preprocessor_config.json (default: the model dir)

  std::string tokenizer_dir() const { return tokenizer_path.empty() ? model_name_or_path : tokenizer_path; }
};

// Every data key: its type, range or allowed values (the training config includes these keys).
const io::Schema<DataConfig>& data_schema();
// The keys that must be given and hang together (data_path, a tokenizer dir).
void check_data_config(const DataConfig& cfg, const std::string& where);

// Errors name `where` and the key. Keys that are not data keys are left alone (a training config is also
// a data config).
DataConfig read_data_config(const YAML::Node& node, const std::string& where);
// Through io::load_yaml_config's bounds (regular file, size, nesting, one document, unique keys).
DataConfig load_data_config(const std::string& yaml_path);
// Relative paths in a config are relative to the config file's directory `base`.
void resolve_relative_paths(DataConfig& cfg, const std::string& base);

// The CLIP settings: preprocessor_config.json (image_processor_path, else the model dir) when present,
// else CLIP-336 defaults; pad_to_square from image_aspect_ratio.
ClipImageConfig image_config_for(const DataConfig& cfg);
SamplerConfig sampler_config_for(const DataConfig& cfg);
LlavaDataset make_dataset(const DataConfig& cfg, const ImageTokens& image_tokens);

}  // namespace llava::data
