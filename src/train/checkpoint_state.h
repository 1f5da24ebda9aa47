// The trainer's side of its checkpoints: its state handed to src/checkpoint as plain data
// (checkpoint::TrainingState, gathered from every rank where the optimizer is sharded) and a restored
// checkpoint put back into the model, optimizer and generators. Which files hold what is src/checkpoint's.
#pragma once
#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "checkpoint/checkpoint_saver.h"
#include "checkpoint/restore.h"
#include "distributed/communicator.h"
#include "model/weights.h"
#include "train/config.h"
#include "train/lora.h"
#include "train/sharded_adamw.h"

namespace llava::train {

// How this run's checkpoints are written.
checkpoint::SaveOptions save_options(const TrainConfig& cfg, const model::LoadedModel& loaded, bool async);

// Everything checkpoint-<state.global_step> holds (collective: under ZeRO the optimizer is gathered,
// and every rank's generator states always). next_lr_factor: the schedule's factor of the next step.
checkpoint::TrainingState training_state(const TrainConfig& cfg, model::LoadedModel& loaded,
                                         const std::vector<LoraModule>& lora, const LoraConfig& lora_config,
                                         ShardedAdamW& optimizer, dist::Communicator& comm, bool async, const checkpoint::TrainerState& state,
                                         const checkpoint::RunSignature& signature, double next_lr_factor);

// Which trained weights a run's checkpoints hold: LoRA (adapter + projector), the projector only (stage 1),
// or every weight.
checkpoint::TrainingState::Weights weights_kind(const TrainConfig& cfg, const std::vector<LoraModule>& lora);

// Puts the trained weights, the optimizer state and this rank's RNG state of `dir` back (LoRA through
// `load_lora`, which checks the adapter against the config) and logs the allowed differences; returns
// what was read (trainer state, our run signature). Works for a checkpoint of any world size and ZeRO
// stage and for those of Python HF Trainer + PEFT or + DeepSpeed.
checkpoint::Restored restore_training_state(const std::string& dir, const TrainConfig& cfg, model::LoadedModel& loaded,
                                            const std::vector<LoraModule>& lora, ShardedAdamW& optimizer,
                                            const checkpoint::RunSignature& now, int rank,
                                            const std::function<void(const std::string&)>& load_lora, std::ostream& log);

}  // namespace llava::train
