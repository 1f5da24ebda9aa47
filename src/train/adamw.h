// AdamW with torch.optim.AdamW's numerics, over named
// parameter groups like HF Trainer builds them (decay / no-decay, plus LLaVA's projector-lr groups).
// libtorch >= 2.4: torch's fused kernel (AdamW(fused=True)); older: the single-tensor path torch takes on
// CPU by default. The two agree to float rounding (~1e-7 relative), not bitwise.
#pragma once
#include <string>
#include <vector>

#include <torch/torch.h>

#include "checkpoint/optimizer_state.h"

namespace llava::train {

// The optimizer's plain data (checkpoint/optimizer_state.h): what checkpoint files read and write.
using ParamGroup = checkpoint::ParamGroup;
using AdamWOptions = checkpoint::AdamWOptions;
using AdamState = checkpoint::AdamState;

class AdamW {
 public:
  AdamW(std::vector<ParamGroup> groups, AdamWOptions options);

  // One update of every parameter that has a gradient; parameters without one keep their state.
  void step();
  void zero_grad();
  void set_lr_factor(double factor);  // lr = base_lr * factor for every group

  std::vector<ParamGroup>& groups() { return data_.groups; }
  const std::vector<ParamGroup>& groups() const { return data_.groups; }
  const AdamWOptions& options() const { return data_.options; }
  // state()[g][i] belongs to groups()[g].params[i].
  std::vector<std::vector<AdamState>>& state() { return data_.state; }
  const std::vector<std::vector<AdamState>>& state() const { return data_.state; }
  // Groups, options and state as the checkpoint formats take them.
  checkpoint::AdamWState& data() { return data_; }
  const checkpoint::AdamWState& data() const { return data_; }

 private:
  checkpoint::AdamWState data_;
};

// One AdamW update of `param` in place (torch's fused kernel on libtorch >= 2.4, else its single-tensor
// numerics); `param`, `grad` and the moments may be
// matching views into bigger tensors (ShardedAdamW updates pieces chunk by chunk). `step` counts this
// update (state.step after incrementing it).
void adamw_update(torch::Tensor param, const torch::Tensor& grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                  int64_t step, double lr, double weight_decay, const AdamWOptions& options);

// Scales all gradients so their global L2 norm is at most max_norm (torch.nn.utils.clip_grad_norm_
// semantics: coef = max_norm / (norm + 1e-6), clamped to 1). Returns the norm before clipping.
double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm);

}  // namespace llava::train
