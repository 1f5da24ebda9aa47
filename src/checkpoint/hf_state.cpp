#include "checkpoint/hf_state.h"

#include "checkpoint/state_checks.h"
#include "checkpoint/torch_optimizer.h"
#include "io/error.h"
#include "io/pickle.h"

namespace llava::checkpoint {

namespace {

c10::impl::GenericList doubles(const std::vector<double>& values) {
  auto list = io::pickle::new_list();
  for (double v : values) list.push_back(v);
  return list;
}

const c10::IValue& entry(const c10::impl::GenericDict& dict, const std::string& key, const std::string& where) {
  auto it = dict.find(key);
  if (it == dict.end()) fail(where, "optimizer state has no '" + key + "'");
  return it->value();
}

}  // namespace

c10::IValue adamw_state_dict(const AdamWState& optimizer) {
  auto state = io::pickle::new_dict();
  auto groups = io::pickle::new_list();
  int64_t id = 0;
  for (size_t g = 0; g < optimizer.groups.size(); ++g) {
    const ParamGroup& group = optimizer.groups[g];
    auto ids = io::pickle::new_list();
    for (size_t i = 0; i < group.params.size(); ++i, ++id) {
      ids.push_back(id);
      const AdamState& s = optimizer.state[g][i];
      if (!s.initialized()) continue;
      auto param_state = io::pickle::new_dict();
      param_state.insert("step", torch::tensor(static_cast<float>(s.step)));
      param_state.insert("exp_avg", s.exp_avg);
      param_state.insert("exp_avg_sq", s.exp_avg_sq);
      state.insert(id, param_state);
    }
    const auto& o = optimizer.options;
    groups.push_back(
        adamw_param_group({group.weight_decay, group.lr, o.beta1, o.beta2, o.eps, group.base_lr}, ids));
  }
  auto root = io::pickle::new_dict();
  root.insert("state", state);
  root.insert("param_groups", groups);
  return root;
}

void load_adamw_state_dict(AdamWState& optimizer, const c10::IValue& value, const std::string& where) {
  if (!value.isGenericDict()) fail(where, "optimizer state must be a dict");
  auto root = value.toGenericDict();
  const auto& groups_value = entry(root, "param_groups", where);
  const auto& state_value = entry(root, "state", where);
  if (!groups_value.isList() || !state_value.isGenericDict()) fail(where, "param_groups must be a list and state a dict");
  auto groups = groups_value.toList();
  if (groups.size() != optimizer.groups.size())
    fail(where, "has " + std::to_string(groups.size()) + " parameter groups, this run has " +
                    std::to_string(optimizer.groups.size()));
  auto state = state_value.toGenericDict();
  for (size_t g = 0; g < groups.size(); ++g) {
    if (!groups.get(g).isGenericDict()) fail(where, "param_groups[" + std::to_string(g) + "] must be a dict");
    auto saved = groups.get(g).toGenericDict();
    ParamGroup& group = optimizer.groups[g];
    auto ids = entry(saved, "params", where).toList();
    if (ids.size() != group.params.size())
      fail(where, "param group " + std::to_string(g) + " (" + group.name + ") has " + std::to_string(ids.size()) +
                      " parameters, this run has " + std::to_string(group.params.size()));
    group.lr = entry(saved, "lr", where).toDouble();
    group.base_lr = saved.contains("initial_lr") ? saved.at("initial_lr").toDouble() : group.lr;
    group.weight_decay = entry(saved, "weight_decay", where).toDouble();
    for (size_t i = 0; i < ids.size(); ++i) {
      auto it = state.find(ids.get(i));
      if (it == state.end()) continue;  // never stepped
      auto s = it->value().toGenericDict();
      AdamState& dst = optimizer.state[g][i];
      const auto& param = group.params[i];
      const std::string what = "state[" + c10::str(ids.get(i)) + "] of '" +
                               (i < group.names.size() ? group.names[i] : "parameter " + std::to_string(i)) + "'";
      auto exp_avg = entry(s, "exp_avg", where).toTensor(), exp_avg_sq = entry(s, "exp_avg_sq", where).toTensor();
      if (exp_avg.sizes() != param.sizes() || exp_avg_sq.sizes() != param.sizes())
        fail(where, "state of " + (i < group.names.size() ? group.names[i] : "parameter " + std::to_string(i)) +
                        " has shape " + c10::str(exp_avg.sizes()) + ", the parameter has " + c10::str(param.sizes()));
      const auto& step = entry(s, "step", where);
      if (!(step.isTensor() && step.toTensor().numel() == 1) && !step.isDouble() && !step.isInt())
        fail(where, "\"step\" of " + what + " must be a number or a one-element tensor");
      dst.step = adam_step_from(step.isTensor() ? step.toTensor().item<double>()
                                : step.isInt() ? static_cast<double>(step.toInt()) : step.toDouble(),
                                where,
                                "\"step\" of " + what);
      check_adam_moments(exp_avg, exp_avg_sq, where, what);
      // Our moments are fp32 whatever the parameter's dtype (bf16 runs keep fp32 masters); torch's for a
      // bf16 parameter are bf16, which widen exactly. Never narrowed to the parameter's dtype: a bf16 run's
      // resume would round its fp32 moments (and the update would meet bf16 moments beside fp32 masters).
      const auto moment_options = torch::TensorOptions().device(param.device()).dtype(torch::kFloat32);
      dst.exp_avg = exp_avg.to(moment_options).clone();
      dst.exp_avg_sq = exp_avg_sq.to(moment_options).clone();
    }
  }
}

c10::IValue lambda_lr_state_dict(const std::vector<ParamGroup>& groups, int64_t steps) {
  std::vector<double> base, last;
  for (auto& g : groups) {
    base.push_back(g.base_lr);
    last.push_back(g.lr);
  }
  auto lambdas = io::pickle::new_list();
  for (size_t i = 0; i < base.size(); ++i) lambdas.push_back(io::pickle::new_dict());
  auto d = io::pickle::new_dict();
  d.insert("base_lrs", doubles(base));
  d.insert("last_epoch", steps);
  d.insert("_step_count", steps + 1);  // the constructor's initial step counts too
  d.insert("_is_initial", false);
  d.insert("_get_lr_called_within_step", false);
  d.insert("_last_lr", doubles(last));
  d.insert("lr_lambdas", lambdas);
  return d;
}

}  // namespace llava::checkpoint
