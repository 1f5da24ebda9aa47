// Activation checkpointing (torch.utils.checkpoint with use_reentrant=True, which libtorch lacks).
//
// A checkpointed layer keeps only its inputs during the forward pass; its activations are recomputed
// in the backward pass, with grad enabled and the RNG state the forward saw (so dropout draws the same
// mask), and backpropagated right there: parameters accumulate their .grad, the inputs' grads flow on.
// Peak memory drops from all layers' activations to their inputs plus one layer's activations.
//
// As with the reentrant torch version, the parameters' grads are produced by a nested backward, so
// only loss.backward() (torch::autograd::backward) is supported, not torch::autograd::grad(loss, params).
#pragma once
#include <functional>

#include <torch/torch.h>

namespace llava::model {

using LayerFn = std::function<torch::Tensor(const torch::Tensor&)>;

// layer_fn(x), keeping only `x` (and what layer_fn captures: its other inputs, e.g. masks, by value!)
// for the backward pass. `trainable_inside`: the layer holds something that needs a gradient (see
// has_trainable_state); then the recomputation happens even when `x` needs no gradient (the first
// layer of a frozen stack with LoRA), which torch's reentrant checkpoint silently gets wrong.
// With nothing needing a gradient it just runs layer_fn(x).
torch::Tensor checkpoint(const LayerFn& layer_fn, const torch::Tensor& x, bool trainable_inside);

// Whether checkpointing applies now: switched on, module in training mode, grad enabled (HF's rule).
bool checkpointing_active(const torch::nn::Module& module, bool switched_on);

// A parameter of `layer` requires grad, or one of its Linears carries an adapter (adapters are attached
// to be trained; they are not submodules, so their tensors are not among layer.parameters()).
bool has_trainable_state(const torch::nn::Module& layer);

}  // namespace llava::model
