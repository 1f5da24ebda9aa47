// Resuming a HF Trainer + DeepSpeed (ZeRO 1/2) checkpoint-N at any world size and ZeRO stage: the fp32
// master weights and Adam moments DeepSpeed keeps in flat per-rank partitions (checkpoint/
// deepspeed_checkpoint.h) become this run's trainable weights and per-parameter optimizer state (the
// trainer hands them to its optimizer, which lays them out again for this run's ranks). DeepSpeed's names (PEFT's base_model.model....lora_A.default
// .weight, or a non-PEFT model's own names, in any key layout PEFT and transformers use) are matched to this run's trainables by name.
#pragma once
#include <string>

#include "checkpoint/deepspeed_checkpoint.h"
#include "checkpoint/optimizer_state.h"

namespace llava::checkpoint {

// `whole`: this run's groups (names, the live parameters; no state). Fills its state and the groups' lr /
// initial_lr / weight_decay, copies the fp32 masters into the parameters and returns them by name (bf16 runs
// keep them apart). `model_param_names`: every parameter of the model, canonical names (DeepSpeed's names
// may be in any key layout). Every tensor this run trains must be in the checkpoint with its shape and every
// tensor the checkpoint trained must be trained here; a fault is a llava::Error naming the file, before
// anything changes.
NamedTensors restore_deepspeed_state(const std::string& checkpoint_dir, const std::vector<std::string>& model_param_names,
                                     AdamWState& whole);

// The DeepSpeed layout of this run's checkpoint (write_deepspeed_checkpoint) from the whole optimizer
// (lrs already the next step's). Names as the HF model HF Trainer wraps names them: a LoRA run's (`peft`)
// PEFT model (base_model.model.<name>, lora_A.default.weight; `module` the trained tensors), otherwise
// transformers 5's LlavaForConditionalGeneration (our names, the CLIP tower's without ".vision_model."),
// whose `module` is `model_state` (every parameter, frozen ones too, by our names: DeepSpeed loads it
// strictly). `masters`: bf16 runs' fp32 master weights by name; empty in fp32 runs, whose parameters are the
// masters. `run`: the run's settings (global_step, global_samples, world_size, zero_stage, micro_batch,
// accumulation, gradient_clipping, bf16, lr_scheduler); the optimizer's betas / eps, groups and params are
// filled in here.
DeepSpeedSave deepspeed_save_of(const AdamWState& whole, const NamedTensors& masters, const NamedTensors& model_state,
                                bool peft, DeepSpeedSave run);

}  // namespace llava::checkpoint
