// A hook on the moment autograd has accumulated a leaf's gradient (what torch DDP's Reducer hangs its
// bucket logic on): ZeRO reduces gradient buckets during the backward pass through it.
#pragma once
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <utility>

namespace llava::train {

// Calls `on_ready` each time autograd has accumulated a gradient into the leaf `param`'s .grad, as torch's
// DDP Reducer does: a post hook on the parameter's AccumulateGrad node. A leaf holds that node only
// weakly, so the handle keeps it alive (otherwise the next backward would make a new node without the
// hook); destroying the handle removes the hook.
class GradAccumulatedHook {
 public:
  GradAccumulatedHook(const torch::Tensor& param, std::function<void()> on_ready)
      : node_(torch::autograd::impl::grad_accumulator(param)) {
    if (!node_) throw std::invalid_argument("GradAccumulatedHook: the tensor is not a leaf that requires grad");
    key_ = node_->add_post_hook(std::make_unique<Hook>(std::move(on_ready)));
  }
  ~GradAccumulatedHook() { node_->del_post_hook(key_); }
  GradAccumulatedHook(const GradAccumulatedHook&) = delete;
  GradAccumulatedHook& operator=(const GradAccumulatedHook&) = delete;

 private:
  struct Hook : torch::autograd::FunctionPostHook {
    explicit Hook(std::function<void()> fn) : fn(std::move(fn)) {}
    torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                              const torch::autograd::variable_list& /*inputs*/) override {
      fn();
      return outputs;
    }
    std::function<void()> fn;
  };
  decltype(torch::autograd::impl::grad_accumulator(std::declval<const torch::Tensor&>())) node_;
  uintptr_t key_ = 0;
};

}  // namespace llava::train
