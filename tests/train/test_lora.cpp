// LoRA on the LLaVA module tree, checked against an independent computation of PEFT's formulas.
#include <catch2/catch.hpp>
#include <cmath>

#include "io/error.h"
#include "model/llava.h"
#include "model/tiny_config.h"
#include "train/lora.h"

using namespace llava;

namespace {

model::LlavaConfig tiny_config() { return test::tiny_llava_config(); }

// Parameters are allocated uninitialized; give them values.
model::LlavaForConditionalGeneration tiny_model() {
  torch::manual_seed(0);
  model::LlavaForConditionalGeneration m(tiny_config(), torch::TensorOptions().dtype(torch::kFloat32));
  torch::NoGradGuard no_grad;
  for (auto& p : m->parameters()) p.normal_(0, 0.2);
  return m;
}

train::LoraConfig lora(train::TargetModules targets, int64_t r = 4, double alpha = 8) {
  train::LoraConfig c;
  c.r = r;
  c.alpha = alpha;
  c.target_modules = std::move(targets);
  return c;
}

train::TargetModules suffixes(std::vector<std::string> s) {
  train::TargetModules t;
  t.suffixes = std::move(s);
  return t;
}

TEST_CASE("target regexes match whole paths in linear time, even where a backtracking engine blows up") {
  train::TargetModules t;
  t.kind = train::TargetModules::Kind::Regex;
  t.regex = R"(model\.language_model\..*\.(q_proj|v_proj))";
  CHECK(t.matches("model.language_model.layers.0.self_attn.q_proj"));
  CHECK_FALSE(t.matches("model.language_model.layers.0.self_attn.q_proj.lora_A"));  // fullmatch, as PEFT
  CHECK_FALSE(t.matches("model.vision_tower.layers.0.self_attn.q_proj"));
  // (a*)*b on 40 a's: about 2^40 steps for std::regex (a run that never starts); one pass for RE2.
  train::TargetModules evil;
  evil.kind = train::TargetModules::Kind::Regex;
  evil.regex = "(a*)*b";
  CHECK_FALSE(evil.matches(std::string(40, 'a')));
  CHECK(evil.matches(std::string(40, 'a') + "b"));
}

}  // namespace

TEST_CASE("target_modules select by suffix, regex over the whole path, or all-linear without lm_head") {
  auto m = tiny_model();
  auto count = [&](train::TargetModules t) { return train::attach_lora(*tiny_model(), lora(t)).size(); };
  CHECK(count(suffixes({"q_proj", "v_proj"})) == 2 * 2 + 2 * 2);  // both towers have q_proj/v_proj
  train::TargetModules llm_only;
  llm_only.kind = train::TargetModules::Kind::Regex;
  llm_only.regex = R"(model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj))";
  CHECK(count(llm_only) == 2 * 7);
  train::TargetModules partial_regex = llm_only;
  partial_regex.regex = "q_proj";  // must match the whole path, not a part of it
  CHECK_THROWS_WITH(count(partial_regex), Catch::Contains("matched no Linear module"));
  train::TargetModules all;
  all.kind = train::TargetModules::Kind::AllLinear;
  // vision: 2 layers x (q,k,v,out,fc1,fc2); projector: 2; llm: 2 layers x 7; lm_head excluded.
  auto attached = train::attach_lora(*m, lora(all));
  CHECK(attached.size() == 2 * 6 + 2 + 2 * 7);
  for (auto& a : attached) CHECK(a.path != "lm_head");
}

TEST_CASE("a LoRA Linear adds B A x * alpha / r and starts as the base model") {
  auto m = tiny_model();
  auto attached = train::attach_lora(*m, lora(suffixes({"linear_1"}), 4, 8));
  REQUIRE(attached.size() == 1);
  auto& mod = attached[0];
  CHECK(mod.path == "model.multi_modal_projector.linear_1");
  CHECK(mod.adapter->scaling == 2.0);
  CHECK(torch::all(mod.adapter->lora_B == 0).item<bool>());  // PEFT: B starts at zero
  const double bound = 1.0 / std::sqrt(16.0);                  // kaiming_uniform(a=sqrt(5)) on [r, in]
  CHECK(mod.adapter->lora_A.abs().max().item<double>() <= bound);
  CHECK(mod.adapter->lora_A.abs().max().item<double>() > bound / 2);

  auto x = torch::randn({3, 16});
  auto base = torch::matmul(x, mod.linear->weight.t()) + mod.linear->bias;
  CHECK(torch::allclose(mod.linear->forward(x), base));
  torch::NoGradGuard no_grad;
  mod.adapter->lora_B.normal_();
  auto expected = base + torch::matmul(torch::matmul(x, mod.adapter->lora_A.t()), mod.adapter->lora_B.t()) * 2.0;
  CHECK(torch::allclose(mod.linear->forward(x), expected, 1e-5, 1e-5));

  train::LoraConfig rs = lora(suffixes({"linear_1"}), 4, 8);
  rs.use_rslora = true;
  CHECK(rs.scaling() == Approx(8.0 / 2.0));
}

TEST_CASE("merge folds the adapter into the weight and unmerge restores it") {
  auto m = tiny_model();
  auto attached = train::attach_lora(*m, lora(suffixes({"q_proj"}), 2, 4));
  torch::NoGradGuard no_grad;
  for (auto& a : attached) a.adapter->lora_B.normal_();
  auto& mod = attached.back();
  auto x = torch::randn({5, mod.linear->in_features()});
  auto with_adapter = mod.linear->forward(x);
  auto original_weight = mod.linear->weight.clone();
  train::merge(mod);
  CHECK(mod.linear->adapter == nullptr);
  CHECK(torch::allclose(mod.linear->forward(x), with_adapter, 1e-5, 1e-5));
  CHECK(torch::allclose(mod.linear->weight, original_weight + mod.adapter->delta_weight(), 1e-6, 1e-6));
  train::unmerge(mod);
  CHECK(torch::allclose(mod.linear->weight, original_weight, 1e-6, 1e-6));
  CHECK(torch::allclose(mod.linear->forward(x), with_adapter, 1e-5, 1e-5));
}
