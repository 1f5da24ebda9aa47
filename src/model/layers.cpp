#include "model/layers.h"

#include "io/error.h"

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

torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const torch::Tensor& mask, double scale) {
  // An undefined mask must reach SDPA as "no mask" (nullopt), not as an optional holding nothing.
  std::optional<at::Tensor> attn_mask = mask.defined() ? std::optional<at::Tensor>(mask) : std::nullopt;
  return at::scaled_dot_product_attention(q, k, v, attn_mask, /*dropout_p=*/0.0, /*is_causal=*/false, scale);
}

// at::rms_norm is one kernel instead of five element-wise passes (and their saved temporaries); forward and
// backward were checked bitwise equal to HF's composite for fp32 and bf16. For other dtypes than fp32 the
// weight is applied afterwards, so HF's cast-then-scale rounding is kept.
torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  if (x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32)
    return at::rms_norm(x, {weight.size(0)}, weight, eps);
  return weight * at::rms_norm(x, {weight.size(0)}, std::nullopt, eps);
}

}  // namespace llava::model
