#include "train/lora.h"

#include <cmath>
#include <re2/re2.h>

#include "io/error.h"

namespace llava::train {

static bool is_path_suffix(const std::string& path, const std::string& name) {  // PEFT: key == t or endswith("." + t)
  return path == name ||
         (path.size() > name.size() && path.compare(path.size() - name.size() - 1, name.size() + 1, "." + name) == 0);
}

bool TargetModules::matches(const std::string& path) const {
  switch (kind) {
    case Kind::AllLinear: return !is_path_suffix(path, "lm_head");
    case Kind::Regex:
      if (!compiled_) {
        RE2::Options options;
        options.set_log_errors(false);
        compiled_ = std::make_shared<const RE2>(regex, options);
        if (!compiled_->ok()) throw Error("LoRA target_modules: not a regular expression RE2 accepts: " + compiled_->error());
      }
      return RE2::FullMatch(path, *compiled_);
    case Kind::Suffixes:
      for (auto& s : suffixes)
        if (is_path_suffix(path, s)) return true;
      return false;
  }
  return false;
}

double LoraConfig::scaling() const { return use_rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / r; }

LoraAdapter::LoraAdapter(int64_t in_features, int64_t out_features, const LoraConfig& config,
                         const torch::TensorOptions& options)
    : scaling(config.scaling()), dropout(config.dropout) {
  lora_A = torch::empty({config.r, in_features}, options);
  lora_B = torch::zeros({out_features, config.r}, options);
  torch::NoGradGuard no_grad;
  torch::nn::init::kaiming_uniform_(lora_A, std::sqrt(5.0));
}

torch::Tensor LoraAdapter::forward(const torch::Tensor& x) {
  auto h = x.to(lora_A.scalar_type());  // PEFT computes the adapter in its own dtype
  if (dropout > 0) h = torch::dropout(h, dropout, /*train=*/true);
  auto y = torch::nn::functional::linear(torch::nn::functional::linear(h, lora_A), lora_B) * scaling;
  return y.to(x.scalar_type());
}

torch::Tensor LoraAdapter::delta_weight() const {
  return torch::matmul(lora_B.to(torch::kFloat32), lora_A.to(torch::kFloat32)) * scaling;
}

std::vector<LoraModule> attach_lora(torch::nn::Module& root, const LoraConfig& config) {
  std::vector<LoraModule> attached;
  std::vector<std::string> linear_paths;
  for (auto& item : root.named_modules("", /*include_self=*/false)) {
    auto* linear = item.value()->as<model::LinearImpl>();
    if (!linear) continue;
    linear_paths.push_back(item.key());
    if (!config.target_modules.matches(item.key())) continue;
    auto options = linear->weight.options().requires_grad(false);
    auto adapter = std::make_shared<LoraAdapter>(linear->in_features(), linear->out_features(), config, options);
    linear->adapter = adapter;
    attached.push_back({item.key(), model::Linear(std::dynamic_pointer_cast<model::LinearImpl>(item.value())), adapter});
  }
  if (attached.empty()) {
    std::string examples;
    for (size_t i = 0; i < linear_paths.size() && i < 4; ++i) examples += (i ? ", " : "") + linear_paths[i];
    throw Error("lora target_modules matched no Linear module (" + std::to_string(linear_paths.size()) +
                " Linear modules, e.g. " + examples + ")");
  }
  return attached;
}

void merge(LoraModule& m) {
  if (m.adapter->merged) return;
  torch::NoGradGuard no_grad;
  auto& w = m.linear->weight;
  w.copy_((w.to(torch::kFloat32) + m.adapter->delta_weight()).to(w.scalar_type()));
  m.adapter->merged = true;
  m.linear->adapter = nullptr;  // its delta now lives in the base weight
}

void unmerge(LoraModule& m) {
  if (!m.adapter->merged) return;
  torch::NoGradGuard no_grad;
  auto& w = m.linear->weight;
  w.copy_((w.to(torch::kFloat32) - m.adapter->delta_weight()).to(w.scalar_type()));
  m.adapter->merged = false;
  m.linear->adapter = m.adapter;
}

std::vector<LoraModule> load_lora_adapter(model::LlavaForConditionalGeneration& model, const std::string& dir) {
  const auto adapter = checkpoint::read_lora_adapter(model, dir);
  const auto linears = checkpoint::linear_modules(model);
  LoraConfig config;
  config.r = adapter.r;
  config.alpha = adapter.lora_alpha;
  config.use_rslora = adapter.use_rslora;
  std::vector<LoraModule> attached;
  torch::NoGradGuard no_grad;
  for (auto& [path, weights] : adapter.modules) {
    const auto& linear = linears.at(path);
    if (weights.A.size(1) != linear->in_features() || weights.B.size(0) != linear->out_features())
      fail(adapter.tensor_file, "'" + weights.key + "': lora_A " + c10::str(weights.A.sizes()) + " / lora_B " +
                                    c10::str(weights.B.sizes()) + " do not fit the Linear '" + path + "' [" +
                                    std::to_string(linear->out_features()) + ", " +
                                    std::to_string(linear->in_features()) + "]");
    auto lora = std::make_shared<LoraAdapter>(linear->in_features(), linear->out_features(), config,
                                              linear->weight.options().requires_grad(false));
    lora->lora_A.copy_(weights.A);
    lora->lora_B.copy_(weights.B);
    linear->adapter = lora;
    attached.push_back({path, model::Linear(linear), lora});
  }
  return attached;
}

checkpoint::PeftLoraSettings peft_lora_settings(const LoraConfig& config) {
  using Targets = checkpoint::PeftLoraSettings::Targets;
  checkpoint::PeftLoraSettings s;
  s.r = config.r;
  s.alpha = config.alpha;
  s.dropout = config.dropout;
  s.use_rslora = config.use_rslora;
  const auto& t = config.target_modules;
  if (t.kind == TargetModules::Kind::AllLinear) s.targets = Targets::kAllLinear;
  if (t.kind == TargetModules::Kind::Regex)
    s.targets = t.regex == kLlavaDefaultLoraRegex ? Targets::kLlavaLanguageModel : Targets::kRegex;
  s.suffixes = t.suffixes;
  s.regex = t.regex;
  return s;
}

std::vector<checkpoint::LoraModuleWeights> lora_weights(const std::vector<LoraModule>& modules) {
  std::vector<checkpoint::LoraModuleWeights> out;
  for (auto& m : modules) out.push_back({m.path, m.adapter->lora_A.detach(), m.adapter->lora_B.detach()});
  return out;
}

}  // namespace llava::train
