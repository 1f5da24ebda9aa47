#include "checkpoint/torch_optimizer.h"

#include <ATen/core/ivalue.h>

#include "io/pickle.h"

namespace llava::checkpoint {

c10::impl::GenericDict adamw_param_group(const AdamWGroupSettings& group, c10::impl::GenericList params) {
  auto d = io::pickle::new_dict();
  d.insert("weight_decay", group.weight_decay);
  d.insert("lr", group.lr);
  d.insert("betas", c10::ivalue::Tuple::create({group.beta1, group.beta2}));
  d.insert("eps", group.eps);
  d.insert("amsgrad", false);
  d.insert("maximize", false);
  d.insert("foreach", c10::IValue());
  d.insert("capturable", false);
  d.insert("differentiable", false);
  d.insert("fused", c10::IValue());
  d.insert("decoupled_weight_decay", true);
  d.insert("initial_lr", group.initial_lr);
  d.insert("params", std::move(params));
  return d;
}

}  // namespace llava::checkpoint
