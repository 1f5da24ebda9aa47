// HF Trainer's rng_state.pth (one process) / rng_state_<R>.pth (rank R): {"python": random.getstate(),
// "numpy": np.random.get_state(), "cpu": torch.get_rng_state() [, "cuda"/"mps"/...]}. Only the torch CPU
// generator's state is used (LoRA dropout draws from it); the Python and NumPy states are read and ignored.
#pragma once
#include <optional>
#include <string>

#include <torch/torch.h>

namespace llava::checkpoint {

// Rank `rank`'s torch CPU generator state (uint8) of checkpoint `dir`: rng_state_<rank>.pth, else
// rng_state.pth; a rank the checkpoint did not have (more ranks now) takes rank 0's. nullopt when the
// checkpoint has no such file. A file that is not HF's layout is a llava::Error naming it.
std::optional<torch::Tensor> read_hf_cpu_rng_state(const std::string& dir, int rank);

}  // namespace llava::checkpoint
