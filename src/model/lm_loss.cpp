#include "model/lm_loss.h"

#include "io/error.h"

namespace llava::model {

namespace {

// Training with an adapter that draws random numbers (LoRA dropout): the row-only last layer would draw
// masks of other shapes than HF's full layer.
bool draws_random_numbers(torch::nn::Module& llm) {
  if (!llm.is_training()) return false;
  for (auto& m : llm.modules(/*include_self=*/false))
    if (auto* linear = m->as<LinearImpl>(); linear && linear->adapter && linear->adapter->draws_random_numbers()) return true;
  return false;
}

// Targets of the flattened positions: position t predicts labels[:, t+1]; the last position predicts nothing.
torch::Tensor shifted_targets(const torch::Tensor& labels) {  // [B,T] -> [B*T]
  const int64_t T = labels.size(1);
  return torch::constant_pad_nd(labels.to(torch::kInt64), {0, 1}, -100).narrow(1, 1, T).reshape({-1});
}

}  // namespace

BatchLayout batch_layout(const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                         const torch::Tensor& labels, int64_t image_token_index) {
  if (labels.dim() != 2 || labels.sizes() != input_ids.sizes())
    fail("labels", "expected " + c10::str(input_ids.sizes()) + ", got " + c10::str(labels.sizes()));
  const int64_t B = labels.size(0), T = labels.size(1);
  BatchLayout layout;
  layout.scored = shifted_targets(labels.cpu()).ne(-100).nonzero().squeeze(1);  // [N]
  auto per_row = torch::bincount(torch::div(layout.scored, T, "floor"), {}, B);  // [B]
  layout.scored_per_row.assign(per_row.data_ptr<int64_t>(), per_row.data_ptr<int64_t>() + B);
  layout.image_rows = input_ids.cpu().eq(image_token_index).reshape({-1}).nonzero().squeeze(1);
  layout.every_query_sees_a_key =
      !attention_mask.defined() || T == 0 || attention_mask.select(1, 0).ne(0).all().item<bool>();
  return layout;
}

torch::Tensor scored_causal_lm_loss(LlavaForConditionalGeneration& model, const torch::Tensor& input_ids,
                                    const torch::Tensor& attention_mask, const torch::Tensor& pixel_values,
                                    const torch::Tensor& labels) {
  return scored_causal_lm_loss(model, input_ids, attention_mask, pixel_values, labels,
                               batch_layout(input_ids, attention_mask, labels, model->config.image_token_index));
}

torch::Tensor scored_causal_lm_loss(LlavaForConditionalGeneration& model, const torch::Tensor& input_ids,
                                    const torch::Tensor& attention_mask, const torch::Tensor& pixel_values,
                                    const torch::Tensor& labels, const BatchLayout& layout) {
  if (labels.sizes() != input_ids.sizes())
    fail("labels", "expected " + c10::str(input_ids.sizes()) + ", got " + c10::str(labels.sizes()));
  auto embeds = model->model->input_embeddings(input_ids, pixel_values, layout.image_rows);
  auto targets = shifted_targets(labels);  // [B*T]
  auto scored = to_device_without_waiting(layout.scored, labels.device());  // [N]
  auto& llm = model->model->language_model;
  const bool keyed = layout.every_query_sees_a_key;
  auto lm_head = [&](const torch::Tensor& rows) {  // [N,H] -> [N,V]
    return model->lm_head ? model->lm_head(rows) : torch::nn::functional::linear(rows, model->lm_head_weight());
  };
  if (scored.numel() == 0) {
    // No token to score: a zero loss that still reaches every weight, lm_head too (through its 0 rows), as
    // HF's loss over all logits does, so every trainable gets its (zero) gradient in the backward pass
    // (ZeRO 2 reduces a bucket once all its gradients arrived; a missing one would hold up the rest).
    auto hidden = llm->forward(embeds, attention_mask, {}, nullptr, keyed);  // [B,T,H]
    auto no_logits = lm_head(hidden.reshape({-1, hidden.size(-1)}).narrow(0, 0, 0));  // [0,V]
    return (hidden.sum() * 0.0).to(torch::kFloat32) + no_logits.sum().to(torch::kFloat32);
  }
  if (draws_random_numbers(*llm)) {  // the whole last layer, as HF runs it: its dropout masks are HF's
    auto hidden = llm->forward(embeds, attention_mask, {}, nullptr, keyed);  // [B,T,H]
    auto logits = lm_head(hidden.reshape({-1, hidden.size(-1)}).index_select(0, scored));
    return torch::nn::functional::cross_entropy(logits.to(torch::kFloat32), targets.index_select(0, scored));
  }
  auto logits = lm_head(llm->forward_rows(embeds, attention_mask, scored, layout.scored_per_row, keyed));  // [N,V]
  return torch::nn::functional::cross_entropy(logits.to(torch::kFloat32), targets.index_select(0, scored));
}

}  // namespace llava::model
