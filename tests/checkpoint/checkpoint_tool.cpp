// Writes a trainer_state.json for the oracle test: checkpoint_tool trainer-state OUT GLOBAL_STEP MAX_STEPS
#include <iostream>

#include "checkpoint/checkpoint_dir.h"

int main(int argc, char** argv) {
  if (argc != 5 || std::string(argv[1]) != "trainer-state") {
    std::cerr << "usage: llava_checkpoint_tool trainer-state OUT GLOBAL_STEP MAX_STEPS\n";
    return 2;
  }
  llava::checkpoint::TrainerState s;
  s.global_step = std::stoll(argv[3]);
  s.max_steps = std::stoll(argv[4]);
  s.epoch = static_cast<double>(s.global_step) / s.max_steps;
  s.logging_steps = 1;
  s.save_steps = 2;
  s.train_batch_size = 4;
  for (int64_t step = 1; step <= s.global_step; ++step)
    s.log_history.push_back({{"loss", 2.5 - 0.1 * step}, {"grad_norm", 1.25}, {"learning_rate", 1e-3},
                             {"epoch", static_cast<double>(step) / s.max_steps}, {"step", step}});
  llava::checkpoint::write_trainer_state(argv[2], s);
  return 0;
}
