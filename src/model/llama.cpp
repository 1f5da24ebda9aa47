#include "model/llama.h"

#include <cmath>

#include <limits>

#include "io/error.h"
#include "model/checkpointing.h"
#include "model/layers.h"

namespace llava::model {

Rope::Rope(const TextConfig& c) {
  // HF: 1 / theta^(arange(0, d, 2).float() / d), all in fp32.
  auto exponents = torch::arange(0, c.head_dim, 2, torch::kInt64).to(torch::kFloat32) / c.head_dim;
  inv_freq = 1.0 / torch::pow(c.rope_theta, exponents);
  if (c.rope_type == "linear") inv_freq = inv_freq / c.rope_factor;
}

std::pair<torch::Tensor, torch::Tensor> Rope::tables(const torch::Tensor& position_ids, c10::ScalarType dtype) const {
  auto freqs = position_ids.to(torch::kFloat32).unsqueeze(-1) * inv_freq.to(position_ids.device());  // [B,T,D/2]
  auto emb = torch::cat({freqs, freqs}, -1);                                                      // [B,T,D]
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  int64_t half = x.size(-1) / 2;
  auto rotated = torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1);
}

LlamaAttentionImpl::LlamaAttentionImpl(const TextConfig& c, const torch::TensorOptions& options)
    : num_heads(c.num_attention_heads), num_kv_heads(c.num_key_value_heads), head_dim(c.head_dim) {
  q_proj = register_module("q_proj", Linear(c.hidden_size, num_heads * head_dim, c.attention_bias, options));
  k_proj = register_module("k_proj", Linear(c.hidden_size, num_kv_heads * head_dim, c.attention_bias, options));
  v_proj = register_module("v_proj", Linear(c.hidden_size, num_kv_heads * head_dim, c.attention_bias, options));
  o_proj = register_module("o_proj", Linear(num_heads * head_dim, c.hidden_size, c.attention_bias, options));
}

// [B,kv,S,D] -> [B,kv*n_rep,S,D]: kv head j serves query heads j*n_rep .. j*n_rep+n_rep-1.
static torch::Tensor repeat_kv(const torch::Tensor& x, int64_t n_rep) {
  if (n_rep == 1) return x;
  auto s = x.sizes();
  return x.unsqueeze(2).expand({s[0], s[1], n_rep, s[2], s[3]}).reshape({s[0], s[1] * n_rep, s[2], s[3]});
}

torch::Tensor LlamaAttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                                          const AttentionMask& mask, KVCache* cache, size_t layer_index) {
  int64_t b = x.size(0), t = x.size(1);
  auto heads = [&](const torch::Tensor& y, int64_t n) { return y.view({b, t, n, head_dim}).transpose(1, 2); };
  auto q = apply_rope(heads(q_proj(x), num_heads), cos, sin);     // [B,h,T,d]
  auto k = apply_rope(heads(k_proj(x), num_kv_heads), cos, sin);  // [B,kv,T,d]
  auto v = heads(v_proj(x), num_kv_heads);
  if (cache) {
    if (cache->keys.size() <= layer_index) {
      cache->keys.resize(layer_index + 1);
      cache->values.resize(layer_index + 1);
    }
    auto& ck = cache->keys[layer_index];
    auto& cv = cache->values[layer_index];
    if (ck.defined()) {
      k = torch::cat({ck, k}, 2);
      v = torch::cat({cv, v}, 2);
    }
    ck = k;
    cv = v;
  }
  int64_t n_rep = num_heads / num_kv_heads;
  auto out = attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask.additive,
                               1.0 / std::sqrt(static_cast<double>(head_dim)));  // [B,h,T,d]
  if (mask.live_rows.defined()) out = out.masked_fill(mask.live_rows.logical_not(), 0);
  return o_proj(out.transpose(1, 2).reshape({b, t, num_heads * head_dim}));
}

torch::Tensor LlamaAttentionImpl::forward_rows(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                                               const AttentionMask& mask, const torch::Tensor& rows,
                                               const std::vector<int64_t>& rows_per_element) {
  const int64_t b = x.size(0), t = x.size(1), n = rows.size(0);
  auto heads = [&](const torch::Tensor& y, int64_t count) { return y.view({b, t, count, head_dim}).transpose(1, 2); };
  auto pick = [&](const torch::Tensor& y) { return y.reshape({b * t, y.size(-1)}).index_select(0, rows); };  // [N,*]
  auto k = apply_rope(heads(k_proj(x), num_kv_heads), cos, sin);  // [B,kv,T,d]
  auto v = heads(v_proj(x), num_kv_heads);                          // [B,kv,T,d]
  // The N queries as one sequence of batch 1, each rotated by its own position: [1,h,N,d].
  auto q = q_proj(pick(x)).view({1, n, num_heads, head_dim}).transpose(1, 2);
  q = apply_rope(q, pick(cos).unsqueeze(0), pick(sin).unsqueeze(0));
  // Rows are ascending, so each batch element's rows are one run; they see that element's keys only.
  const auto position = rows - torch::div(rows, t, "floor") * t;
  const int64_t n_rep = num_heads / num_kv_heads;
  std::vector<torch::Tensor> outs;  // [1,h,n_i,d] each
  for (int64_t i = 0, first = 0; i < b; ++i) {
    const int64_t count = rows_per_element[i];
    if (count == 0) continue;
    const auto pos = position.narrow(0, first, count);
    auto out = attention(q.narrow(2, first, count), repeat_kv(k.narrow(0, i, 1), n_rep),
                                 repeat_kv(v.narrow(0, i, 1), n_rep), mask.additive.narrow(0, i, 1).index_select(2, pos),
                                 1.0 / std::sqrt(static_cast<double>(head_dim)));
    if (mask.live_rows.defined())
      out = out.masked_fill(mask.live_rows.narrow(0, i, 1).index_select(2, pos).logical_not(), 0);
    outs.push_back(out);
    first += count;
  }
  return o_proj(torch::cat(outs, 2).transpose(1, 2).reshape({n, num_heads * head_dim}));  // [N,H]
}

LlamaMlpImpl::LlamaMlpImpl(const TextConfig& c, const torch::TensorOptions& options) : act(c.hidden_act) {
  gate_proj = register_module("gate_proj", Linear(c.hidden_size, c.intermediate_size, c.mlp_bias, options));
  up_proj = register_module("up_proj", Linear(c.hidden_size, c.intermediate_size, c.mlp_bias, options));
  down_proj = register_module("down_proj", Linear(c.intermediate_size, c.hidden_size, c.mlp_bias, options));
}

torch::Tensor LlamaMlpImpl::forward(const torch::Tensor& x) {
  // gate before up, as HF: the operands of * may be evaluated in any order, and LoRA dropout draws its
  // masks in call order.
  auto gate = activation(act, gate_proj(x));
  return down_proj(gate * up_proj(x));
}

LlamaDecoderLayerImpl::LlamaDecoderLayerImpl(const TextConfig& c, const torch::TensorOptions& options) {
  self_attn = register_module("self_attn", LlamaAttention(c, options));
  mlp = register_module("mlp", LlamaMlp(c, options));
  input_layernorm = register_module("input_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps, options));
  post_attention_layernorm =
      register_module("post_attention_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps, options));
}

torch::Tensor LlamaDecoderLayerImpl::forward(const torch::Tensor& x, const torch::Tensor& cos,
                                             const torch::Tensor& sin, const AttentionMask& mask, KVCache* cache,
                                             size_t layer_index) {
  auto h = x + self_attn(input_layernorm(x), cos, sin, mask, cache, layer_index);
  return h + mlp(post_attention_layernorm(h));
}

torch::Tensor LlamaDecoderLayerImpl::forward_rows(const torch::Tensor& x, const torch::Tensor& cos,
                                                  const torch::Tensor& sin, const AttentionMask& mask,
                                                  const torch::Tensor& rows,
                                                  const std::vector<int64_t>& rows_per_element) {
  auto h = x.reshape({-1, x.size(-1)}).index_select(0, rows) +
           self_attn->forward_rows(input_layernorm(x), cos, sin, mask, rows, rows_per_element);  // [N,H]
  return h + mlp(post_attention_layernorm(h));
}

LlamaModelImpl::LlamaModelImpl(const TextConfig& c, const torch::TensorOptions& options) : rope(c), config(c) {
  embed_tokens = register_module("embed_tokens", Embedding(c.vocab_size, c.hidden_size, c.pad_token_id, options));
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) layers->push_back(LlamaDecoderLayer(c, options));
  register_module("layers", layers);
  norm = register_module("norm", RMSNorm(c.hidden_size, c.rms_norm_eps, options));
}

// torch.finfo(dtype).min: HF's additive mask value.
static double finfo_min(c10::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat32: return std::numeric_limits<float>::lowest();
    case torch::kBFloat16: return -3.3895313892515355e38;
    case torch::kFloat16: return -65504.0;
    case torch::kFloat64: return std::numeric_limits<double>::lowest();
    default: fail("causal_mask", std::string("unsupported dtype ") + c10::toString(dtype));
  }
}

AttentionMask causal_mask(const torch::Tensor& attention_mask, int64_t batch, int64_t query_len, int64_t past_len,
                          c10::ScalarType dtype, torch::Device device, std::optional<bool> every_query_sees_a_key) {
  int64_t key_len = past_len + query_len;
  auto opts = torch::TensorOptions().device(device).dtype(torch::kInt64);
  auto query_pos = torch::arange(past_len, key_len, opts).view({query_len, 1});
  auto key_pos = torch::arange(0, key_len, opts).view({1, key_len});
  auto allowed = (key_pos <= query_pos).view({1, 1, query_len, key_len});  // [1,1,T,S]
  if (attention_mask.defined()) {
    if (attention_mask.dim() != 2 || attention_mask.size(0) != batch || attention_mask.size(1) != key_len)
      fail("attention_mask", "expected [" + std::to_string(batch) + "," + std::to_string(key_len) + "], got " +
                                 c10::str(attention_mask.sizes()));
    allowed = allowed & attention_mask.to(device).to(torch::kBool).view({batch, 1, 1, key_len});
  }
  allowed = allowed.expand({batch, 1, query_len, key_len});
  auto value_opts = torch::TensorOptions().device(device).dtype(dtype);
  AttentionMask mask;
  mask.additive = torch::where(allowed, torch::zeros({}, value_opts), torch::full({}, finfo_min(dtype), value_opts));
  // A query row with no key to see (left padding) gets softmax of all -inf-like values; HF zeroes it.
  // Known on the host, or read here (on a GPU, a wait for the device).
  if (every_query_sees_a_key == true) return mask;
  auto live = allowed.any(-1, /*keepdim=*/true);  // [B,1,T,1]
  if (every_query_sees_a_key == false || !live.all().item<bool>()) mask.live_rows = live;
  return mask;
}

torch::Tensor LlamaModelImpl::run_layer(size_t index, const torch::Tensor& h,
                                        const std::function<torch::Tensor(const torch::Tensor&)>& fn, bool recompute) {
  if (!recompute) return fn(h);
  return checkpoint(fn, h, has_trainable_state(*layers->ptr<LlamaDecoderLayerImpl>(index)));
}

torch::Tensor LlamaModelImpl::forward(const torch::Tensor& inputs_embeds, const torch::Tensor& attention_mask,
                                      const torch::Tensor& position_ids, KVCache* cache,
                                      std::optional<bool> every_query_sees_a_key) {
  int64_t b = inputs_embeds.size(0), t = inputs_embeds.size(1);
  int64_t past = cache ? cache->length() : 0;
  auto positions = position_ids.defined()
                       ? position_ids
                       : torch::arange(past, past + t, torch::TensorOptions().dtype(torch::kInt64).device(inputs_embeds.device()))
                             .unsqueeze(0)
                             .expand({b, t});
  auto [cos, sin] = rope.tables(positions, inputs_embeds.scalar_type());
  auto mask = causal_mask(attention_mask, b, t, past, inputs_embeds.scalar_type(), inputs_embeds.device(),
                          every_query_sees_a_key);
  const bool recompute = checkpointing_active(*this, gradient_checkpointing) && cache == nullptr;
  auto h = inputs_embeds;  // [B,T,H]
  for (size_t i = 0; i < layers->size(); ++i) {
    auto layer = layers->ptr<LlamaDecoderLayerImpl>(i);
    // Captured by value: with checkpointing the backward pass replays this after forward() has returned.
    h = run_layer(i, h, [layer, cos = cos, sin = sin, mask, cache, i](const torch::Tensor& x) {
      return layer->forward(x, cos, sin, mask, cache, i);
    }, recompute);
  }
  return norm(h);
}

torch::Tensor LlamaModelImpl::forward_rows(const torch::Tensor& inputs_embeds, const torch::Tensor& attention_mask,
                                           const torch::Tensor& rows, std::vector<int64_t> rows_per_element,
                                           std::optional<bool> every_query_sees_a_key) {
  const int64_t b = inputs_embeds.size(0), t = inputs_embeds.size(1);
  if (rows_per_element.empty()) {  // rows ascending: counted per element (a read of the device)
    auto counts = torch::bincount(torch::div(rows, t, "floor"), {}, b).cpu();
    rows_per_element.assign(counts.data_ptr<int64_t>(), counts.data_ptr<int64_t>() + b);
  }
  if (static_cast<int64_t>(rows_per_element.size()) != b)
    fail("forward_rows", "rows_per_element has " + std::to_string(rows_per_element.size()) + " entries, expected " +
                             std::to_string(b));
  const auto dtype = inputs_embeds.scalar_type();
  const auto device = inputs_embeds.device();
  auto positions = torch::arange(t, torch::TensorOptions().dtype(torch::kInt64).device(device)).unsqueeze(0).expand({b, t});
  auto [cos, sin] = rope.tables(positions, dtype);
  auto mask = causal_mask(attention_mask, b, t, /*past_len=*/0, dtype, device, every_query_sees_a_key);
  const bool recompute = checkpointing_active(*this, gradient_checkpointing);
  if (layers->size() == 0) return norm(inputs_embeds.reshape({b * t, -1}).index_select(0, rows));
  const size_t last = layers->size() - 1;
  auto h = inputs_embeds;  // [B,T,H], then [N,H] after the last layer
  for (size_t i = 0; i <= last; ++i) {
    auto layer = layers->ptr<LlamaDecoderLayerImpl>(i);
    h = run_layer(i, h, [layer, cos = cos, sin = sin, mask, rows, rows_per_element, i, last](const torch::Tensor& x) {
      return i < last ? layer->forward(x, cos, sin, mask, nullptr, i)
                      : layer->forward_rows(x, cos, sin, mask, rows, rows_per_element);
    }, recompute);
  }
  return norm(h);
}

}  // namespace llava::model
