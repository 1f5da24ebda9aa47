#include "model/clip.h"

#include <algorithm>
#include <cmath>

#include "io/error.h"
#include "model/checkpointing.h"
#include "model/layers.h"

namespace llava::model {

ClipEmbeddingsImpl::ClipEmbeddingsImpl(const VisionConfig& c, const torch::TensorOptions& options)
    : image_size(c.image_size), patch_size(c.patch_size) {
  class_embedding = register_parameter("class_embedding", torch::empty({c.hidden_size}, options));
  auto patch = register_module("patch_embedding", std::make_shared<torch::nn::Module>());
  patch_weight = patch->register_parameter(
      "weight", torch::empty({c.hidden_size, c.num_channels, c.patch_size, c.patch_size}, options));
  position_embedding =
      register_module("position_embedding", Embedding(c.num_patches() + 1, c.hidden_size, std::nullopt, options));
}

torch::Tensor ClipEmbeddingsImpl::forward(const torch::Tensor& pixel_values) {
  const int64_t channels = patch_weight.size(1);  // the patch conv's input channels (3)
  if (pixel_values.dim() != 4 || pixel_values.size(1) != channels || pixel_values.size(2) != image_size ||
      pixel_values.size(3) != image_size)
    fail("pixel_values", "expected [N," + std::to_string(channels) + "," + std::to_string(image_size) + "," + std::to_string(image_size) +
                             "], got " + c10::str(pixel_values.sizes()));
  auto pixels = pixel_values.to(patch_weight.scalar_type());
  auto patches = torch::conv2d(pixels, patch_weight, {}, patch_size);  // [N,D,g,g]
  patches = patches.flatten(2).transpose(1, 2);                        // [N,P,D], row-major patches
  auto cls = class_embedding.expand({pixels.size(0), 1, -1});          // [N,1,D]
  auto x = torch::cat({cls, patches}, 1);                              // [N,1+P,D]
  return x + position_embedding->weight;                               // positions 0..P
}

ClipAttentionImpl::ClipAttentionImpl(const VisionConfig& c, const torch::TensorOptions& options)
    : num_heads(c.num_attention_heads), head_dim(c.hidden_size / c.num_attention_heads) {
  k_proj = register_module("k_proj", Linear(c.hidden_size, c.hidden_size, true, options));
  v_proj = register_module("v_proj", Linear(c.hidden_size, c.hidden_size, true, options));
  q_proj = register_module("q_proj", Linear(c.hidden_size, c.hidden_size, true, options));
  out_proj = register_module("out_proj", Linear(c.hidden_size, c.hidden_size, true, options));
}

torch::Tensor ClipAttentionImpl::forward(const torch::Tensor& x) {
  int64_t n = x.size(0), s = x.size(1);
  auto heads = [&](const torch::Tensor& t) { return t.view({n, s, num_heads, head_dim}).transpose(1, 2); };
  auto q = heads(q_proj(x)), k = heads(k_proj(x)), v = heads(v_proj(x));  // [N,h,S,d]
  auto out = attention(q, k, v, {}, 1.0 / std::sqrt(static_cast<double>(head_dim)));
  return out_proj(out.transpose(1, 2).reshape({n, s, num_heads * head_dim}));
}

ClipMlpImpl::ClipMlpImpl(const VisionConfig& c, const torch::TensorOptions& options) : act(c.hidden_act) {
  fc1 = register_module("fc1", Linear(c.hidden_size, c.intermediate_size, true, options));
  fc2 = register_module("fc2", Linear(c.intermediate_size, c.hidden_size, true, options));
}

torch::Tensor ClipMlpImpl::forward(const torch::Tensor& x) { return fc2(activation(act, fc1(x))); }

ClipEncoderLayerImpl::ClipEncoderLayerImpl(const VisionConfig& c, const torch::TensorOptions& options) {
  self_attn = register_module("self_attn", ClipAttention(c, options));
  layer_norm1 = register_module("layer_norm1", LayerNorm(c.hidden_size, c.layer_norm_eps, options));
  mlp = register_module("mlp", ClipMlp(c, options));
  layer_norm2 = register_module("layer_norm2", LayerNorm(c.hidden_size, c.layer_norm_eps, options));
}

torch::Tensor ClipEncoderLayerImpl::forward(const torch::Tensor& x) {
  auto h = x + self_attn(layer_norm1(x));
  return h + mlp(layer_norm2(h));
}

ClipVisionTransformerImpl::ClipVisionTransformerImpl(const VisionConfig& c, const torch::TensorOptions& options)
    : config(c) {
  embeddings = register_module("embeddings", ClipEmbeddings(c, options));
  pre_layrnorm = register_module("pre_layrnorm", LayerNorm(c.hidden_size, c.layer_norm_eps, options));
  auto encoder = register_module("encoder", std::make_shared<torch::nn::Module>());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) layers->push_back(ClipEncoderLayer(c, options));
  encoder->register_module("layers", layers);
  post_layernorm = register_module("post_layernorm", LayerNorm(c.hidden_size, c.layer_norm_eps, options));
}

std::vector<torch::Tensor> ClipVisionTransformerImpl::hidden_states(const torch::Tensor& pixel_values,
                                                                    const std::vector<int64_t>& wanted) {
  const int64_t count = config.num_hidden_layers + 1;  // embeddings + one per layer
  std::vector<int64_t> index;
  for (int64_t w : wanted) index.push_back(w < 0 ? w + count : w);
  int64_t last = *std::max_element(index.begin(), index.end());

  std::vector<torch::Tensor> states;  // states[i] == HF hidden_states[i], up to `last`
  states.push_back(pre_layrnorm(embeddings(pixel_values)));
  const bool recompute = checkpointing_active(*this, gradient_checkpointing);
  for (int64_t i = 0; i < last; ++i) {
    auto layer = layers->ptr<ClipEncoderLayerImpl>(i);
    if (!recompute) {
      states.push_back(layer->forward(states.back()));
      continue;
    }
    auto run_layer = [layer](const torch::Tensor& x) { return layer->forward(x); };
    states.push_back(checkpoint(run_layer, states.back(), has_trainable_state(*layer)));
  }

  std::vector<torch::Tensor> out;
  for (int64_t i : index) out.push_back(states[i]);
  return out;
}

ClipVisionModelImpl::ClipVisionModelImpl(const VisionConfig& c, const torch::TensorOptions& options) {
  vision_model = register_module("vision_model", ClipVisionTransformer(c, options));
}

}  // namespace llava::model
