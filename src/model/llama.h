// The Llama decoder (HF LlamaModel): embeddings, pre-RMSNorm layers with RoPE + grouped-query attention
// and a gated MLP, final RMSNorm. The lm_head lives in LlavaForConditionalGeneration.
#pragma once
#include <functional>
#include <optional>
#include <vector>

#include <torch/torch.h>

#include "model/config.h"
#include "model/layers.h"
#include "model/linear.h"

namespace llava::model {

// Per-layer keys/values of everything seen so far: [B,kv_heads,S,head_dim] each.
struct KVCache {
  std::vector<torch::Tensor> keys, values;
  int64_t length() const { return keys.empty() || !keys[0].defined() ? 0 : keys[0].size(2); }
};

// RoPE tables for the given positions: cos, sin [B,T,head_dim], computed in fp32 then cast to `dtype`.
struct Rope {
  torch::Tensor inv_freq;  // [head_dim/2] fp32
  explicit Rope(const TextConfig& c);
  std::pair<torch::Tensor, torch::Tensor> tables(const torch::Tensor& position_ids, c10::ScalarType dtype) const;
};

// The decoder's attention mask. `additive` [B,1,T,S] (S = cached + T): 0 where query t may see key s,
// dtype-min elsewhere. `live_rows` [B,1,T,1] bool, defined only when some query sees no key at all (a
// left-padding row): such rows output 0, which is what torch's SDPA (HF's default attention) returns.
struct AttentionMask {
  torch::Tensor additive, live_rows;
};

// q*cos + rotate_half(q)*sin with the half-split convention. x: [B,H,T,D], cos/sin: [B,T,D].
torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);

class LlamaAttentionImpl : public torch::nn::Module {
 public:
  LlamaAttentionImpl(const TextConfig& c, const torch::TensorOptions& options);
  // x [B,T,H]; mask: see AttentionMask; cache appended when given.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const struct AttentionMask& mask, KVCache* cache, size_t layer_index);
  // forward(x, ...).reshape({B*T, H}).index_select(0, rows), computing queries, attention and o_proj for
  // those rows only (keys and values still cover every position). rows [N] int64 ascending, into B*T.
  torch::Tensor forward_rows(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                             const struct AttentionMask& mask, const torch::Tensor& rows,
                             const std::vector<int64_t>& rows_per_element);
  Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  int64_t num_heads, num_kv_heads, head_dim;
};
TORCH_MODULE(LlamaAttention);

class LlamaMlpImpl : public torch::nn::Module {
 public:
  LlamaMlpImpl(const TextConfig& c, const torch::TensorOptions& options);
  torch::Tensor forward(const torch::Tensor& x);  // down(act(gate(x)) * up(x))
  Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
  std::string act;
};
TORCH_MODULE(LlamaMlp);

class LlamaDecoderLayerImpl : public torch::nn::Module {
 public:
  LlamaDecoderLayerImpl(const TextConfig& c, const torch::TensorOptions& options);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const AttentionMask& mask, KVCache* cache, size_t layer_index);
  // The output at `rows` only ([N,H]; see LlamaAttentionImpl::forward_rows).
  torch::Tensor forward_rows(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                             const AttentionMask& mask, const torch::Tensor& rows,
                             const std::vector<int64_t>& rows_per_element);
  LlamaAttention self_attn{nullptr};
  LlamaMlp mlp{nullptr};
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
};
TORCH_MODULE(LlamaDecoderLayer);

class LlamaModelImpl : public torch::nn::Module {
 public:
  LlamaModelImpl(const TextConfig& c, const torch::TensorOptions& options);

  // inputs_embeds [B,T,H]; attention_mask [B,S] (1 = token, 0 = padding; S = cached + T) or undefined;
  // position_ids [B,T] or undefined (= arange from the cache length, like HF's forward).
  // Returns the final-normed hidden states [B,T,H].
  // every_query_sees_a_key: whether each query row has a key it may attend to, when the caller knows it
  // on the host (unset: read from the mask, which on a GPU waits for the device).
  torch::Tensor forward(const torch::Tensor& inputs_embeds, const torch::Tensor& attention_mask,
                        const torch::Tensor& position_ids, KVCache* cache,
                        std::optional<bool> every_query_sees_a_key = std::nullopt);
  // forward(inputs_embeds, attention_mask, {}, nullptr).reshape({B*T, H}).index_select(0, rows) -> [N,H],
  // rows [N] int64 ascending into the flattened B*T positions. Attention is causal, so nothing downstream
  // of the last layer's keys and values mixes positions: that layer runs its queries, attention, o_proj
  // and MLP, and the final norm, for the N rows only. Training scores few positions (the answers), so
  // this skips most of the last layer.
  // rows_per_element [B]: how many of `rows` fall in each batch element, and every_query_sees_a_key, when
  // the caller knows them on the host (empty / unset: computed from the tensors, waiting for the device).
  torch::Tensor forward_rows(const torch::Tensor& inputs_embeds, const torch::Tensor& attention_mask,
                             const torch::Tensor& rows, std::vector<int64_t> rows_per_element = {},
                             std::optional<bool> every_query_sees_a_key = std::nullopt);

  Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers;
  RMSNorm norm{nullptr};
  Rope rope;
  TextConfig config;
  // Recompute each decoder layer in the backward pass (model/checkpointing.h); only in training mode with
  // grad enabled and without a KV cache, like HF.
  bool gradient_checkpointing = false;

 private:
  // Runs `layer` on h, recomputed in backward when activation checkpointing is active.
  torch::Tensor run_layer(size_t index, const torch::Tensor& h, const std::function<torch::Tensor(const torch::Tensor&)>& fn,
                          bool recompute);
};
TORCH_MODULE(LlamaModel);

// Query t may see key s when s <= past + t and key s is not padding. attention_mask [B,S] (1 = token) or
// undefined. every_query_sees_a_key: known on the host (true: no live_rows; false: live_rows set), or unset:
// read from the mask.
AttentionMask causal_mask(const torch::Tensor& attention_mask, int64_t batch, int64_t query_len, int64_t past_len,
                          c10::ScalarType dtype, torch::Device device,
                          std::optional<bool> every_query_sees_a_key = std::nullopt);

}  // namespace llava::model
