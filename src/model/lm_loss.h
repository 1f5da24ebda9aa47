// The causal-LM training loss without the logits nobody scores. HF computes lm_head over every position
// ([B,T,V]), but in LLaVA training most positions are image rows and prompt tokens whose labels are -100:
// only the answer tokens are scored. Selecting those hidden states before lm_head cuts its matmuls, the
// softmax and the [B,T,V] logits (+ their gradient) to the scored rows; the loss is the same mean.
#pragma once
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

}  // namespace llava::model
