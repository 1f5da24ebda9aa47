// The numbers a resume takes from a checkpoint's files, checked the same way whatever file format they come
// from (optimizer.pt, DeepSpeed's partitions, our zero_shards/ and master weights, the trained weights,
// generator states): a poisoned value (a NaN moment, a negative step) would otherwise train on and end up
// in the next checkpoint, which auto-resume then takes as the newest. Each fault is one llava::Error naming
// the file and the tensor or parameter.
#pragma once
#include <cstdint>
#include <string>

#include <torch/torch.h>

namespace llava::checkpoint {

// An Adam `step` read from `file` (torch keeps it as a float tensor): a finite whole number from 1 to
// kMaxStep, else an Error naming `file` and `what` (e.g. "state[0][\"step\"] of 'x.weight'").
int64_t adam_step_from(double value, const std::string& file, const std::string& what);

// Adam's moments: exp_avg finite, exp_avg_sq finite and >= 0 (a sum of squares).
void check_adam_moments(const torch::Tensor& exp_avg, const torch::Tensor& exp_avg_sq, const std::string& file,
                        const std::string& what);

// Weights (fp32 masters, trained tensors): every value finite.
void check_finite_weights(const torch::Tensor& weights, const std::string& file, const std::string& what);

// A parameter took at most one update per optimizer step: step <= global_step of trainer_state.json.
void check_step_at_most(int64_t step, int64_t global_step, const std::string& file, const std::string& what,
                        const std::string& trainer_state_file);

// A CPU generator state (torch.get_rng_state()) from `file`: libtorch accepts it (its mt19937 state is
// valid), else an Error naming `file` and `tensor` instead of libtorch's bare "Invalid mt19937 state".
void check_cpu_generator_state(const torch::Tensor& state, const std::string& file, const std::string& tensor);

// A CUDA generator state (torch.cuda.get_rng_state()): 16 bytes, the seed and the Philox offset, which
// libtorch's set_state wants a multiple of 4; checked here so that a CPU-side read names `file` and `tensor`
// instead of libtorch failing bare on the device.
void check_cuda_generator_state(const torch::Tensor& state, const std::string& file, const std::string& tensor);

}  // namespace llava::checkpoint
