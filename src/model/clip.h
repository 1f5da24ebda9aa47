// CLIP ViT vision tower (HF CLIPVisionModel's vision_model), as LLaVA uses it: the hidden states of
// chosen layers, before post_layernorm.
#pragma once
#include <vector>

#include <torch/torch.h>

#include "model/config.h"
#include "model/layers.h"
#include "model/linear.h"

namespace llava::model {

class ClipEmbeddingsImpl : public torch::nn::Module {
 public:
  ClipEmbeddingsImpl(const VisionConfig& c, const torch::TensorOptions& options);
  torch::Tensor forward(const torch::Tensor& pixel_values);  // [N,C,H,W] -> [N,1+P,D]
  torch::Tensor class_embedding;  // [D]
  torch::Tensor patch_weight;  // patch_embedding.weight [D,C,p,p]: a stride-p conv without bias
  Embedding position_embedding{nullptr};
  int64_t image_size, patch_size;
};
TORCH_MODULE(ClipEmbeddings);

class ClipAttentionImpl : public torch::nn::Module {
 public:
  ClipAttentionImpl(const VisionConfig& c, const torch::TensorOptions& options);
  torch::Tensor forward(const torch::Tensor& x);  // [N,S,D] -> [N,S,D], bidirectional
  Linear k_proj{nullptr}, v_proj{nullptr}, q_proj{nullptr}, out_proj{nullptr};  // HF registration order
  int64_t num_heads, head_dim;
};
TORCH_MODULE(ClipAttention);

class ClipMlpImpl : public torch::nn::Module {
 public:
  ClipMlpImpl(const VisionConfig& c, const torch::TensorOptions& options);
  torch::Tensor forward(const torch::Tensor& x);
  Linear fc1{nullptr}, fc2{nullptr};
  std::string act;
};
TORCH_MODULE(ClipMlp);

class ClipEncoderLayerImpl : public torch::nn::Module {
 public:
  ClipEncoderLayerImpl(const VisionConfig& c, const torch::TensorOptions& options);
  torch::Tensor forward(const torch::Tensor& x);  // pre-LN residual block
  ClipAttention self_attn{nullptr};
  LayerNorm layer_norm1{nullptr};
  ClipMlp mlp{nullptr};
  LayerNorm layer_norm2{nullptr};
};
TORCH_MODULE(ClipEncoderLayer);

// Registered as "vision_model" inside the tower module so names read vision_tower.vision_model.*.
class ClipVisionTransformerImpl : public torch::nn::Module {
 public:
  ClipVisionTransformerImpl(const VisionConfig& c, const torch::TensorOptions& options);

  // HF's hidden_states[i] for each requested i (negative counts from the end; 0 = pre_layrnorm output,
  // i = output of encoder layer i-1). Only the layers needed are run. Each [N,1+P,D].
  std::vector<torch::Tensor> hidden_states(const torch::Tensor& pixel_values, const std::vector<int64_t>& layers);

  ClipEmbeddings embeddings{nullptr};
  LayerNorm pre_layrnorm{nullptr};  // sic: HF's spelling
  torch::nn::ModuleList layers;     // registered as encoder.layers
  LayerNorm post_layernorm{nullptr};  // only for the pooled CLS output: unused by LLaVA, kept for the names
  VisionConfig config;
  // Recompute each encoder layer in the backward pass (model/checkpointing.h); only in training mode with
  // grad enabled, like HF.
  bool gradient_checkpointing = false;
};
TORCH_MODULE(ClipVisionTransformer);

class ClipVisionModelImpl : public torch::nn::Module {
 public:
  ClipVisionModelImpl(const VisionConfig& c, const torch::TensorOptions& options);
  ClipVisionTransformer vision_model{nullptr};
};
TORCH_MODULE(ClipVisionModel);

}  // namespace llava::model
