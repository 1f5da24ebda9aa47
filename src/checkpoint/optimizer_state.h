// The optimizer's state as plain data, the form every checkpoint file format reads and writes
// (optimizer.pt, DeepSpeed's partitions, our ZeRO shards): torch AdamW's parameter groups with their
// hyperparameters, per-parameter Adam state, and one rank's state by parameter range. train::AdamW and
// train::ShardedAdamW keep their state in these types; nothing here knows how it is updated.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

namespace llava::checkpoint {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

struct ParamGroup {
  std::string name;                   // "decay", "no_decay", "projector_decay", ...
  std::vector<std::string> names;     // parameter names, in named_parameters() order
  std::vector<torch::Tensor> params;  // fp32 leaves the optimizer updates in place
  double base_lr = 0;                 // `initial_lr`: the schedule multiplies this
  double lr = 0;                      // current lr (base_lr * schedule factor)
  double weight_decay = 0;
};

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
};

// Per-parameter state, as torch keeps it: `step` counts this parameter's updates.
struct AdamState {
  torch::Tensor exp_avg, exp_avg_sq;
  int64_t step = 0;
  bool initialized() const { return exp_avg.defined(); }
};

// A whole AdamW: state[g][i] belongs to groups[g].params[i].
struct AdamWState {
  std::vector<ParamGroup> groups;
  AdamWOptions options;
  std::vector<std::vector<AdamState>> state;
};

// One parameter range of one rank's optimizer state, as ZeRO shard files store it (resume_state.h):
// param[param_offset : param_offset + length] (flattened).
struct RangeState {
  std::string name;
  int64_t param_offset = 0, length = 0, step = 0;  // step 0: never updated (no moments)
  torch::Tensor exp_avg, exp_avg_sq;                // [length] fp32
  torch::Tensor master;                             // [length] fp32, bf16 runs only
};

}  // namespace llava::checkpoint
