// AdamW with torch.optim.AdamW's numerics, over named
// parameter groups like HF Trainer builds them (decay / no-decay, plus LLaVA's projector-lr groups).
// libtorch >= 2.4: torch's fused kernel (AdamW(fused=True)); older: the single-tensor path torch takes on
// CPU by default. The two agree to float rounding (~1e-7 relative), not bitwise.
#pragma once
#include <string>
#include <vector>

#include <torch/torch.h>

namespace llava::train {

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

class AdamW {
 public:
  AdamW(std::vector<ParamGroup> groups, AdamWOptions options);

  // One update of every parameter that has a gradient; parameters without one keep their state.
  void step();
  void zero_grad();
  void set_lr_factor(double factor);  // lr = base_lr * factor for every group

  std::vector<ParamGroup>& groups() { return groups_; }
  const std::vector<ParamGroup>& groups() const { return groups_; }
  const AdamWOptions& options() const { return options_; }
  // state()[g][i] belongs to groups()[g].params[i].
  std::vector<std::vector<AdamState>>& state() { return state_; }
  const std::vector<std::vector<AdamState>>& state() const { return state_; }

 private:
  std::vector<ParamGroup> groups_;
  AdamWOptions options_;
  std::vector<std::vector<AdamState>> state_;
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
