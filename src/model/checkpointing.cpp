#include "model/checkpointing.h"

#include <mutex>
#include <utility>
#include <vector>

#include "model/linear.h"

namespace llava::model {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The default generators the layer may draw from (CPU, plus the input's accelerator) and their states.
struct RngStates {
  std::vector<std::pair<at::Generator, torch::Tensor>> saved;

  static RngStates capture(const torch::Tensor& x) {
    RngStates s;
    s.add(at::globalContext().defaultGenerator(torch::kCPU));
    if (!x.device().is_cpu()) s.add(at::globalContext().defaultGenerator(x.device()));
    return s;
  }
  void add(at::Generator generator) {
    std::lock_guard<std::mutex> lock(generator.mutex());
    saved.emplace_back(generator, generator.get_state());
  }
  void restore() const {
    for (auto& [generator, state] : saved) {
      auto g = generator;
      std::lock_guard<std::mutex> lock(g.mutex());
      g.set_state(state);
    }
  }
};

// Sets the generators to the forward pass's states for its lifetime, then puts back the current ones, so
// the recomputation neither sees nor disturbs the random stream of the rest of training.
class ReplayRng {
 public:
  ReplayRng(const RngStates& forward_states, const torch::Tensor& x) : current_(RngStates::capture(x)) {
    forward_states.restore();
  }
  ~ReplayRng() { current_.restore(); }
  ReplayRng(const ReplayRng&) = delete;
  ReplayRng& operator=(const ReplayRng&) = delete;

 private:
  RngStates current_;
};

// What the backward pass needs besides the saved input; travels in the autograd context as a capsule.
struct Recipe : torch::CustomClassHolder {
  LayerFn layer_fn;
  RngStates rng;
  bool input_requires_grad = false;
  bool anchored = false;  // inputs carry the anchor (see forward)
};

struct CheckpointFunction : torch::autograd::Function<CheckpointFunction> {
  // `inputs` = {x} or {x, anchor}: the anchor is a tensor that requires grad, added when x does not, so
  // that this node exists and its backward (which fills the layer's parameter grads) runs.
  // Autograd runs this with grad disabled: nothing of the layer's graph is kept.
  static variable_list forward(AutogradContext* ctx, c10::intrusive_ptr<Recipe> recipe, at::TensorList inputs) {
    const auto& x = inputs[0];
    recipe->rng = RngStates::capture(x);
    recipe->input_requires_grad = x.requires_grad();
    ctx->save_for_backward({x});
    ctx->saved_data["recipe"] = c10::IValue::make_capsule(recipe);
    return {recipe->layer_fn(x)};
  }

  // Recompute the layer with grad on a detached x, backpropagate grad_out through it: the parameters
  // accumulate their grads, x's grad is handed back to the outer backward.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto* recipe = static_cast<Recipe*>(ctx->saved_data["recipe"].toCapsule().get());
    auto x = ctx->get_saved_variables()[0].detach().requires_grad_(recipe->input_requires_grad);
    torch::Tensor y;
    {
      torch::AutoGradMode grad_on(true);
      ReplayRng replay(recipe->rng, x);
      y = recipe->layer_fn(x);
    }
    if (y.requires_grad() && grad_outputs[0].defined()) torch::autograd::backward({y}, {grad_outputs[0]});
    variable_list grads = {torch::Tensor(), x.requires_grad() ? x.grad() : torch::Tensor()};  // recipe, x
    if (recipe->anchored) grads.emplace_back();
    return grads;
  }
};

}  // namespace

torch::Tensor checkpoint(const LayerFn& layer_fn, const torch::Tensor& x, bool trainable_inside) {
  if (!torch::GradMode::is_enabled() || (!x.requires_grad() && !trainable_inside)) return layer_fn(x);
  auto recipe = c10::make_intrusive<Recipe>();
  recipe->layer_fn = layer_fn;
  if (x.requires_grad()) return CheckpointFunction::apply(recipe, at::TensorList{x})[0];
  // A 0-element leaf is the cheapest tensor that requires grad; it gets no gradient.
  recipe->anchored = true;
  auto anchor = torch::empty({0}, x.options().dtype(torch::kFloat32)).requires_grad_(true);
  return CheckpointFunction::apply(recipe, at::TensorList{x, anchor})[0];
}

bool checkpointing_active(const torch::nn::Module& module, bool switched_on) {
  return switched_on && module.is_training() && torch::GradMode::is_enabled();
}

bool has_trainable_state(const torch::nn::Module& layer) {
  for (const auto& p : layer.parameters())
    if (p.requires_grad()) return true;
  for (const auto& m : layer.modules())
    if (auto* linear = m->as<LinearImpl>(); linear && linear->adapter) return true;
  return false;
}

}  // namespace llava::model
