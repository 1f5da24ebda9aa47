// Trained parts from other tools, applied to a loaded model for inference or as a starting point:
// a PEFT LoRA adapter dir, and LLaVA's projector files (stage 1's mm_projector.bin, stage 2's
// non_lora_trainables.bin). Both may name modules in any key layout our model loader reads. The one piece of
// src/checkpoint that knows the model: names in files map to its modules through model::names_in_any_layout,
// and projector files are copied into its projector.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "checkpoint/peft_adapter.h"
#include "model/llava.h"
#include "model/weights.h"

namespace llava::checkpoint {

// Every Linear of the model by our (canonical) module path.
std::map<std::string, std::shared_ptr<model::LinearImpl>> linear_modules(model::LlavaForConditionalGeneration& model);

// Every name a PEFT adapter file may give a Linear of `model` (llava-hf classic, transformers >= 4.52 and
// original-LLaVA module paths; CLIP with or without ".vision_model.") -> its module path in our model.
AdapterModuleNames adapter_module_names(model::LlavaForConditionalGeneration& model);

// The PEFT adapter of `dir`, its modules keyed by our module paths, whatever naming PEFT wrote (the one
// reader for --init-lora-from, resume, eval-logits / infer / merge). Error naming the file and key for a
// key that maps to no Linear of `model`.
PeftLoraAdapter read_lora_adapter(model::LlavaForConditionalGeneration& model, const std::string& dir);

// What adapter_config.json records of a LoRA run (PEFT's LoraConfig): r, lora_alpha, lora_dropout, use_rslora
// and how the targets were chosen (train::LoraConfig's TargetModules, as plain data).
struct PeftLoraSettings {
  int64_t r = 8;
  double alpha = 8, dropout = 0;
  bool use_rslora = false;
  // kLlavaLanguageModel: LLaVA's default, every Linear of the language model (train::kLlavaDefaultLoraRegex).
  enum class Targets { kSuffixes, kAllLinear, kRegex, kLlavaLanguageModel } targets = Targets::kSuffixes;
  std::vector<std::string> suffixes;  // kSuffixes; empty (adapters loaded from files): those of the modules written
  std::string regex;                  // kRegex, matched against our module paths
};

// One module's LoRA weights (copies or the live tensors) by its canonical module path.
struct LoraModuleWeights {
  std::string path;  // module path, canonical naming
  torch::Tensor A, B;
};

// Writes `modules` as a PEFT adapter dir whose module paths follow `layout` (the base checkpoint's key
// layout, so PEFT and LLaVA tools find them under the names they loaded the base with).
void save_lora_adapter(const std::string& dir, const std::vector<LoraModuleWeights>& modules,
                       const PeftLoraSettings& settings, const model::WeightLayout& layout,
                       const std::string& base_model_name_or_path);

// Copies the projector weights of a .bin/.safetensors file into the model. Keys may be LLaVA's
// (model.mm_projector.0/2.*, with or without PEFT's base_model.model. prefix), llava-hf's or ours;
// other keys (e.g. LoRA weights in non_lora_trainables.bin) are ignored. Error if a projector weight
// is missing or has the wrong shape.
void load_projector_weights(model::LlavaForConditionalGeneration& model, const std::string& path);

// Writes the projector as LLaVA does: stage 1's mm_projector.bin (keys as the base model names them, e.g.
// model.mm_projector.0.weight for original LLaVA) or, with `peft_prefix`, stage 2's
// non_lora_trainables.bin (the same keys under base_model.model.). A torch.save file.
void save_projector_weights(const std::string& path, model::LlavaForConditionalGeneration& model,
                            const model::WeightLayout& layout, bool peft_prefix);
// The same from (canonical name, tensor) pairs: model.multi_modal_projector.* (a staged copy).
void save_projector_weights(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& projector,
                            const model::WeightLayout& layout, bool peft_prefix);

// Writes every parameter of `model` as `dir/model.safetensors` (or shards + index past max_shard_bytes)
// in `layout`'s key names; a CLIP tower that came from its own dir is written inside. Returns the files.
std::vector<std::string> save_full_model(const std::string& dir, model::LlavaForConditionalGeneration& model,
                                         model::WeightLayout layout, uint64_t max_shard_bytes);
// The same from every parameter as (canonical name, tensor) pairs, in named_parameters() order.
std::vector<std::string> save_full_model(const std::string& dir, const std::vector<std::pair<std::string, torch::Tensor>>& params,
                                         model::WeightLayout layout, uint64_t max_shard_bytes);

}  // namespace llava::checkpoint
