// Our own exact-resume state, kept in checkpoint-N/ next to HF's files (HF tools ignore them):
//   llava_resume.json                  what the run was: trainable names and shapes, LoRA settings, dtype,
//                                      samples per optimizer step, world size, ZeRO stage; where the data
//                                      and the log average in progress stand
//   llava_rng_state.safetensors        every rank's CPU generator state ("rank_<R>", uint8) and, when the
//                                      run used CUDA, its CUDA generator's ("cuda_rank_<R>"); a checkpoint
//                                      without CUDA states resumes on a GPU too (and the other way round)
//   llava_master_weights.safetensors   fp32 master weights (bf16 runs only; the model files hold bf16)
//   zero_shards/rank_<R>_of_<N>.safetensors   under ZeRO 1/2: rank R's optimizer state by parameter range
//                                      (tensors "<kind>/<param name>/<offset>", the ranges and their steps
//                                      in the metadata), readable by a run with any number of ranks
// HF's rng_state[_<R>].pth are written beside them (checkpoint/hf_rng_state.h) for HF Trainer to resume.
#pragma once
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "checkpoint/optimizer_state.h"

namespace llava::checkpoint {

struct RunSignature {
  std::vector<std::pair<std::string, std::vector<int64_t>>> trainables;  // named_parameters() order
  nlohmann::json lora;                 // {r, lora_alpha, target_modules, use_rslora} or null
  std::string dtype = "float32";       // of the model's weights ("bfloat16" under bf16)
  int64_t samples_per_step = 0;        // global batch x accumulation
  int64_t world_size = 1;
  int64_t zero_stage = 0;
  nlohmann::json sampler;              // {epoch, position} of the next batch
  // The log line in progress, so a resumed run logs what the uninterrupted run logs: the step of the
  // last log line (HF Trainer's _globalstep_last_logged) and the sum of the step losses since. Absent in
  // checkpoints of older versions and of HF Trainer: a resumed run then averages from its first step on,
  // as HF Trainer does.
  struct LogProgress {
    int64_t last_logged_step = 0;
    double loss_since_log = 0;
  };
  std::optional<LogProgress> logging;
};

void write_run_signature(const std::string& dir, const RunSignature& signature);
// nullopt when the checkpoint has none (e.g. written by Python HF Trainer).
std::optional<RunSignature> read_run_signature(const std::string& dir);

// An incompatible difference (trainable set, shapes, LoRA settings, samples per step) is a llava::Error
// naming it; allowed ones (world size, ZeRO stage) come back as lines to log.
std::vector<std::string> check_resume_compatible(const RunSignature& saved, const RunSignature& current,
                                                 const std::string& where);

// The checkpoint's config.json must describe the model being trained (volatile keys such as
// transformers_version aside); otherwise a llava::Error names the first differing key.
void check_same_model(const std::string& checkpoint_dir, const std::string& model_dir);

// The default CPU generator's state (torch.get_rng_state()) and its restore.
torch::Tensor cpu_rng_state();
void set_cpu_rng_state(const torch::Tensor& state);

// The default CUDA generator of `device` (torch.cuda.get_rng_state(device)) and its restore; only for a
// CUDA device (a CPU-only libtorch throws).
torch::Tensor cuda_rng_state(const torch::Device& device);
void set_cuda_rng_state(const torch::Device& device, const torch::Tensor& state);

// cuda_states_by_rank: empty when the run did not use CUDA.
void write_rng_states(const std::string& dir, const std::vector<torch::Tensor>& states_by_rank,
                      const std::vector<torch::Tensor>& cuda_states_by_rank = {});
// This rank's state; a rank the checkpoint did not have (more ranks now) takes rank 0's state.
// nullopt when the checkpoint has no RNG file.
std::optional<torch::Tensor> read_rng_state(const std::string& dir, int rank);
// The same for the CUDA generator: nullopt when the checkpoint has none (a CPU run's, or HF's).
std::optional<torch::Tensor> read_cuda_rng_state(const std::string& dir, int rank);

void write_zero_shard(const std::string& dir, int rank, int world_size, const std::vector<RangeState>& ranges);
// Every range of every shard file in dir/zero_shards; empty when there is none.
std::vector<RangeState> read_zero_shards(const std::string& dir);

void write_master_weights(const std::string& dir, const std::vector<std::pair<std::string, torch::Tensor>>& weights);
std::vector<std::pair<std::string, torch::Tensor>> read_master_weights(const std::string& dir);

}  // namespace llava::checkpoint
