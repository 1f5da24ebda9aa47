#include "data/config.h"

#include <yaml-cpp/yaml.h>

#include <filesystem>

#include "io/error.h"

namespace fs = std::filesystem;

namespace llava::data {
namespace {

template <typename T>
void read_key(const YAML::Node& node, const std::string& key, T& out, const std::string& where) {
  if (!node[key] || node[key].IsNull()) return;
  try {
    out = node[key].as<T>();
  } catch (const YAML::Exception&) {
    fail(where, "key '" + key + "': cannot read '" + YAML::Dump(node[key]) + "' as the expected type");
  }
}

}  // namespace

DataConfig read_data_config(const YAML::Node& node, const std::string& where) {
  if (!node.IsMap()) fail(where, "expected a YAML map of settings");
  DataConfig cfg;
  if (node["data_path"]) {
    if (node["data_path"].IsSequence())
      read_key(node, "data_path", cfg.data_path, where);
    else
      cfg.data_path = {node["data_path"].as<std::string>()};
  }
  read_key(node, "image_folder", cfg.image_folder, where);
  read_key(node, "conv_template", cfg.version, where);
  read_key(node, "version", cfg.version, where);
  read_key(node, "model_max_length", cfg.model_max_length, where);
  read_key(node, "image_aspect_ratio", cfg.image_aspect_ratio, where);
  read_key(node, "per_device_train_batch_size", cfg.per_device_train_batch_size, where);
  read_key(node, "dataloader_num_workers", cfg.dataloader_num_workers, where);
  read_key(node, "dataloader_drop_last", cfg.dataloader_drop_last, where);
  read_key(node, "group_by_modality_length", cfg.group_by_modality_length, where);
  read_key(node, "seed", cfg.seed, where);
  read_key(node, "skip_missing_images", cfg.skip_missing_images, where);
  read_key(node, "model_name_or_path", cfg.model_name_or_path, where);
  read_key(node, "tokenizer_path", cfg.tokenizer_path, where);
  read_key(node, "image_processor_path", cfg.image_processor_path, where);

  if (cfg.data_path.empty()) fail(where, "key 'data_path': required (a file or a list of files)");
  if (cfg.tokenizer_dir().empty()) fail(where, "key 'model_name_or_path' (or 'tokenizer_path'): required");
  try {
    parse_template(cfg.version);
  } catch (const Error& e) {
    fail(where, std::string("key 'version': ") + e.what());
  }
  if (cfg.image_aspect_ratio != "pad" && cfg.image_aspect_ratio != "square")
    fail(where, "key 'image_aspect_ratio': expected pad or square, got '" + cfg.image_aspect_ratio + "'");
  if (cfg.model_max_length < 1) fail(where, "key 'model_max_length': expected >= 1");
  if (cfg.per_device_train_batch_size < 1) fail(where, "key 'per_device_train_batch_size': expected >= 1");
  if (cfg.dataloader_num_workers < 0) fail(where, "key 'dataloader_num_workers': expected >= 0");
  return cfg;
}

DataConfig load_data_config(const std::string& yaml_path) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(yaml_path);
  } catch (const YAML::Exception& e) {
    fail(yaml_path, std::string("cannot read YAML: ") + e.what());
  }
  DataConfig cfg = read_data_config(root, yaml_path);
  resolve_relative_paths(cfg, fs::path(yaml_path).parent_path().string());
  return cfg;
}

void resolve_relative_paths(DataConfig& cfg, const std::string& base) {
  auto anchor = [&](std::string& p) {
    if (!p.empty() && fs::path(p).is_relative()) p = (fs::path(base) / p).string();
  };
  for (auto& p : cfg.data_path) anchor(p);
  anchor(cfg.image_folder);
  anchor(cfg.model_name_or_path);
  anchor(cfg.tokenizer_path);
  anchor(cfg.image_processor_path);
}

ClipImageConfig image_config_for(const DataConfig& cfg) {
  fs::path p = cfg.image_processor_path.empty() ? fs::path(cfg.model_name_or_path) : fs::path(cfg.image_processor_path);
  if (fs::is_directory(p)) p /= "preprocessor_config.json";
  ClipImageConfig image;
  if (!p.empty() && fs::is_regular_file(p))
    image = read_clip_image_config(p.string());
  else if (!cfg.image_processor_path.empty())
    fail(p.string(), "missing (from image_processor_path)");
  image.pad_to_square = cfg.image_aspect_ratio == "pad";
  return image;
}

SamplerConfig sampler_config_for(const DataConfig& cfg) {
  SamplerConfig s;
  s.seed = cfg.seed;
  s.per_device_batch = cfg.per_device_train_batch_size;
  s.drop_last = cfg.dataloader_drop_last;
  s.group_by_modality = cfg.group_by_modality_length;
  return s;
}

LlavaDataset make_dataset(const DataConfig& cfg, const ImageTokens& image_tokens) {
  DatasetSettings settings;
  settings.image_folder = cfg.image_folder;
  settings.conversation = parse_template(cfg.version);
  settings.model_max_length = cfg.model_max_length;
  settings.image_tokens = image_tokens;
  settings.image = image_config_for(cfg);
  settings.skip_missing_images = cfg.skip_missing_images;
  return LlavaDataset(load_records(cfg.data_path), Tokenizer::load(cfg.tokenizer_dir()), settings);
}

}  // namespace llava::data
