// The single-process training recipe: build the model, choose what trains (stage 1 / LoRA / full),
// group parameters like HF Trainer and LLaVATrainer, then loop over batches with gradient accumulation,
// clipping, AdamW and the lr schedule, logging HF-style lines.
#pragma once
#include <iosfwd>
#include <string>
#include <vector>

#include "data/conversation.h"
#include "model/config.h"
#include "train/config.h"

namespace llava::train {

// Debugging / test hooks, not checkpoints (those are the checkpoint module's job).
struct TrainDebugOptions {
  std::string init_lora_from;   // a PEFT adapter dir: LoRA A/B start from its adapter_model.safetensors
  std::string metrics_out;      // JSON: per optimizer step loss, grad_norm, learning_rate, epoch
  std::string save_trainables;  // safetensors: the trainable tensors after the last step (canonical names);
                                // rank R > 0 of a multi-rank run writes <path>.rank<R>
  int64_t stop_after_steps = 0;  // > 0: stop after that optimizer step without the final save (a kill)
  int64_t stop_after_micro_batches = 0;  // > 0: stop after that many backward passes of this run (a kill
                                         // in the middle of an accumulation window)
  bool warn_device_syncs = false;  // CUDA: warn at each host-device wait in a micro-batch's forward/backward
};

// One optimizer step as HF Trainer reports it.
struct StepMetrics {
  int64_t step = 0;           // 1-based optimizer step
  double loss = 0;            // mean token loss over the step's micro-batches (see trainer.cpp)
  double grad_norm = 0;       // global L2 norm before clipping
  double learning_rate = 0;   // lr of this step's update (learning_rate * schedule factor)
  double epoch = 0;           // epochs done + micro-batches seen this epoch / micro-batches per epoch
};

// Runs the whole training described by `cfg`; log lines go to `log`. Returns every step's metrics.
std::vector<StepMetrics> train(const TrainConfig& cfg, const TrainDebugOptions& debug, std::ostream& log);

// After train() returned: the signal that made it save and stop early (save_on_interrupt), or 0. The
// command exits 128 + it, as a process killed by the signal would, so that a launcher or a shell loop
// restarts the unfinished run instead of taking it for done.
int stopped_by_signal();

// How an image appears in the input_ids the model takes: one image-token slot per vision feature row
// (image_token_index for llava-hf configs, LLaVA's -200 for original ones; the model fills the slots).
data::ImageTokens image_tokens_for(const model::LlavaConfig& c);

// Python-repr-like formatting of a double (shortest round-trip digits), for HF-identical log lines.
std::string format_float(double x);

}  // namespace llava::train
