#include "checkpoint/state_checks.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <cstring>
#include <sstream>

#include "checkpoint/checkpoint_dir.h"
#include "io/error.h"

namespace llava::checkpoint {

namespace {

std::string number_text(double v) {
  std::ostringstream out;
  out << v;
  return out.str();
}

}  // namespace

int64_t adam_step_from(double value, const std::string& file, const std::string& what) {
  // Compared as doubles first: converting NaN or 1e30 to an integer is undefined.
  if (!std::isfinite(value) || value != std::floor(value) || value < 1 || value > static_cast<double>(kMaxStep))
    fail(file, what + " is " + number_text(value) + ": expected a whole number of updates from 1 to " +
                   std::to_string(kMaxStep) + "; nothing was changed");
  return static_cast<int64_t>(value);
}

void check_adam_moments(const torch::Tensor& exp_avg, const torch::Tensor& exp_avg_sq, const std::string& file,
                        const std::string& what) {
  if (!torch::isfinite(exp_avg).all().item<bool>())
    fail(file, "exp_avg of " + what + " holds non-finite values (NaN or Inf); nothing was changed");
  if (!torch::isfinite(exp_avg_sq).all().item<bool>())
    fail(file, "exp_avg_sq of " + what + " holds non-finite values (NaN or Inf); nothing was changed");
  if ((exp_avg_sq < 0).any().item<bool>())
    fail(file, "exp_avg_sq of " + what + " holds negative values (it is a mean of squares); nothing was changed");
}

void check_finite_weights(const torch::Tensor& weights, const std::string& file, const std::string& what) {
  if (!torch::isfinite(weights).all().item<bool>())
    fail(file, what + " holds non-finite values (NaN or Inf); nothing was changed");
}

void check_step_at_most(int64_t step, int64_t global_step, const std::string& file, const std::string& what,
                        const std::string& trainer_state_file) {
  if (step > global_step)
    fail(file, what + " is " + std::to_string(step) + " updates, more than global_step " +
                   std::to_string(global_step) + " in " + trainer_state_file + "; nothing was changed");
}

void check_cpu_generator_state(const torch::Tensor& state, const std::string& file, const std::string& tensor) {
  auto scratch = at::make_generator<at::CPUGeneratorImpl>();  // never the run's own generator
  try {
    std::lock_guard<std::mutex> lock(scratch.mutex());
    scratch.set_state(state);
  } catch (const c10::Error& e) {
    fail(file, "'" + tensor + "' is not a valid CPU generator state (torch.get_rng_state()): " +
                   e.what_without_backtrace() + "; nothing was changed");
  }
}

void check_cuda_generator_state(const torch::Tensor& state, const std::string& file, const std::string& tensor) {
  constexpr int64_t kBytes = 16;  // uint64 seed, int64 Philox offset (little-endian)
  if (state.scalar_type() != torch::kUInt8 || state.dim() != 1 || state.numel() != kBytes)
    fail(file, "'" + tensor + "' is not a CUDA generator state (torch.cuda.get_rng_state()): expected uint8 [16], got " +
                   std::string(c10::toString(state.scalar_type())) + " " + c10::str(state.sizes()));
  int64_t offset = 0;
  std::memcpy(&offset, state.contiguous().data_ptr<uint8_t>() + 8, sizeof(offset));
  if (offset < 0 || offset % 4 != 0)
    fail(file, "'" + tensor + "' is not a valid CUDA generator state: its Philox offset " + std::to_string(offset) +
                   " is not a non-negative multiple of 4; nothing was changed");
}

}  // namespace llava::checkpoint
