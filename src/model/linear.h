// The one projection module of the model: y = x W^T (+ b) (+ adapter(x)).
//
// Every nn.Linear of HF's LLaVA is one of these, so that LoRA (or any other adapter) can be attached to a
// projection from outside without touching the model code: set `adapter` and its output is added.
// The adapter is NOT registered as a submodule, so the model's named_parameters() stay exactly HF's.
#pragma once
#include <memory>

#include <torch/torch.h>

namespace llava::model {

struct LinearAdapter {
  virtual ~LinearAdapter() = default;
  // x: [..., in] -> [..., out], added to the base projection.
  virtual torch::Tensor forward(const torch::Tensor& x) = 0;
  // Whether forward draws from the random generator (LoRA dropout): the model then runs every projection
  // on the same tensors HF does, so the draws (dropout masks) are HF's.
  virtual bool draws_random_numbers() const { return false; }
};

class LinearImpl : public torch::nn::Module {
 public:
  // Parameters are allocated uninitialized with `options` (dtype): a checkpoint or init_weights() fills them.
  LinearImpl(int64_t in_features, int64_t out_features, bool bias, const torch::TensorOptions& options);

  torch::Tensor forward(const torch::Tensor& x);  // [..., in] -> [..., out]

  // nn.Linear's default init (kaiming_uniform(a=sqrt(5)) weight, U(+-1/sqrt(in)) bias).
  void reset_parameters();

  int64_t in_features() const { return weight.size(1); }
  int64_t out_features() const { return weight.size(0); }

  torch::Tensor weight;  // [out, in]
  torch::Tensor bias;    // [out] or undefined
  std::shared_ptr<LinearAdapter> adapter;
};
TORCH_MODULE(Linear);

}  // namespace llava::model
