// The causal-LM training loss without the logits nobody scores. HF computes lm_head over every position
// ([B,T,V]), but in LLaVA training most positions are image rows and prompt tokens whose labels are -100:
// only the answer tokens are scored. Selecting those hidden states before lm_head cuts its matmuls, the
// softmax and the [B,T,V] logits (+ their gradient) to the scored rows; the loss is the same mean.
#pragma once
#include <vector>

#include <torch/torch.h>

#include "model/llava.h"

namespace llava::model {

// Mean token loss of HF's ForCausalLMLoss (logits[:, t] against labels[:, t+1], fp32, labels != -100),
// equal to causal_lm_loss(model->forward(input_ids, attention_mask, pixel_values), labels), computing
// lm_head only at scored positions. input_ids/labels [B,T] int64, attention_mask [B,T] or undefined,
// pixel_values [N,3,H,W] or undefined. No scored token: 0 that still depends on the model (a backward
// through it gives zero gradients), where HF's mean would be nan.
torch::Tensor scored_causal_lm_loss(LlavaForConditionalGeneration& model, const torch::Tensor& input_ids,
                                    const torch::Tensor& attention_mask, const torch::Tensor& pixel_values,
                                    const torch::Tensor& labels);

// A batch's data-dependent shapes: which positions are scored, how many per row, how many image slots,
// whether some query row has no key (left padding). Computed on the host from the host batch, they spare
// a GPU step every wait for the device to learn a shape (each would stall the host until the device
// caught up). `scored` stays on the host; the loss moves it to the device.
struct BatchLayout {
  torch::Tensor scored;                 // [N] int64: flat positions b*T+t with labels[b,t+1] != -100, ascending
  std::vector<int64_t> scored_per_row;  // [B]: how many of them fall in row b
  torch::Tensor image_rows;             // [S] int64: flat positions of the image tokens, ascending
  bool every_query_sees_a_key = true;   // no row starts with padding (attention_mask[b,0] != 0 for all b)
};

// From the tensors where they are (free on the CPU; on a GPU it reads them back).
// input_ids/labels [B,T], attention_mask [B,T] or undefined.
BatchLayout batch_layout(const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                         const torch::Tensor& labels, int64_t image_token_index);

// The same loss with the layout given: the tensors may be on the device, the layout is the host's.
torch::Tensor scored_causal_lm_loss(LlavaForConditionalGeneration& model, const torch::Tensor& input_ids,
                                    const torch::Tensor& attention_mask, const torch::Tensor& pixel_values,
                                    const torch::Tensor& labels, const BatchLayout& layout);

}  // namespace llava::model
