#include "model/llava.h"

#include "io/error.h"

namespace llava::model {

LlavaProjectorImpl::LlavaProjectorImpl(const LlavaConfig& c, const torch::TensorOptions& options)
    : act(c.projector_hidden_act) {
  linear_1 = register_module(
      "linear_1", Linear(c.projector_in_features(), c.text.hidden_size, c.multimodal_projector_bias, options));
  linear_2 = register_module(
      "linear_2", Linear(c.text.hidden_size, c.text.hidden_size, c.multimodal_projector_bias, options));
}

torch::Tensor LlavaProjectorImpl::forward(const torch::Tensor& features) {
  return linear_2(activation(act, linear_1(features)));
}

LlavaModelImpl::LlavaModelImpl(const LlavaConfig& c, const torch::TensorOptions& options) : config(c) {
  vision_tower = register_module("vision_tower", ClipVisionModel(c.vision, options));
  multi_modal_projector = register_module("multi_modal_projector", LlavaProjector(c, options));
  language_model = register_module("language_model", LlamaModel(c.text, options));
}

torch::Tensor LlavaModelImpl::image_features(const torch::Tensor& pixel_values) {
  auto states = vision_tower->vision_model->hidden_states(pixel_values, config.vision_feature_layers);
  if (config.vision_feature_select_strategy == "default")
    for (auto& s : states) s = s.narrow(1, 1, s.size(1) - 1);  // drop CLS
  auto selected = states.size() == 1 ? states[0] : torch::cat(states, -1);  // [N,P,D*layers]
  return multi_modal_projector(selected);
}

torch::Tensor to_device_without_waiting(const torch::Tensor& t, const torch::Device& device) {
  if (t.device() == device) return t;
  return (t.is_pinned() ? t : t.pin_memory()).to(device, /*non_blocking=*/true);
}

torch::Tensor LlavaModelImpl::image_rows(const torch::Tensor& input_ids) const {
  return input_ids.eq(config.image_token_index).reshape({-1}).nonzero().squeeze(1);
}

torch::Tensor LlavaModelImpl::input_embeddings(const torch::Tensor& input_ids, const torch::Tensor& pixel_values,
                                               const torch::Tensor& known_image_rows) {
  if (input_ids.dim() != 2) fail("input_ids", "expected [B,T], got " + c10::str(input_ids.sizes()));
  const int64_t b = input_ids.size(0), t = input_ids.size(1);
  // Image slots are overwritten below; embed a valid id there (the original LLaVA marker -200 is no row).
  auto embeds = language_model->embed_tokens(input_ids.masked_fill(input_ids == config.image_token_index, 0));  // [B,T,H]
  auto rows = known_image_rows.defined() ? to_device_without_waiting(known_image_rows, input_ids.device())
                                         : image_rows(input_ids);
  const int64_t slots = rows.size(0);  // [S]
  if (!pixel_values.defined()) {
    if (slots != 0)
      fail("input_ids", std::to_string(slots) + " image tokens (id " + std::to_string(config.image_token_index) +
                            ") but no pixel_values");
    return embeds;
  }
  auto features = image_features(pixel_values);  // [N,P,H]
  if (slots != features.size(0) * features.size(1))
    fail("input_ids", "image features and image tokens do not match: " + std::to_string(slots) +
                          " tokens with id " + std::to_string(config.image_token_index) + ", but " +
                          std::to_string(features.size(0)) + " images x " + std::to_string(features.size(1)) +
                          " features");
  // HF's masked_scatter, as a copy to the rows: the same values, and a backward without masked_select,
  // which must wait for the device to learn its output size.
  const int64_t hidden = embeds.size(-1);
  return embeds.reshape({b * t, hidden})
      .index_copy(0, rows, features.reshape({slots, hidden}).to(embeds.scalar_type()))
      .view({b, t, hidden});
}

LlavaForConditionalGenerationImpl::LlavaForConditionalGenerationImpl(const LlavaConfig& c,
                                                                     const torch::TensorOptions& options)
    : config(c) {
  model = register_module("model", LlavaModel(c, options));
  if (!c.tie_word_embeddings)
    lm_head = register_module("lm_head", Linear(c.text.hidden_size, c.text.vocab_size, false, options));
}

void LlavaForConditionalGenerationImpl::set_gradient_checkpointing(bool enabled) {
  model->vision_tower->vision_model->gradient_checkpointing = enabled;
  model->language_model->gradient_checkpointing = enabled;
}

torch::Tensor LlavaForConditionalGenerationImpl::lm_head_weight() const {
  return lm_head ? lm_head->weight : model->language_model->embed_tokens->weight;
}

torch::Tensor LlavaForConditionalGenerationImpl::forward(const torch::Tensor& input_ids,
                                                         const torch::Tensor& attention_mask,
                                                         const torch::Tensor& pixel_values, KVCache* cache,
                                                         const torch::Tensor& position_ids) {
  auto embeds = model->input_embeddings(input_ids, pixel_values);
  auto hidden = model->language_model->forward(embeds, attention_mask, position_ids, cache);  // [B,T,H]
  return lm_head ? lm_head(hidden) : torch::nn::functional::linear(hidden, lm_head_weight());
}

torch::Tensor causal_lm_loss(const torch::Tensor& logits, const torch::Tensor& labels) {
  if (labels.sizes() != logits.sizes().slice(0, 2))
    fail("labels", "expected " + c10::str(logits.sizes().slice(0, 2)) + ", got " + c10::str(labels.sizes()));
  auto shifted = torch::constant_pad_nd(labels.to(torch::kInt64), {0, 1}, -100).narrow(1, 1, labels.size(1));
  return torch::nn::functional::cross_entropy(
      logits.to(torch::kFloat32).reshape({-1, logits.size(-1)}), shifted.reshape({-1}),
      torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100));
}

}  // namespace llava::model
