// The tiny LLaVA the C++ unit tests build: CLIP 2 layers (8 px, 4 patches -> 4 image tokens), a Llama
// of width 16 with GQA (4 heads, 2 KV heads), vocabulary 40 with image token 39.
#pragma once
#include "model/config.h"

namespace llava::test {

inline model::LlavaConfig tiny_llava_config(int64_t text_layers = 2) {
  model::LlavaConfig c;
  c.vision.hidden_size = 16;
  c.vision.intermediate_size = 24;
  c.vision.num_hidden_layers = 2;
  c.vision.num_attention_heads = 2;
  c.vision.image_size = 8;
  c.vision.patch_size = 4;
  c.text.vocab_size = 40;
  c.text.hidden_size = 16;
  c.text.intermediate_size = 24;
  c.text.num_hidden_layers = text_layers;
  c.text.num_attention_heads = 4;
  c.text.num_key_value_heads = 2;
  c.text.head_dim = 4;
  c.image_token_index = 39;
  c.vision_feature_layers = {-1};
  return c;
}

}  // namespace llava::test
