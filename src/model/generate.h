// Autoregressive generation with a KV cache: one prefill over the prompt (with the images), then one
// token per step. Greedy by default; temperature + top-p sampling with a seeded generator.
#pragma once
#include <cstdint>
#include <functional>
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
// EOS included.
torch::Tensor generate(LlavaForConditionalGeneration& model, const torch::Tensor& input_ids,
                       const torch::Tensor& attention_mask, const torch::Tensor& pixel_values,
                       const GenerationOptions& options,
                       const std::function<void(const torch::Tensor&)>& on_step = {});

// HF's TopPLogitsWarper: keep the smallest set of most likely tokens whose probability reaches top_p
// (always at least one); the rest get -inf. logits [B,V] fp32.
torch::Tensor top_p_filter(const torch::Tensor& logits, double top_p);

}  // namespace llava::model
