#include "model/config.h"

#include <cmath>
#include <filesystem>
#include <set>

#include <nlohmann/json.hpp>

#include "io/error.h"
#include "io/json_input.h"

namespace llava::model {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// A present, non-null key of the wanted type, or the HF default. `where` is "<file>: <section>".
template <class T>
T get(const json& j, const std::string& key, T fallback, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
    // nlohmann converts a float to an integer with a plain cast: out of range that is undefined behaviour.
    if (it->is_number_float()) {
      const double v = it->get<double>();
      if (!(std::abs(v) < 4.6e18) || v != std::floor(v))
        fail(where, "key '" + key + "' must be an integer, got " + it->dump());
      return static_cast<T>(v);
    }
  }
  try {
    return it->get<T>();
  } catch (const json::exception&) {
    fail(where, "key '" + key + "' has the wrong type (" + std::string(it->type_name()) + ")");
  }
}

std::optional<int64_t> get_optional_int(const json& j, const std::string& key, std::optional<int64_t> fallback,
                                        const std::string& where) {
  if (!j.contains(key)) return fallback;
  if (j[key].is_null()) return std::nullopt;
  return get<int64_t>(j, key, 0, where);
}

json read_json(const std::string& path) { return io::read_json_file(path); }

// A size from the file: positive (sizes divide other sizes) and below `max`, far above any real LLaVA
// (34B: hidden 7168, 60 layers, vocab 64000), so that a hostile config cannot make us allocate terabytes.
int64_t get_size(const json& j, const std::string& key, int64_t fallback, int64_t max, const std::string& where) {
  const int64_t v = get(j, key, fallback, where);
  if (v < 1 || v > max)
    fail(where, "key '" + key + "' = " + std::to_string(v) + " is out of range (1 to " + std::to_string(max) + ")");
  return v;
}

void check_activation(const std::string& act, const std::string& where) {
  static const std::set<std::string> known = {"gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu",
                                              "silu", "swish", "relu"};
  if (!known.count(act)) fail(where, "activation '" + act + "' is not supported");
}

// A real number the model divides or exponentiates by: finite, and > 0 (or >= 0 when zero is allowed), else
// the forward computes NaN and the error would blame the loss instead of the key.
double checked_real(double value, const std::string& key, bool zero_allowed, const std::string& where) {
  if (!std::isfinite(value) || value < 0 || (!zero_allowed && value == 0))
    fail(where, key + ": expected a finite number " + (zero_allowed ? ">= 0" : "> 0") + ", got " + c10::str(value));
  return value;
}

VisionConfig parse_vision(const json& j, VisionConfig v, const std::string& where) {
  if (!j.is_object()) fail(where, "expected an object");
  std::string type = get<std::string>(j, "model_type", "clip_vision_model", where);
  if (type != "clip_vision_model")
    fail(where, "vision model_type '" + type + "' is not supported (only clip_vision_model)");
  v.hidden_size = get_size(j, "hidden_size", v.hidden_size, 1 << 16, where);
  v.intermediate_size = get_size(j, "intermediate_size", v.intermediate_size, 1 << 18, where);
  v.num_hidden_layers = get_size(j, "num_hidden_layers", v.num_hidden_layers, 1 << 10, where);
  v.num_attention_heads = get_size(j, "num_attention_heads", v.num_attention_heads, 1 << 10, where);
  v.num_channels = get_size(j, "num_channels", v.num_channels, 16, where);
  v.image_size = get_size(j, "image_size", v.image_size, 1 << 13, where);
  v.patch_size = get_size(j, "patch_size", v.patch_size, v.image_size, where);
  v.hidden_act = get(j, "hidden_act", v.hidden_act, where);
  v.layer_norm_eps = checked_real(get(j, "layer_norm_eps", v.layer_norm_eps, where), "layer_norm_eps", true, where);
  check_activation(v.hidden_act, where);
  if (v.hidden_size % v.num_attention_heads != 0) fail(where, "hidden_size is not a multiple of num_attention_heads");
  if (v.image_size % v.patch_size != 0) fail(where, "image_size is not a multiple of patch_size");
  return v;
}

// Old configs: rope_theta + rope_scaling {type|rope_type, factor}; transformers 5: rope_parameters.
void parse_rope(const json& j, TextConfig& t, const std::string& where) {
  t.rope_theta = get(j, "rope_theta", t.rope_theta, where);
  const json* rope = nullptr;
  if (j.contains("rope_parameters") && !j["rope_parameters"].is_null()) rope = &j["rope_parameters"];
  else if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) rope = &j["rope_scaling"];
  if (!rope) return;
  if (!rope->is_object()) fail(where, "rope_parameters/rope_scaling must be an object");
  t.rope_theta = get(*rope, "rope_theta", t.rope_theta, where);
  std::string type = get<std::string>(*rope, "rope_type", get<std::string>(*rope, "type", "default", where), where);
  if (type == "linear") {
    t.rope_factor = checked_real(get(*rope, "factor", 1.0, where), "rope factor", false, where);
  } else if (type != "default") {
    fail(where, "rope scaling type '" + type + "' is not supported (only default and linear)");
  }
  t.rope_type = type;
}

TextConfig parse_text(const json& j, const std::string& where, bool allow_llava_type) {
  if (!j.is_object()) fail(where, "expected an object");
  TextConfig t;
  std::string type = get<std::string>(j, "model_type", "llama", where);
  bool ok = type == "llama" || (allow_llava_type && (type == "llava" || type == "llava_llama"));
  if (!ok) fail(where, "text model_type '" + type + "' is not supported (only llama)");
  t.vocab_size = get_size(j, "vocab_size", t.vocab_size, 1 << 22, where);
  t.hidden_size = get_size(j, "hidden_size", t.hidden_size, 1 << 16, where);
  t.intermediate_size = get_size(j, "intermediate_size", t.intermediate_size, 1 << 18, where);
  t.num_hidden_layers = get_size(j, "num_hidden_layers", t.num_hidden_layers, 1 << 10, where);
  t.num_attention_heads = get_size(j, "num_attention_heads", t.num_attention_heads, 1 << 10, where);
  t.num_key_value_heads = get_size(j, "num_key_value_heads", t.num_attention_heads, t.num_attention_heads, where);
  t.head_dim = get_size(j, "head_dim", t.hidden_size / t.num_attention_heads, 1 << 12, where);
  t.hidden_act = get(j, "hidden_act", t.hidden_act, where);
  t.max_position_embeddings = get_size(j, "max_position_embeddings", t.max_position_embeddings, 1 << 24, where);
  t.rms_norm_eps = get(j, "rms_norm_eps", t.rms_norm_eps, where);
  t.attention_bias = get(j, "attention_bias", t.attention_bias, where);
  t.mlp_bias = get(j, "mlp_bias", t.mlp_bias, where);
  t.tie_word_embeddings = get(j, "tie_word_embeddings", t.tie_word_embeddings, where);
  t.pad_token_id = get_optional_int(j, "pad_token_id", t.pad_token_id, where);
  t.bos_token_id = get_optional_int(j, "bos_token_id", t.bos_token_id, where);
  if (j.contains("eos_token_id")) {
    const json& eos = j["eos_token_id"];
    if (eos.is_null()) t.eos_token_ids.clear();
    else if (eos.is_array()) {
      t.eos_token_ids.clear();
      for (const json& id : eos) t.eos_token_ids.push_back(io::json_integer(id, where + ": eos_token_id"));
    }
    else t.eos_token_ids = {get<int64_t>(j, "eos_token_id", 2, where)};
  }
  if (get<int64_t>(j, "pretraining_tp", 1, where) != 1) fail(where, "pretraining_tp != 1 is not supported");
  parse_rope(j, t, where);
  checked_real(t.rope_theta, "rope_theta", false, where);
  checked_real(t.rms_norm_eps, "rms_norm_eps", true, where);
  check_activation(t.hidden_act, where);
  if (t.num_attention_heads % t.num_key_value_heads != 0)
    fail(where, "num_attention_heads is not a multiple of num_key_value_heads");
  return t;
}

// LlavaConfig's vision_config default: CLIP ViT-L/14-336 (sub_configs_defaults of configuration_llava.py).
VisionConfig llava_default_vision() {
  VisionConfig v;
  v.hidden_size = 1024;
  v.intermediate_size = 4096;
  v.num_hidden_layers = 24;
  v.num_attention_heads = 16;
  v.image_size = 336;
  v.patch_size = 14;
  return v;
}

std::vector<int64_t> parse_feature_layers(const json& j, const std::string& key, const std::string& where) {
  if (!j.contains(key) || j[key].is_null()) return {-2};
  if (j[key].is_array()) {
    std::vector<int64_t> layers;  // checked one by one: a float element would be cast unchecked
    for (const json& layer : j[key]) layers.push_back(io::json_integer(layer, where + ": " + key, -(1 << 10), 1 << 10));
    if (layers.empty()) fail(where, "'" + key + "' is an empty list");
    return layers;
  }
  return {get<int64_t>(j, key, -2, where)};
}

void check_feature_layers(const LlavaConfig& c, const std::string& where) {
  int64_t n = c.vision.num_hidden_layers + 1;  // hidden_states: embeddings + one per layer
  for (int64_t layer : c.vision_feature_layers)
    if (layer < -n || layer >= n)
      fail(where, "vision feature layer " + std::to_string(layer) + " is out of range for " +
                      std::to_string(c.vision.num_hidden_layers) + " CLIP layers");
}

LlavaConfig parse_hf(const json& j, const std::string& path) {
  LlavaConfig c;
  c.dialect = ConfigDialect::kHfLlava;
  c.text = j.contains("text_config") && !j["text_config"].is_null()
               ? parse_text(j["text_config"], path + ": text_config", false)
               : TextConfig{};
  c.vision = j.contains("vision_config") && !j["vision_config"].is_null()
                 ? parse_vision(j["vision_config"], VisionConfig{}, path + ": vision_config")
                 : llava_default_vision();
  c.image_token_index = get<int64_t>(j, "image_token_index", get<int64_t>(j, "image_token_id", 32000, path), path);
  c.vision_feature_layers = parse_feature_layers(j, "vision_feature_layer", path);
  c.vision_feature_select_strategy = get<std::string>(j, "vision_feature_select_strategy", "default", path);
  c.projector_hidden_act = get<std::string>(j, "projector_hidden_act", "gelu", path);
  c.multimodal_projector_bias = get(j, "multimodal_projector_bias", true, path);
  // LlavaConfig: tied if the top level or the text config says so.
  c.tie_word_embeddings = get(j, "tie_word_embeddings", false, path) || c.text.tie_word_embeddings;
  return c;
}

// mm_vision_select_feature "patch" == HF "default" (drop CLS), "cls_patch" == "full".
std::string select_strategy_from_original(const std::string& feature, const std::string& where) {
  if (feature == "patch") return "default";
  if (feature == "cls_patch") return "full";
  fail(where, "mm_vision_select_feature '" + feature + "' is not supported (patch or cls_patch)");
}

VisionConfig vision_from_clip_dir(const std::string& clip_dir) {
  std::string path = (fs::path(clip_dir) / "config.json").string();
  json j = read_json(path);
  std::string type = get<std::string>(j, "model_type", "", path);
  if (type == "clip") {
    json vision = j.contains("vision_config") && !j["vision_config"].is_null() ? j["vision_config"] : json::object();
    if (!vision.contains("model_type")) vision["model_type"] = "clip_vision_model";
    return parse_vision(vision, VisionConfig{}, path + ": vision_config");
  }
  if (type == "clip_vision_model") return parse_vision(j, VisionConfig{}, path);
  fail(path, "model_type '" + type + "' is not a CLIP config (clip or clip_vision_model)");
}

LlavaConfig parse_original(const json& j, const std::string& path, const std::string& model_dir,
                           const std::string& vision_tower_dir) {
  LlavaConfig c;
  c.dialect = ConfigDialect::kOriginalLlava;
  c.text = parse_text(j, path, /*allow_llava_type=*/true);
  c.tie_word_embeddings = c.text.tie_word_embeddings;
  c.image_token_index = -200;  // LLaVA's IMAGE_TOKEN_INDEX: never embedded, only replaced by features
  std::string projector = get<std::string>(j, "mm_projector_type", "linear", path);
  if (projector != "mlp2x_gelu")
    fail(path, "mm_projector_type '" + projector + "' is not supported (only mlp2x_gelu)");
  c.projector_hidden_act = "gelu";  // nn.GELU(): exact erf
  c.multimodal_projector_bias = true;
  c.vision_feature_layers = parse_feature_layers(j, "mm_vision_select_layer", path);
  c.vision_feature_select_strategy =
      select_strategy_from_original(get<std::string>(j, "mm_vision_select_feature", "patch", path), path);
  c.mm_vision_tower = get<std::string>(j, "mm_vision_tower", get<std::string>(j, "vision_tower", "", path), path);
  if (c.mm_vision_tower.empty()) fail(path, "mm_vision_tower is missing");
  c.image_aspect_ratio = get<std::string>(j, "image_aspect_ratio", "square", path);
  if (c.image_aspect_ratio != "pad" && c.image_aspect_ratio != "square")
    fail(path, "image_aspect_ratio '" + c.image_aspect_ratio + "' is not supported (pad or square)");
  std::string merge = get<std::string>(j, "mm_patch_merge_type", "flat", path);
  if (merge != "flat") fail(path, "mm_patch_merge_type '" + merge + "' is not supported (only flat)");
  c.mm_use_im_start_end = get(j, "mm_use_im_start_end", false, path);
  c.vision = vision_from_clip_dir(resolve_vision_tower_dir(model_dir, c, vision_tower_dir));
  int64_t mm_hidden = get<int64_t>(j, "mm_hidden_size", c.vision.hidden_size, path);
  if (mm_hidden != c.vision.hidden_size)
    fail(path, "mm_hidden_size " + std::to_string(mm_hidden) + " does not match the CLIP hidden_size " +
                   std::to_string(c.vision.hidden_size));
  return c;
}

bool is_original_llava(const json& j) {
  return j.contains("mm_vision_tower") || j.contains("mm_projector_type") || j.contains("mm_hidden_size");
}

}  // namespace

std::string resolve_vision_tower_dir(const std::string& model_dir, const LlavaConfig& config,
                                     const std::string& vision_tower_dir) {
  if (!vision_tower_dir.empty()) {
    if (!fs::is_directory(vision_tower_dir)) fail(vision_tower_dir, "vision tower directory does not exist");
    return vision_tower_dir;
  }
  fs::path tower(config.mm_vision_tower);
  if (tower.is_absolute() && fs::is_directory(tower)) return tower.string();
  fs::path relative = fs::path(model_dir) / tower;
  if (!tower.is_absolute() && fs::is_directory(relative)) return relative.string();
  fail((fs::path(model_dir) / "config.json").string(),
       "mm_vision_tower '" + config.mm_vision_tower +
           "' is not a local directory (absolute or relative to the model dir); download the CLIP model "
           "and point mm_vision_tower at it");
}

std::string config_json_path(const std::string& dir) {
  return (fs::is_directory(dir) ? fs::path(dir) / "config.json" : fs::path(dir)).string();
}

int64_t load_text_vocab_size(const std::string& dir) {
  const std::string path = config_json_path(dir);
  if (!fs::exists(path)) fail(path, "config.json not found");
  const json j = read_json(path);
  if (!j.is_object()) fail(path, "expected a JSON object");
  if (is_original_llava(j)) return get_size(j, "vocab_size", TextConfig{}.vocab_size, 1 << 22, path);
  if (!j.contains("text_config") || j["text_config"].is_null()) return TextConfig{}.vocab_size;
  if (!j["text_config"].is_object()) fail(path + ": text_config", "expected an object");
  return get_size(j["text_config"], "vocab_size", TextConfig{}.vocab_size, 1 << 22, path + ": text_config");
}

LlavaConfig load_config(const std::string& dir, const std::string& vision_tower_dir) {
  fs::path path = config_json_path(dir);
  std::string model_dir = fs::is_directory(dir) ? dir : path.parent_path().string();
  if (!fs::exists(path)) fail(path.string(), "config.json not found");
  json j = read_json(path.string());
  if (!j.is_object()) fail(path.string(), "expected a JSON object");
  std::string type = get<std::string>(j, "model_type", "", path.string());
  LlavaConfig c;
  if (is_original_llava(j)) {
    c = parse_original(j, path.string(), model_dir, vision_tower_dir);
  } else if (type == "llava") {
    c = parse_hf(j, path.string());
  } else {
    fail(path.string(), "model_type '" + type + "' is not supported (llava, or an original LLaVA config)");
  }
  if (c.vision_feature_select_strategy != "default" && c.vision_feature_select_strategy != "full")
    fail(path.string(), "vision_feature_select_strategy '" + c.vision_feature_select_strategy +
                            "' is not supported (default or full)");
  check_activation(c.projector_hidden_act, path.string() + ": projector_hidden_act");
  check_feature_layers(c, path.string());
  return c;
}

}  // namespace llava::model
