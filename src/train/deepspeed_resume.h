// Resuming a HF Trainer + DeepSpeed (ZeRO 1/2) checkpoint-N at any world size and ZeRO stage: the fp32
// master weights and Adam moments DeepSpeed keeps in flat per-rank partitions (checkpoint/
// deepspeed_checkpoint.h) become this run's trainable weights and per-parameter optimizer state, laid out
// again for this run's ranks by ShardedAdamW. DeepSpeed's names (PEFT's base_model.model....lora_A.default
// .weight, in any key layout PEFT and transformers use) are matched to this run's trainables by name.
#pragma once
#include <string>

#include "checkpoint/deepspeed_checkpoint.h"
#include "model/llava.h"
#include "train/config.h"
#include "train/sharded_adamw.h"

namespace llava::train {

// Every tensor this run trains must be in the checkpoint with its shape and every tensor the checkpoint
// trained must be trained here; a fault is a llava::Error naming the file, before anything changes.
void restore_deepspeed_state(const std::string& checkpoint_dir, model::LlavaForConditionalGeneration& model,
                             ShardedAdamW& optimizer);

// The DeepSpeed layout of this run's checkpoint (write_deepspeed_checkpoint) from the whole optimizer
// (ShardedAdamW::consolidated(), lrs already the next step's). Names as the HF model HF Trainer wraps
// names them: a LoRA run's PEFT model (base_model.model.<name>, lora_A.default.weight; `module` the trained
// tensors), otherwise transformers 5's LlavaForConditionalGeneration (our names, the CLIP tower's without
// ".vision_model."), whose `module` is `model_state` (every parameter, frozen ones too, by our names:
// DeepSpeed loads it strictly). `masters`: bf16 runs' fp32 master weights by name
// (ShardedAdamW::master_weights()); empty in fp32 runs, whose parameters are the masters.
using NamedTensorList = std::vector<std::pair<std::string, torch::Tensor>>;
checkpoint::DeepSpeedSave deepspeed_save_of(const AdamW& whole, const NamedTensorList& masters,
                                            const NamedTensorList& model_state, const TrainConfig& cfg,
                                            int64_t global_step, int64_t samples_per_step, int world_size,
                                            const c10::IValue& lr_scheduler);

}  // namespace llava::train
