// DeepSpeed ZeRO 1/2 checkpoints as HF Trainer + DeepSpeed writes them inside checkpoint-N/:
//   latest                                   the tag, "global_stepN"
//   global_stepN/mp_rank_00_model_states.pt  module (the trainable tensors, by the wrapped model's names,
//                                            e.g. PEFT's base_model.model....lora_A.default.weight),
//                                            param_shapes (per optimizer group, in flattening order), ...
//   global_stepN/[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt, one per rank R: optimizer_state_dict
//     with single_partition_of_fp32_groups (rank R's slice of each group's flat fp32 buffer),
//     base_optimizer_state (torch AdamW's state of those flat slices: step, exp_avg, exp_avg_sq),
//     group_paddings, partition_count, param_slice_mappings {name: fragment_address(numel, start)}.
// Each group's parameters are flattened end to end in param_shapes order, padded at the end and cut into
// partition_count equal partitions, so one tensor may straddle ranks. The reader puts every parameter
// back whole (fp32 master weight and Adam moments), whatever world size reads it; it knows no model.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/ivalue.h>
#include <torch/torch.h>

namespace llava::checkpoint {

struct DeepSpeedGroup {
  double lr = 0, initial_lr = 0, weight_decay = 0;  // lr: already the next step's (LambdaLR stepped)
  int64_t step = 0;                                 // AdamW updates so far (0: never stepped)
};

struct DeepSpeedParam {
  std::string name;  // as param_shapes names it
  size_t group = 0;  // index into DeepSpeedCheckpoint::groups
  torch::Tensor master, exp_avg, exp_avg_sq;  // fp32, the parameter's shape
};

struct DeepSpeedCheckpoint {
  std::string tag_dir;     // checkpoint-N/global_stepN
  std::string model_file;  // its mp_rank_00_model_states.pt
  int64_t world_size = 0;  // partition_count
  std::vector<DeepSpeedGroup> groups;
  std::vector<DeepSpeedParam> params;  // group by group, each in flattening order
};

// `dir` has a `latest` file (DeepSpeed's tag) next to the folder it names.
bool is_deepspeed_checkpoint(const std::string& dir);

// Rank `rank`'s [bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt in the folder `latest` names (the plain
// name when there is neither), for messages.
std::string deepspeed_optim_file(const std::string& dir, int64_t rank);

// Reads and checks every file; any fault (a missing or truncated rank file, partitions that do not add up
// to param_shapes, slice mappings that place a tensor elsewhere, another pickle global) is a llava::Error
// naming the file.
DeepSpeedCheckpoint read_deepspeed_checkpoint(const std::string& dir);

// What HF Trainer + DeepSpeed (ZeRO 1/2, fp32, torch AdamW) would have saved after `global_step` steps on
// `world_size` ranks, so that Trainer.train(resume_from_checkpoint=...) under DeepSpeed with that many ranks
// continues the run: `latest`, global_stepN/mp_rank_00_model_states.pt (module: see below) and one
// zero_pp_rank_R_mp_rank_00_optim_states.pt per rank, each group flattened in order, padded to a multiple of
// 2 x world_size as DeepSpeed pads it and cut into equal partitions. No loss_scaler (DeepSpeed keeps its
// own), no param_slice_mappings (only universal checkpoints use them).
struct DeepSpeedSave {
  int64_t global_step = 0, global_samples = 0, world_size = 1, zero_stage = 2;
  int64_t micro_batch = 1, accumulation = 1;
  bool bf16 = false;  // the optim files are then bf16_zero_pp_rank_R_..., masters still fp32
  double gradient_clipping = 1.0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  std::vector<DeepSpeedGroup> groups;
  std::vector<DeepSpeedParam> params;  // names as the wrapped HF model names them, group by group
  c10::IValue lr_scheduler;            // LambdaLR.state_dict()
  // The model states' `module`. Empty: the trained tensors of `params` (a PEFT model, which HF Trainer has
  // DeepSpeed load non-strictly). Otherwise the whole model's state dict by the HF model's names, frozen
  // tensors too: HF Trainer has DeepSpeed load a non-PEFT model's `module` strictly.
  std::vector<std::pair<std::string, torch::Tensor>> module;
};
void write_deepspeed_checkpoint(const std::string& dir, const DeepSpeedSave& save);

}  // namespace llava::checkpoint
