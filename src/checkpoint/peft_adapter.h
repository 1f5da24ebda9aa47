// PEFT LoRA adapters as `PeftModel.save_pretrained` writes them:
//   adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "use_rslora", "target_modules", ...}
//   adapter_model.safetensors  base_model.model.<module path>.lora_A.weight [r,in] / .lora_B.weight [out,r]
//   (or adapter_model.bin, a torch.save of the same dict)
// <module path> is the module's name in the model PEFT wrapped, which need not be the naming of the base
// checkpoint's files: transformers 5 saves a llava-hf model with the classic keys (language_model.model.*)
// while PEFT names its adapter after the model as loaded (model.language_model.*). PEFT reads either, and
// so does this reader: the caller passes every name a module can have (see AdapterModuleNames).
#pragma once
#include <map>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace llava::checkpoint {

struct LoraWeights {
  torch::Tensor A;  // [r, in]
  torch::Tensor B;  // [out, r]
  std::string key;  // the file's name for lora_A (read only; for error messages)
};

struct PeftLoraAdapter {
  int64_t r = 0;
  double lora_alpha = 0;
  bool use_rslora = false;
  // Read: by the caller's module name (the values of AdapterModuleNames). Write: by the module path to
  // write (in the base checkpoint's layout), without "base_model.model.".
  std::map<std::string, LoraWeights> modules;
  std::string tensor_file;  // read: adapter_model.safetensors or adapter_model.bin
};

// Every module path an adapter file may use (without "base_model.model.") -> the caller's name for that
// module. The one place that builds it for our model is checkpoint::adapter_module_names (pretrained_parts.h) (every Linear under
// each base-checkpoint naming PEFT reads: llava-hf classic, transformers >= 4.52, original LLaVA).
using AdapterModuleNames = std::map<std::string, std::string>;

// The one reader of PEFT LoRA adapters (training init, resume, eval-logits / infer / merge). Tensor keys:
// base_model.model.<path>.lora_{A,B}[.default].weight (".default": PEFT's adapter name, as a raw
// state_dict() names it; save_pretrained drops it), <path> any key of `module_names`.
// Error names the file and the fault: missing files, another peft_type, DoRA / rank or alpha patterns /
// modules_to_save (not supported yet), a key that is no LoRA A/B tensor or whose path maps to no module
// (naming the key), two keys for one module, a lone lora_A / lora_B, shapes that disagree with r.
PeftLoraAdapter read_peft_lora_adapter(const std::string& dir, const AdapterModuleNames& module_names);

// Writes adapter_config.json (the LoRA keys PEFT has written since 0.9, sorted like PEFT's json dump,
// task_type CAUSAL_LM as LLaVA saves it) and adapter_model.safetensors, each atomically. `modules` keys
// are the module paths to write (in the base checkpoint's layout). target_modules: a list of module-name
// suffixes or a regex string, as PEFT's LoraConfig takes it.
void write_peft_lora_adapter(const std::string& dir, const PeftLoraAdapter& adapter, double lora_dropout,
                             const nlohmann::json& target_modules, const std::string& base_model_name_or_path);

}  // namespace llava::checkpoint
