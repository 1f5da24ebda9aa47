// Pieces of torch's own optimizer.pt layout that every writer of it shares (HF Trainer's optimizer.pt and
// DeepSpeed's optimizer_state_dict both hold torch AdamW state dicts).
#pragma once
#include <ATen/core/Dict.h>
#include <ATen/core/List.h>

namespace llava::checkpoint {

struct AdamWGroupSettings {
  double weight_decay = 0, lr = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, initial_lr = 0;
};

// One entry of torch 2.x AdamW's state_dict()["param_groups"], keys in the order torch writes them;
// `params`: the group's parameter ids.
c10::impl::GenericDict adamw_param_group(const AdamWGroupSettings& group, c10::impl::GenericList params);

}  // namespace llava::checkpoint
