// PEFT LoRA adapters as `PeftModel.save_pretrained` writes them:
//   adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "use_rslora", "target_modules", ...}
//   adapter_model.safetensors  base_model.model.<module path>.lora_A.weight [r,in] / .lora_B.weight [out,r]
//   (or adapter_model.bin, a torch.save of the same dict)
#pragma once
#include <map>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace llava::checkpoint {

struct LoraWeights {
  torch::Tensor A;  // [r, in]
  torch::Tensor B;  // [out, r]
};

struct PeftLoraAdapter {
  int64_t r = 0;
  double lora_alpha = 0;
  bool use_rslora = false;
  std::map<std::string, LoraWeights> modules;  // by module path as written, without "base_model.model."
};

// Error names the file and the fault: missing files, another peft_type, DoRA / rank or alpha patterns /
// modules_to_save (not supported yet), keys that are not LoRA A/B pairs, shapes that disagree with r.
PeftLoraAdapter read_peft_lora_adapter(const std::string& dir);

// Writes adapter_config.json (the LoRA keys PEFT has written since 0.9, sorted like PEFT's json dump,
// task_type CAUSAL_LM as LLaVA saves it) and adapter_model.safetensors, each atomically. `modules` keys
// are the module paths to write (in the base checkpoint's layout). target_modules: a list of module-name
// suffixes or a regex string, as PEFT's LoraConfig takes it.
void write_peft_lora_adapter(const std::string& dir, const PeftLoraAdapter& adapter, double lora_dropout,
                             const nlohmann::json& target_modules, const std::string& base_model_name_or_path);

}  // namespace llava::checkpoint
