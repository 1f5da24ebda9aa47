#include "checkpoint/deepspeed_resume.h"

#include <map>
#include <set>

#include "checkpoint/deepspeed_checkpoint.h"
#include "io/error.h"
#include "model/weights.h"

namespace llava::checkpoint {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

void erase_all(std::string& s, const std::string& part) {
  for (size_t at; (at = s.find(part)) != std::string::npos;) s.erase(at, part.size());
}

// A wrapped model's parameter name -> this model's canonical name ("" when it names none of them):
// PEFT's "base_model.model." prefix, ".base_layer" and the adapter name ".default" go; the module path may
// be in any key layout (classic / modern llava-hf, original LLaVA).
std::string canonical_name(std::string name, const std::map<std::string, std::string>& any_layout) {
  if (name.rfind("base_model.model.", 0) == 0) name.erase(0, std::string("base_model.model.").size());
  erase_all(name, ".base_layer");
  erase_all(name, ".default");
  for (const std::string lora : {".lora_A.weight", ".lora_B.weight"}) {
    if (!ends_with(name, lora)) continue;  // the module's own weight names the module in every layout
    auto it = any_layout.find(name.substr(0, name.size() - lora.size()) + ".weight");
    return it == any_layout.end() ? "" : it->second.substr(0, it->second.size() - 7) + lora;
  }
  auto it = any_layout.find(name);
  return it == any_layout.end() ? "" : it->second;
}

}  // namespace

NamedTensors restore_deepspeed_state(const std::string& checkpoint_dir, const std::vector<std::string>& model_param_names,
                                     AdamWState& whole) {
  const auto ckpt = read_deepspeed_checkpoint(checkpoint_dir);
  const auto any_layout = model::names_in_any_layout(model_param_names);
  size_t trained_here = 0;
  for (auto& g : whole.groups) trained_here += g.params.size();

  std::map<std::string, const DeepSpeedParam*> by_name;
  for (auto& p : ckpt.params) {
    const std::string name = canonical_name(p.name, any_layout);
    if (name.empty()) fail(ckpt.model_file, "param_shapes names '" + p.name + "', which is no parameter of this model");
    if (!by_name.emplace(name, &p).second) fail(ckpt.model_file, "param_shapes names '" + name + "' twice");
  }
  NamedTensors masters;
  std::set<std::string> used;
  for (size_t g = 0; g < whole.groups.size(); ++g) {
    ParamGroup& group = whole.groups[g];
    const DeepSpeedGroup* from = nullptr;
    for (size_t i = 0; i < group.params.size(); ++i) {
      const std::string& name = group.names[i];
      auto it = by_name.find(name);
      if (it == by_name.end())
        fail(ckpt.model_file, "has no trained tensor '" + name + "', which this run trains (the checkpoint trained " +
                                  std::to_string(ckpt.params.size()) + " tensors, this run " +
                                  std::to_string(trained_here) + ")");
      const DeepSpeedParam& p = *it->second;
      if (p.master.sizes() != group.params[i].sizes())
        fail(ckpt.model_file, "'" + p.name + "' has shape " + c10::str(p.master.sizes()) + ", this run's '" + name +
                                  "' has " + c10::str(group.params[i].sizes()));
      const DeepSpeedGroup& dg = ckpt.groups[p.group];
      if (from && from != &dg)
        fail(ckpt.model_file, "'" + p.name + "' is in another optimizer group than '" + group.names[0] +
                                  "' (weight decay / lr groups differ from this run's)");
      from = &dg;
      used.insert(name);
      masters.emplace_back(name, p.master);
      if (dg.step > 0) whole.state[g][i] = AdamState{p.exp_avg, p.exp_avg_sq, dg.step};
    }
    if (from) {
      group.base_lr = from->initial_lr;
      group.lr = from->lr;
      group.weight_decay = from->weight_decay;
    }
  }
  for (auto& [name, p] : by_name)
    if (!used.count(name))
      fail(ckpt.model_file, "trained '" + p->name + "', which this run does not train (its config differs)");

  torch::NoGradGuard no_grad;
  for (size_t g = 0; g < whole.groups.size(); ++g)
    for (size_t i = 0; i < whole.groups[g].params.size(); ++i)
      whole.groups[g].params[i].copy_(by_name.at(whole.groups[g].names[i])->master);
  return masters;
}

namespace {

// Our parameter name -> the name HF Trainer's model gives it (see deepspeed_save_of).
std::string hf_model_name(const std::string& name, bool peft) {
  if (!peft) return model::checkpoint_name(name, {model::KeyLayout::kHfModern, /*vision_model_level=*/false, ""});
  std::string peft_name = "base_model.model." + name;
  for (const std::string lora : {".lora_A.weight", ".lora_B.weight"})
    if (ends_with(peft_name, lora)) peft_name = peft_name.substr(0, peft_name.size() - 7) + ".default.weight";
  return peft_name;
}

}  // namespace

DeepSpeedSave deepspeed_save_of(const AdamWState& whole, const NamedTensors& masters, const NamedTensors& model_state,
                                bool peft, DeepSpeedSave run) {
  DeepSpeedSave save = std::move(run);
  save.beta1 = whole.options.beta1;
  save.beta2 = whole.options.beta2;
  save.eps = whole.options.eps;
  const std::map<std::string, torch::Tensor> master_of(masters.begin(), masters.end());
  for (size_t g = 0; g < whole.groups.size(); ++g) {
    const ParamGroup& group = whole.groups[g];
    int64_t step = 0;
    for (size_t i = 0; i < group.params.size(); ++i) {
      const AdamState& s = whole.state[g][i];
      step = std::max(step, s.step);
      const std::string name = hf_model_name(group.names[i], peft);
      auto master = master_of.count(group.names[i]) ? master_of.at(group.names[i]).view(group.params[i].sizes())
                                                     : group.params[i].detach();
      save.params.push_back({name, g, master, s.exp_avg, s.exp_avg_sq});
    }
    save.groups.push_back({group.lr, group.base_lr, group.weight_decay, step});
  }
  if (!peft)
    for (auto& [name, tensor] : model_state) save.module.emplace_back(hf_model_name(name, false), tensor);
  return save;
}

}  // namespace llava::checkpoint
