#include "model/generate.h"

#include <ATen/CPUGeneratorImpl.h>

#include "io/error.h"

namespace llava::model {

torch::Tensor top_p_filter(const torch::Tensor& logits, double top_p) {
  auto sorted = logits.sort(-1, /*descending=*/false);
  auto sorted_logits = std::get<0>(sorted), sorted_index = std::get<1>(sorted);
  auto cumulative = sorted_logits.softmax(-1).cumsum(-1);  // ascending: the tail is the likely end
  auto remove_sorted = cumulative <= (1.0 - top_p);
  remove_sorted.narrow(-1, remove_sorted.size(-1) - 1, 1).fill_(false);  // keep the most likely token
  auto remove = remove_sorted.scatter(-1, sorted_index, remove_sorted);
  return logits.masked_fill(remove, -std::numeric_limits<float>::infinity());
}

int64_t new_tokens_within_context(int64_t prompt_tokens, int64_t requested, int64_t context, const std::string& where) {
  if (prompt_tokens >= context)
    fail(where, "the prompt is " + std::to_string(prompt_tokens) + " tokens, but the model's context (max_position_embeddings) is " +
                    std::to_string(context) + " tokens, which must hold the prompt and at least one new token");
  return std::min(requested, context - prompt_tokens);
}

namespace {

torch::Tensor next_tokens(const torch::Tensor& last_logits, const GenerationOptions& o, at::Generator& generator) {
  auto logits = last_logits.to(torch::kFloat32);  // [B,V]
  if (o.temperature <= 0.0) return logits.argmax(-1);
  logits = logits / o.temperature;
  if (o.top_p < 1.0) logits = top_p_filter(logits, o.top_p);
  return torch::multinomial(logits.softmax(-1), 1, /*replacement=*/false, generator).squeeze(-1);
}

torch::Tensor positions_from_mask(const torch::Tensor& mask) {
  auto positions = mask.to(torch::kInt64).cumsum(-1) - 1;
  return positions.masked_fill(mask == 0, 0);
}

}  // namespace

torch::Tensor generate(LlavaForConditionalGeneration& model, const torch::Tensor& input_ids,
                       const torch::Tensor& attention_mask, const torch::Tensor& pixel_values,
                       const GenerationOptions& options, const std::function<void(const torch::Tensor&)>& on_step) {
  if (input_ids.dim() != 2 || input_ids.size(1) == 0) fail("input_ids", "expected a non-empty [B,T] prompt");
  if (options.top_p <= 0.0 || options.top_p > 1.0) fail("top_p", "must be in (0, 1]");
  const int64_t max_new_tokens = new_tokens_within_context(input_ids.size(1), options.max_new_tokens,
                                                           model->config.text.max_position_embeddings, "input_ids");
  torch::NoGradGuard no_grad;
  const int64_t batch = input_ids.size(0);
  auto mask = attention_mask.defined() ? attention_mask.to(torch::kInt64) : torch::ones_like(input_ids);
  auto generator = at::make_generator<at::CPUGeneratorImpl>(options.seed);
  auto eos = torch::tensor(options.eos_token_ids.empty() ? std::vector<int64_t>{-1} : options.eos_token_ids);

  KVCache cache;
  auto logits = model->forward(input_ids, mask, pixel_values, &cache, positions_from_mask(mask));  // prefill
  auto finished = torch::zeros({batch}, torch::kBool);
  auto last_position = positions_from_mask(mask).select(1, mask.size(1) - 1);  // [B]
  std::vector<torch::Tensor> produced;
  for (int64_t step = 0; step < max_new_tokens; ++step) {
    auto tokens = next_tokens(logits.select(1, logits.size(1) - 1), options, generator);  // [B]
    tokens = torch::where(finished, torch::full_like(tokens, options.pad_token_id), tokens);
    produced.push_back(tokens);
    if (on_step) on_step(tokens);
    finished = finished | torch::isin(tokens, eos);
    if (finished.all().item<bool>() || step + 1 == max_new_tokens) break;

    mask = torch::cat({mask, torch::ones({batch, 1}, torch::kInt64)}, 1);
    last_position = last_position + 1;
    logits = model->forward(tokens.unsqueeze(1), mask, {}, &cache, last_position.unsqueeze(1));
  }
  return torch::stack(produced, 1);
}

}  // namespace llava::model
