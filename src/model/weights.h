// Loading a LLaVA checkpoint dir into our model, whatever key layout it was saved in.
//
// Layouts (all from safetensors, single or sharded, or torch.save .bin files, single or sharded):
//   kHfClassic   llava-hf as published:  language_model.model.*, language_model.lm_head.*,
//                vision_tower[.vision_model].*, multi_modal_projector.*
//   kHfModern    transformers >= 4.52:   model.language_model.*, model.vision_tower[.vision_model].*,
//                model.multi_modal_projector.*, lm_head.*
//   kOriginal    haotian-liu/LLaVA:      model.embed_tokens / model.layers.* / model.norm, lm_head,
//                model.mm_projector.{0,2}.*, and the CLIP tower either under
//                model.vision_tower.vision_tower.vision_model.* or in its own dir (mm_vision_tower).
// ("[.vision_model]": transformers 5 writes the CLIP keys without that level.) Rotary inv_freq and
// position_ids buffers are skipped; so is a stored lm_head when the embeddings are tied.
#pragma once
#include <map>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "model/config.h"
#include "model/llava.h"

namespace llava::model {

enum class KeyLayout { kHfClassic, kHfModern, kOriginal };

std::string to_string(KeyLayout layout);

// Which layout a dir was loaded from: the checkpoint code writes adapters back in the same layout.
struct WeightLayout {
  KeyLayout layout = KeyLayout::kHfModern;
  bool vision_model_level = true;  // CLIP keys carry ".vision_model."
  std::string vision_tower_dir;    // original LLaVA with the tower in its own CLIP dir, else empty
};

// Our canonical (HF >= 4.52) parameter name -> the name in `layout`'s files. For a tower loaded from
// its own CLIP dir, vision names map to that dir's names (vision_model.*).
std::string checkpoint_name(const std::string& canonical, const WeightLayout& layout);

// Every name the `canonical` parameters can have in the files of any layout load_weights reads (classic,
// modern, original; CLIP keys with and without ".vision_model."; with `own_tower_dir`, also the names in
// a separate CLIP dir) -> the canonical name. Trained parts made by other tools use any of these.
std::map<std::string, std::string> names_in_any_layout(const std::vector<std::string>& canonical_names,
                                                       bool own_tower_dir = true);

// Fills every parameter of `model` from `dir` (converting to the parameters' dtype). One Error lists
// missing keys, unexpected keys and shape mismatches (a few of each, with counts).
WeightLayout load_weights(LlavaForConditionalGeneration& model, const std::string& dir,
                          const std::string& vision_tower_dir = "");

struct LoadedModel {
  LlavaConfig config;
  LlavaForConditionalGeneration model{nullptr};
  WeightLayout layout;
};

// config.json + weights; the model is in eval mode with parameters of `dtype` on `device`. The parameters
// are made on the device and each is copied there from its (memory-mapped) file tensor, so host memory
// holds no second copy of the model.
LoadedModel load_model(const std::string& dir, c10::ScalarType dtype, const std::string& vision_tower_dir = "",
                       const torch::Device& device = torch::kCPU);

// "fp32"/"float32" -> kFloat32, "bf16"/"bfloat16" -> kBFloat16; Error otherwise.
c10::ScalarType parse_dtype(const std::string& name);

}  // namespace llava::model
