// The model's hyper-parameters, read from a checkpoint dir's config.json.
//
// Two dialects: HF's LlavaConfig (model_type "llava" with text_config / vision_config; both sub-configs are
// sparse and every missing key takes the HF class default, exactly like transformers does), and the
// original LLaVA repo's config (a LlamaConfig plus mm_* keys; the CLIP config then comes from the
// mm_vision_tower directory).
#pragma once
#include <optional>
#include <string>
#include <vector>

namespace llava::model {

struct VisionConfig {  // CLIPVisionConfig defaults
  int64_t hidden_size = 768;
  int64_t intermediate_size = 3072;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 12;
  int64_t num_channels = 3;
  int64_t image_size = 224;
  int64_t patch_size = 32;
  std::string hidden_act = "quick_gelu";
  double layer_norm_eps = 1e-5;

  int64_t num_patches() const { return (image_size / patch_size) * (image_size / patch_size); }
};

struct TextConfig {  // LlamaConfig defaults
  int64_t vocab_size = 32000;
  int64_t hidden_size = 4096;
  int64_t intermediate_size = 11008;
  int64_t num_hidden_layers = 32;
  int64_t num_attention_heads = 32;
  int64_t num_key_value_heads = 32;  // null -> num_attention_heads
  int64_t head_dim = 128;            // null -> hidden_size / num_attention_heads
  std::string hidden_act = "silu";
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  std::string rope_type = "default";  // "default" or "linear"
  double rope_factor = 1.0;           // linear scaling divides inv_freq by this
  bool attention_bias = false;
  bool mlp_bias = false;
  bool tie_word_embeddings = false;
  std::optional<int64_t> pad_token_id;
  std::optional<int64_t> bos_token_id = 1;
  std::vector<int64_t> eos_token_ids = {2};
};

enum class ConfigDialect { kHfLlava, kOriginalLlava };

struct LlavaConfig {
  ConfigDialect dialect = ConfigDialect::kHfLlava;
  VisionConfig vision;
  TextConfig text;
  int64_t image_token_index = 32000;            // original LLaVA: -200 (IMAGE_TOKEN_INDEX)
  std::vector<int64_t> vision_feature_layers = {-2};  // one entry unless the config holds a list
  std::string vision_feature_select_strategy = "default";  // "default" drops CLS, "full" keeps it
  std::string projector_hidden_act = "gelu";
  bool multimodal_projector_bias = true;
  bool tie_word_embeddings = false;

  // Original LLaVA only (empty / defaults otherwise).
  std::string mm_vision_tower;            // CLIP dir (as written in the config)
  std::string image_aspect_ratio = "square";  // "pad" or "square": for the image pipeline
  bool mm_use_im_start_end = false;

  // Rows each image contributes to the sequence: (image/patch)^2 (+1 with the "full" strategy).
  int64_t image_seq_length() const {
    return vision.num_patches() + (vision_feature_select_strategy == "full" ? 1 : 0);
  }
  int64_t projector_in_features() const {
    return vision.hidden_size * static_cast<int64_t>(vision_feature_layers.size());
  }
};

// Reads `<dir>/config.json` (or a config.json path). For the original LLaVA dialect the vision config is
// read from the CLIP dir: `vision_tower_dir` when given, else mm_vision_tower as an absolute path or
// relative to `dir`. Error names the file and key for anything unsupported or malformed.
LlavaConfig load_config(const std::string& dir, const std::string& vision_tower_dir = "");

// `<dir>/config.json`, or `dir` itself when it names a file (as load_config reads it).
std::string config_json_path(const std::string& dir);

// The text model's vocab_size from config.json alone (text_config.vocab_size, or vocab_size of an original
// LLaVA config; 32000 when absent, as load_config), for tools that do not load the rest of the model.
int64_t load_text_vocab_size(const std::string& dir);

// The CLIP dir the original-LLaVA config points at (resolved as above); Error if it does not exist.
std::string resolve_vision_tower_dir(const std::string& model_dir, const LlavaConfig& config,
                                     const std::string& vision_tower_dir = "");

}  // namespace llava::model
