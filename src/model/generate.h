// Autoregressive generation with a KV cache: one prefill over the prompt (with the images), then one
// token per step. Greedy by default; temperature + top-p sampling with a seeded generator.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "model/llava.h"

namespace llava::model {

struct GenerationOptions {
  int64_t max_new_tokens = 128;
  double temperature = 0.0;  // <= 0: greedy (argmax)
  double top_p = 1.0;        // nucleus sampling threshold (only when sampling)
  uint64_t seed = 0;
  std::vector<int64_t> eos_token_ids;  // a sequence stops after emitting one of these
  int64_t pad_token_id = 0;            // emitted by finished sequences while others continue
};

// input_ids [B,T] (left-padded when B > 1), attention_mask [B,T] or undefined, pixel_values [N,3,H,W] or
// undefined. Positions follow HF generate: cumsum(attention_mask) - 1. `on_step` (optional) sees each
// step's new tokens [B] as soon as they exist (streaming). Returns the new tokens [B,n], n <= max_new_tokens,
// EOS included; T + n never exceeds the model's max_position_embeddings (new_tokens_within_context).
torch::Tensor generate(LlavaForConditionalGeneration& model, const torch::Tensor& input_ids,
                       const torch::Tensor& attention_mask, const torch::Tensor& pixel_values,
                       const GenerationOptions& options,
                       const std::function<void(const torch::Tensor&)>& on_step = {});

// How many new tokens fit: min(requested, context - prompt_tokens). A prompt that leaves no room in the
// model's context (max_position_embeddings) is an Error naming `where`, the prompt length and the
// context: a longer sequence is outside what the model was trained for, and its attention would grow
// with the square of the length.
int64_t new_tokens_within_context(int64_t prompt_tokens, int64_t requested, int64_t context, const std::string& where);

// HF's TopPLogitsWarper: keep the smallest set of most likely tokens whose probability reaches top_p
// (always at least one); the rest get -inf. logits [B,V] fp32.
torch::Tensor top_p_filter(const torch::Tensor& logits, double top_p);

}  // namespace llava::model
