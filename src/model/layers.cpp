#include "model/layers.h"

#include "io/error.h"
#include "io/torch_compat.h"

namespace llava::model {

torch::Tensor activation(const std::string& name, const torch::Tensor& x) {
  if (name == "gelu") return torch::gelu(x);
  if (name == "gelu_pytorch_tanh" || name == "gelu_new") return torch::gelu(x, "tanh");
  if (name == "quick_gelu") return x * torch::sigmoid(1.702 * x);
  if (name == "silu" || name == "swish") return torch::silu(x);
  if (name == "relu") return torch::relu(x);
  fail("activation", "'" + name + "' is not supported");
}

EmbeddingImpl::EmbeddingImpl(int64_t num, int64_t dim, std::optional<int64_t> padding,
                             const torch::TensorOptions& options) {
  weight = register_parameter("weight", torch::empty({num, dim}, options));
  // A pad id outside the table (llava-hf keeps pad 32001 only at the top level) means no padding row.
  if (padding && *padding >= 0 && *padding < num) padding_idx = *padding;
}

torch::Tensor EmbeddingImpl::forward(const torch::Tensor& ids) { return torch::embedding(weight, ids, padding_idx); }

LayerNormImpl::LayerNormImpl(int64_t dim, double eps_, const torch::TensorOptions& options) : eps(eps_) {
  weight = register_parameter("weight", torch::empty({dim}, options));
  bias = register_parameter("bias", torch::empty({dim}, options));
}

torch::Tensor LayerNormImpl::forward(const torch::Tensor& x) {
  return torch::layer_norm(x, {weight.size(0)}, weight, bias, eps);
}

RMSNormImpl::RMSNormImpl(int64_t dim, double eps_, const torch::TensorOptions& options) : eps(eps_) {
  weight = register_parameter("weight", torch::empty({dim}, options));
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) { return compat::rms_norm(x, weight, eps); }

}  // namespace llava::model
