// Optimizer and schedule state in the form HF Trainer saves and loads (optimizer.pt / scheduler.pt):
// torch.optim.AdamW.state_dict() and LambdaLR.state_dict() of torch 2.x, readable with
// torch.load(weights_only=True) once written by io::save_pt.
#pragma once
#include <string>

#include <ATen/core/ivalue.h>

#include "checkpoint/optimizer_state.h"

namespace llava::checkpoint {

// {"state": {id: {"step": 0-d float32, "exp_avg", "exp_avg_sq"}}, "param_groups": [{..., "initial_lr",
// "params": [ids]}]}; ids count through the groups in order; only parameters with state appear.
c10::IValue adamw_state_dict(const AdamWState& optimizer);

// Restores what adamw_state_dict (or Python's torch.optim.AdamW) saved into an optimizer whose groups
// hold the same number of parameters in the same order (matched by position, as torch does). Restores
// lr, initial_lr and weight_decay of each group (betas and eps are the run's options). Error names `where` and what differs.
void load_adamw_state_dict(AdamWState& optimizer, const c10::IValue& state, const std::string& where);

// LambdaLR.state_dict() after `steps` scheduler steps (groups' lr: the current, i.e. next step's): base_lrs, last_epoch, _step_count, _last_lr, ...
c10::IValue lambda_lr_state_dict(const std::vector<ParamGroup>& groups, int64_t steps);

}  // namespace llava::checkpoint
