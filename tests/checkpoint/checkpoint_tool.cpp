// Test tool of the checkpoint oracle tests:
//   checkpoint_tool trainer-state OUT GLOBAL_STEP MAX_STEPS   writes a trainer_state.json
//   checkpoint_tool hf-rng-read DIR RANK CUDA_DEVICE          prints what read_hf_rng_state gives as JSON
//                                                             {"file", "cpu": hex, "cuda": hex or null}
//   checkpoint_tool hf-rng-write DIR SEED WORLD [cuda]        write_hf_rng_states: rank R's CPU state is the
//       generator's after manual_seed(SEED + R) and R + 1 draws; with "cuda" rank R ran on device R with
//       the CUDA state of 16 bytes 4 x (R + 1) (a Philox offset libtorch accepts: a multiple of 4)
#include <iostream>
#include <mutex>

#include <ATen/CPUGeneratorImpl.h>

#include <torch/torch.h>

#include "checkpoint/checkpoint_dir.h"
#include "checkpoint/hf_rng_state.h"
#include "io/error.h"

namespace {

using namespace llava::checkpoint;

int trainer_state(char** argv) {
  TrainerState s;
  s.global_step = std::stoll(argv[3]);
  s.max_steps = std::stoll(argv[4]);
  s.epoch = static_cast<double>(s.global_step) / s.max_steps;
  s.logging_steps = 1;
  s.save_steps = 2;
  s.train_batch_size = 4;
  for (int64_t step = 1; step <= s.global_step; ++step)
    s.log_history.push_back({{"loss", 2.5 - 0.1 * step}, {"grad_norm", 1.25}, {"learning_rate", 1e-3},
                             {"epoch", static_cast<double>(step) / s.max_steps}, {"step", step}});
  write_trainer_state(argv[2], s);
  return 0;
}

std::string hex(const torch::Tensor& t) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  auto bytes = t.contiguous();
  for (int64_t i = 0; i < bytes.numel(); ++i) {
    const uint8_t b = bytes.data_ptr<uint8_t>()[i];
    out += digits[b >> 4];
    out += digits[b & 15];
  }
  return out;
}

int hf_rng_read(char** argv) {
  auto state = read_hf_rng_state(argv[2], std::stoi(argv[3]), std::stoi(argv[4]));
  if (!state) {
    std::cout << "null\n";
    return 0;
  }
  std::cout << "{\"file\": \"" << state->file << "\", \"cpu\": \"" << hex(state->cpu) << "\", \"cuda\": "
            << (state->cuda ? "\"" + hex(*state->cuda) + "\"" : std::string("null")) << "}\n";
  return 0;
}

int hf_rng_write(int argc, char** argv) {
  const uint64_t seed = std::stoull(argv[3]);
  const int world = std::stoi(argv[4]);
  const bool cuda = argc == 6 && std::string(argv[5]) == "cuda";
  std::vector<torch::Tensor> cpu, cuda_states;
  std::vector<int64_t> devices;
  for (int r = 0; r < world; ++r) {
    torch::manual_seed(seed + r);
    torch::rand({r + 1});
    auto generator = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(generator.mutex());
    cpu.push_back(generator.get_state());
    if (cuda) {
      cuda_states.push_back(torch::full({16}, 4 * (r + 1), torch::kUInt8));
      devices.push_back(r);
    }
  }
  write_hf_rng_states(argv[2], seed, cpu, cuda_states, devices);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string command = argc > 1 ? argv[1] : "";
  try {
    if (command == "trainer-state" && argc == 5) return trainer_state(argv);
    if (command == "hf-rng-read" && argc == 5) return hf_rng_read(argv);
    if (command == "hf-rng-write" && (argc == 5 || argc == 6)) return hf_rng_write(argc, argv);
  } catch (const llava::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  std::cerr << "usage: llava_checkpoint_tool trainer-state OUT GLOBAL_STEP MAX_STEPS | hf-rng-read DIR RANK "
               "CUDA_DEVICE | hf-rng-write DIR SEED WORLD [cuda]\n";
  return 2;
}
