// Small building blocks shared by the CLIP tower, the projector and the Llama decoder. Parameters are
// allocated uninitialized in the requested dtype (a 7B model must not be built in fp32 first); weights
// come from a checkpoint.
#pragma once
#include <optional>
#include <string>

#include <torch/torch.h>

namespace llava::model {

// HF's ACT2FN by name: gelu (erf), gelu_pytorch_tanh / gelu_new (tanh approximation), quick_gelu,
// silu / swish, relu. Error for any other name.
torch::Tensor activation(const std::string& name, const torch::Tensor& x);

class EmbeddingImpl : public torch::nn::Module {
 public:
  // padding_idx: that row gets no gradient, like nn.Embedding(padding_idx=...).
  EmbeddingImpl(int64_t num, int64_t dim, std::optional<int64_t> padding_idx, const torch::TensorOptions& options);
  torch::Tensor forward(const torch::Tensor& ids);  // [...] int64 -> [..., dim]
  torch::Tensor weight;  // [num, dim]
  int64_t padding_idx = -1;
};
TORCH_MODULE(Embedding);

class LayerNormImpl : public torch::nn::Module {
 public:
  LayerNormImpl(int64_t dim, double eps, const torch::TensorOptions& options);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight, bias;  // [dim]
  double eps;
};
TORCH_MODULE(LayerNorm);

// softmax(q k^T * scale + mask) v through torch's SDPA (flash / memory-efficient kernels where the device
// has them). q: [B,H,Tq,D], k/v: [B,H,Tk,D], mask: additive, broadcastable to [B,H,Tq,Tk], or undefined.
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const torch::Tensor& mask, double scale);

// LlamaRMSNorm: normalize in fp32, cast back to the input dtype, then scale by weight in that dtype.
class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps, const torch::TensorOptions& options);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;  // [dim]
  double eps;
};
TORCH_MODULE(RMSNorm);

}  // namespace llava::model
