// HF Trainer's rng_state.pth (one process) / rng_state_<R>.pth (rank R): {"python": random.getstate(),
// "numpy": np.random.get_state(), "cpu": torch.get_rng_state() [, "cuda"]}, a torch.save zip that
// Trainer._load_rng_state loads (torch.load(weights_only=True) under its numpy safe_globals()).
// "cuda": HF saves torch.cuda.random.get_rng_state_all() (a list, one state per visible device) in a
// distributed run and torch.cuda.random.get_rng_state() (one tensor, the current device's) otherwise, and
// restores them with set_rng_state_all / set_rng_state, i.e. entry d to device d.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace llava::checkpoint {

struct HfRngState {
  std::string file;                  // the file read
  torch::Tensor cpu;                 // torch.get_rng_state() (uint8)
  std::optional<torch::Tensor> cuda; // the state for the CUDA device asked for, when the file has one
};

// Rank `rank`'s states of checkpoint `dir`: rng_state_<rank>.pth, else rng_state.pth; a rank the checkpoint
// did not have (more ranks now) takes rank 0's. `cuda_device` >= 0: also that device's CUDA generator state
// (the "cuda" tensor, or entry `cuda_device` of the "cuda" list; none when the list is shorter or the file
// has no "cuda"). nullopt when the checkpoint has no such file. The Python and NumPy states are parsed and
// ignored. A file that is not HF's layout is a llava::Error naming it and the key.
std::optional<HfRngState> read_hf_rng_state(const std::string& dir, int rank, int cuda_device = -1);

// What we write for the Python and NumPy generators, which our trainer never draws from: the states HF's
// set_seed(seed) leaves them in, i.e. what a Python run that drew nothing from them would save.
//   python: random.seed(seed) = MT19937 init_by_array(the seed's 32-bit words, low first; [0] for 0), as
//           random.getstate(): (3, (624 state words..., 624), None);
//   numpy:  np.random.seed(seed) = MT19937 init_genrand(seed) (NumPy's legacy seeding; it takes seeds below
//           2^32 only, so a larger seed's low 32 bits are used), as np.random.get_state():
//           ('MT19937', uint32 ndarray[624], 624, 0, 0.0).
std::vector<uint32_t> mt19937_init_genrand(uint32_t seed);
std::vector<uint32_t> mt19937_init_by_array(const std::vector<uint32_t>& key);

// The state torch.cuda.manual_seed_all(seed) leaves a CUDA generator in (Philox: seed, offset 0; 16 bytes).
torch::Tensor cuda_seeded_rng_state(uint64_t seed);

// Writes HF's rng files into `dir` for a run of cpu_by_rank.size() ranks: rng_state.pth for one rank,
// rng_state_<R>.pth for each rank R otherwise, each with HF's keys: python and numpy as seeded (above), cpu
// = that rank's torch CPU generator state. When the run was on CUDA (cuda_by_rank non-empty, with each
// rank's device index), "cuda" as HF writes it: one rank, the state tensor; several, a list of
// cuda_device_by_rank[R] + 1 states, the rank's own at its device's index, the devices before it as
// HF's set_seed left them (the rank never drew from them).
void write_hf_rng_states(const std::string& dir, uint64_t seed, const std::vector<torch::Tensor>& cpu_by_rank,
                         const std::vector<torch::Tensor>& cuda_by_rank = {},
                         const std::vector<int64_t>& cuda_device_by_rank = {});

}  // namespace llava::checkpoint
