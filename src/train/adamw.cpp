#include "train/adamw.h"

#include <cmath>


namespace llava::train {

AdamW::AdamW(std::vector<ParamGroup> groups, AdamWOptions options)
    : data_{std::move(groups), options, {}} {
  for (auto& g : data_.groups) data_.state.emplace_back(g.params.size());
}

void AdamW::step() {
  torch::NoGradGuard no_grad;
  for (size_t g = 0; g < data_.groups.size(); ++g) {
    const ParamGroup& group = data_.groups[g];
    for (size_t i = 0; i < group.params.size(); ++i) {
      const torch::Tensor& param = group.params[i];
      if (!param.grad().defined()) continue;
      AdamState& s = data_.state[g][i];
      if (!s.initialized()) {
        s.exp_avg = torch::zeros_like(param, torch::MemoryFormat::Preserve);
        s.exp_avg_sq = torch::zeros_like(param, torch::MemoryFormat::Preserve);
      }
      s.step += 1;
      adamw_update(param, param.grad(), s.exp_avg, s.exp_avg_sq, s.step, group.lr, group.weight_decay, data_.options);
    }
  }
}

void adamw_update(torch::Tensor param, const torch::Tensor& grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                  int64_t step, double lr, double weight_decay, const AdamWOptions& options) {
  // torch's AdamW(fused=True): one pass over memory. `step` is this update's count (already incremented),
  // as torch passes state_steps.
  auto step_tensor = torch::scalar_tensor(static_cast<double>(step), torch::TensorOptions().dtype(torch::kFloat32).device(param.device()));
  at::_fused_adamw_({param}, {grad}, {exp_avg}, {exp_avg_sq}, /*max_exp_avg_sqs=*/{}, {step_tensor}, lr, options.beta1,
                    options.beta2, weight_decay, options.eps, /*amsgrad=*/false, /*maximize=*/false);
}

void AdamW::zero_grad() {
  for (auto& g : data_.groups)
    for (auto& p : g.params)
      if (p.grad().defined()) p.mutable_grad() = torch::Tensor();
}

void AdamW::set_lr_factor(double factor) {
  for (auto& g : data_.groups) g.lr = g.base_lr * factor;
}

double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> norms;
  for (auto& p : params)
    if (p.grad().defined()) norms.push_back(p.grad().norm(2).to(torch::kFloat32));
  if (norms.empty()) return 0.0;
  auto total = torch::stack(norms).norm(2);
  auto coef = torch::clamp(max_norm / (total + 1e-6), c10::nullopt, 1.0);
  if (coef.item<float>() < 1.0f)  // a multiply by exactly 1 changes no bit
    for (auto& p : params)
      if (p.grad().defined()) p.mutable_grad().mul_(coef.to(p.grad().scalar_type()));
  return total.item<double>();
}

}  // namespace llava::train
