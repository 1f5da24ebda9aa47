// LoRA as PEFT defines it (peft/tuners/lora): for each targeted Linear,
//   y = W x (+ b) + B(A(dropout(x))) * scaling,  scaling = alpha / r  (alpha / sqrt(r) with rsLoRA),
// A [r, in] kaiming-uniform(a=sqrt(5)), B [out, r] zero, so training starts from the base model.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "checkpoint/pretrained_parts.h"
#include "model/linear.h"
#include "model/llava.h"

namespace re2 {
class RE2;
}

namespace llava::train {

// PEFT's target_modules: a list of module-name suffixes, "all-linear", or a regex that must match the
// whole module path (PEFT's re.fullmatch; matched with RE2, in time linear in the path's length).
struct TargetModules {
  enum class Kind { Suffixes, AllLinear, Regex } kind = Kind::Suffixes;
  std::vector<std::string> suffixes;
  std::string regex;

  bool matches(const std::string& module_path) const;

 private:
  mutable std::shared_ptr<const re2::RE2> compiled_;  // `regex` (set before the first match), compiled once
};

// LLaVA's default LoRA targets (find_all_linear_names): every Linear of the language model, lm_head aside.
inline constexpr const char* kLlavaDefaultLoraRegex = R"(model\.language_model\..*)";

struct LoraConfig {
  int64_t r = 8;
  double alpha = 8;
  double dropout = 0.0;
  bool use_rslora = false;
  TargetModules target_modules;
  double scaling() const;
};

class LoraAdapter : public model::LinearAdapter {
 public:
  LoraAdapter(int64_t in_features, int64_t out_features, const LoraConfig& config, const torch::TensorOptions& options);
  torch::Tensor forward(const torch::Tensor& x) override;  // [..., in] -> [..., out]
  bool draws_random_numbers() const override { return dropout > 0; }

  torch::Tensor delta_weight() const;  // B A * scaling, [out, in], computed in fp32

  torch::Tensor lora_A;  // [r, in]
  torch::Tensor lora_B;  // [out, r]
  double scaling;
  double dropout;
  bool merged = false;   // while merged the Linear does not call the adapter
};

struct LoraModule {
  std::string path;  // module path in our canonical (HF >= 4.52) naming, e.g. model.language_model.layers.0.self_attn.q_proj
  model::Linear linear;
  std::shared_ptr<LoraAdapter> adapter;
};

// Attaches an adapter to every Linear of `root` whose path matches (the output layer lm_head is never a
// target of "all-linear", as in PEFT). Error naming the targets and some Linear paths if nothing matches.
std::vector<LoraModule> attach_lora(torch::nn::Module& root, const LoraConfig& config);

// Attaches the LoRA weights of a PEFT adapter dir (any naming PEFT reads; cast to the model dtype) to the
// matching Linear modules. Error if a module of the adapter is no Linear of this model, or its shapes do not fit.
std::vector<LoraModule> load_lora_adapter(model::LlavaForConditionalGeneration& model, const std::string& dir);

// What a checkpoint's adapter_config.json records of `config`.
checkpoint::PeftLoraSettings peft_lora_settings(const LoraConfig& config);
// The weights of `modules` (the live tensors, detached), as the adapter writer takes them.
std::vector<checkpoint::LoraModuleWeights> lora_weights(const std::vector<LoraModule>& modules);

// Folds B A * scaling into the base weight (and back out).
void merge(LoraModule& m);
void unmerge(LoraModule& m);

}  // namespace llava::train
