#include "data/config.h"

#include <yaml-cpp/yaml.h>

#include <filesystem>

#include "io/error.h"

namespace fs = std::filesystem;

namespace llava::data {
namespace {

// `version` / `conv_template`: a conversation template by LLaVA's names.
io::ConfigKey<DataConfig> template_key(std::string name) {
  return {std::move(name), [](DataConfig& c, const YAML::Node& n) {
            const std::string value = io::read_string(n);
            try {
              parse_template(value);
            } catch (const Error&) {
              throw io::BadValue{"a conversation template (plain, v1, vicuna_v1, llava_hf, ...)"};
            }
            c.version = value;
          }};
}

}  // namespace

// Ranges: finite, and far above any real run (a 10^12 batch would be allocated before it failed).
const io::Schema<DataConfig>& data_schema() {
  using C = DataConfig;
  static const io::Schema<DataConfig> schema = [] {
    io::Schema<DataConfig> s;
    s.add(io::texts("data_path", &C::data_path))
        .add(io::text("image_folder", &C::image_folder))
        .add(template_key("version"))
        .add(template_key("conv_template"))
        .add(io::integer("model_max_length", &C::model_max_length, 1, 1 << 20))
        .add(io::choice("image_aspect_ratio", &C::image_aspect_ratio, {"pad", "square"}))
        .add(io::integer("per_device_train_batch_size", &C::per_device_train_batch_size, 1, 65536))
        .add(io::integer("dataloader_num_workers", &C::dataloader_num_workers, 0, 256))
        .add(io::boolean("dataloader_pin_memory", &C::dataloader_pin_memory))
        .add(io::boolean("dataloader_drop_last", &C::dataloader_drop_last))
        .add(io::boolean("group_by_modality_length", &C::group_by_modality_length))
        .add(io::integer("seed", &C::seed, 0, (int64_t{1} << 53)))
        .add(io::boolean("skip_missing_images", &C::skip_missing_images))
        .add(io::text("model_name_or_path", &C::model_name_or_path))
        .add(io::text("tokenizer_path", &C::tokenizer_path))
        .add(io::text("image_processor_path", &C::image_processor_path));
    return s;
  }();
  return schema;
}

void check_data_config(const DataConfig& cfg, const std::string& where) {
  if (cfg.data_path.empty()) fail(where, "key 'data_path': required (a file or a list of files)");
  for (const auto& p : cfg.data_path)
    if (p.empty()) fail(where, "key 'data_path': expected a file name, got ''");
  if (cfg.tokenizer_dir().empty()) fail(where, "key 'model_name_or_path' (or 'tokenizer_path'): required");
}

DataConfig read_data_config(const YAML::Node& node, const std::string& where) {
  DataConfig cfg;
  data_schema().read(cfg, io::settings_of(node, where, {}), /*other_keys_allowed=*/true);
  check_data_config(cfg, where);
  return cfg;
}

DataConfig load_data_config(const std::string& yaml_path) {
  DataConfig cfg = read_data_config(io::load_yaml_config(yaml_path), yaml_path);
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
