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

}  // namespace

torch::Tensor scored_causal_lm_loss(LlavaForConditionalGeneration& model, const torch::Tensor& input_ids,
                                    const torch::Tensor& attention_mask, const torch::Tensor& pixel_values,
                                    const torch::Tensor& labels) {
  if (labels.sizes() != input_ids.sizes())
    fail("labels", "expected " + c10::str(input_ids.sizes()) + ", got " + c10::str(labels.sizes()));
  auto embeds = model->model->input_embeddings(input_ids, pixel_values);
  const int64_t T = labels.size(1);
  // Position t predicts labels[:, t+1]; the last position predicts nothing.
  auto targets = torch::constant_pad_nd(labels.to(torch::kInt64), {0, 1}, -100).narrow(1, 1, T).reshape({-1});  // [B*T]
  auto scored = targets.ne(-100).nonzero().squeeze(1);  // [N]
  auto& llm = model->model->language_model;
  auto lm_head = [&](const torch::Tensor& rows) {  // [N,H] -> [N,V]
    return model->lm_head ? model->lm_head(rows) : torch::nn::functional::linear(rows, model->lm_head_weight());
  };
  if (scored.numel() == 0) {
    // No token to score: a zero loss that still reaches every weight, lm_head too (through its 0 rows), as
    // HF's loss over all logits does, so every trainable gets its (zero) gradient in the backward pass
    // (ZeRO 2 reduces a bucket once all its gradients arrived; a missing one would hold up the rest).
    auto hidden = llm->forward(embeds, attention_mask, {}, nullptr);  // [B,T,H]
    auto no_logits = lm_head(hidden.reshape({-1, hidden.size(-1)}).narrow(0, 0, 0));  // [0,V]
    return (hidden.sum() * 0.0).to(torch::kFloat32) + no_logits.sum().to(torch::kFloat32);
  }
  if (draws_random_numbers(*llm)) {  // the whole last layer, as HF runs it: its dropout masks are HF's
    auto hidden = llm->forward(embeds, attention_mask, {}, nullptr);  // [B,T,H]
    auto logits = lm_head(hidden.reshape({-1, hidden.size(-1)}).index_select(0, scored));
    return torch::nn::functional::cross_entropy(logits.to(torch::kFloat32), targets.index_select(0, scored));
  }
  auto logits = lm_head(llm->forward_rows(embeds, attention_mask, scored));  // [N,V]
  return torch::nn::functional::cross_entropy(logits.to(torch::kFloat32), targets.index_select(0, scored));
}

}  // namespace llava::model
