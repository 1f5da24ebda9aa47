// LLaVA = CLIP vision tower -> MLP projector -> image features spliced into the Llama input embeddings.
//
// Module tree and parameter registration order are exactly HF's LlavaForConditionalGeneration
// (transformers >= 4.52): model.vision_tower.vision_model.*, model.multi_modal_projector.linear_{1,2}.*,
// model.language_model.*, lm_head.weight (absent when tied, like HF's deduplicated named_parameters()).
#pragma once
#include <memory>
#include <string>

#include <torch/torch.h>

#include "model/clip.h"
#include "model/config.h"
#include "model/linear.h"
#include "model/llama.h"

namespace llava::model {

class LlavaProjectorImpl : public torch::nn::Module {
 public:
  LlavaProjectorImpl(const LlavaConfig& c, const torch::TensorOptions& options);
  torch::Tensor forward(const torch::Tensor& features);  // [N,P,in] -> [N,P,text hidden]
  Linear linear_1{nullptr}, linear_2{nullptr};
  std::string act;
};
TORCH_MODULE(LlavaProjector);

// `t` on `device` without waiting for it: through page-locked memory (pinned here unless it is already),
// copied non_blocking; `t` itself when it is there already.
torch::Tensor to_device_without_waiting(const torch::Tensor& t, const torch::Device& device);

class LlavaModelImpl : public torch::nn::Module {
 public:
  LlavaModelImpl(const LlavaConfig& c, const torch::TensorOptions& options);

  // Projected features of each image: [N,3,H,W] -> [N,image_seq_length,text hidden].
  torch::Tensor image_features(const torch::Tensor& pixel_values);

  // Token embeddings with image features written, in order, into the image-token slots (HF's
  // masked_scatter). input_ids [B,T]; pixel_values [N,3,H,W] or undefined. Error if the number of image
  // tokens is not N * image_seq_length. image_rows: image_rows(input_ids) when the caller knows it on the
  // host (undefined: found here, which on a GPU waits for the device).
  torch::Tensor input_embeddings(const torch::Tensor& input_ids, const torch::Tensor& pixel_values,
                                 const torch::Tensor& image_rows = {});
  // The image tokens' flat positions b*T+t in input_ids [B,T], ascending: [S] int64.
  torch::Tensor image_rows(const torch::Tensor& input_ids) const;

  ClipVisionModel vision_tower{nullptr};
  LlavaProjector multi_modal_projector{nullptr};
  LlamaModel language_model{nullptr};
  LlavaConfig config;
};
TORCH_MODULE(LlavaModel);

class LlavaForConditionalGenerationImpl : public torch::nn::Module {
 public:
  LlavaForConditionalGenerationImpl(const LlavaConfig& c, const torch::TensorOptions& options);

  // Logits [B,T,V] in the model dtype. input_ids [B,T] int64; attention_mask [B,cached+T] or undefined;
  // pixel_values [N,3,H,W] or undefined (only on the first call of a generation); position_ids [B,T] or
  // undefined (arange from the cache length, like HF's forward).
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                        const torch::Tensor& pixel_values, KVCache* cache = nullptr,
                        const torch::Tensor& position_ids = {});

  torch::Tensor lm_head_weight() const;  // [V,H]: lm_head.weight, or embed_tokens.weight when tied

  // HF's gradient_checkpointing_enable / _disable: every CLIP encoder layer and Llama decoder layer is
  // recomputed in the backward pass instead of keeping its activations (model/checkpointing.h). Takes
  // effect only in training mode with grad enabled; losses and gradients are unchanged.
  void set_gradient_checkpointing(bool enabled);

  LlavaModel model{nullptr};
  Linear lm_head{nullptr};  // null when tie_word_embeddings
  LlavaConfig config;
};
TORCH_MODULE(LlavaForConditionalGeneration);

// HF's ForCausalLMLoss: logits[:, t] scored against labels[:, t+1], fp32, mean over labels != -100.
// logits [B,T,V], labels [B,T] int64. Returns a 0-d fp32 tensor.
torch::Tensor causal_lm_loss(const torch::Tensor& logits, const torch::Tensor& labels);

}  // namespace llava::model
