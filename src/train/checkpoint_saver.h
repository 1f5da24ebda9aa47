// Saving checkpoint-N folders (HF Trainer layout plus our exact-resume files, resume_state.h), either in
// the step (synchronous) or with `async_save` in the background: the step then waits only while the
// state is gathered (the collective parts: consolidated optimizer, ZeRO shards, RNG states of every rank)
// and copied into host buffers that are kept and reused from save to save; a background thread
// (checkpoint/async_writer.h) writes the files and commits the folder atomically (the .partial folder and
// rename of checkpoint_dir.h), then rotates. At most one save is in flight: the next save, and the end of
// the run, wait for it. A kill during the background write leaves the previous complete checkpoint the
// newest. A failed background write ends the run at the next step's check, with its error on the rank
// that failed and "failed on another rank" on the others. Every method is collective.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "checkpoint/async_writer.h"
#include "checkpoint/checkpoint_dir.h"
#include "distributed/communicator.h"
#include "model/weights.h"
#include "train/adamw.h"
#include "train/config.h"
#include "train/lora.h"
#include "train/resume_state.h"
#include "train/sharded_adamw.h"

namespace llava::train {

// Host copies of tensors for a background write, one buffer per key kept from save to save (reused while
// shape and dtype stay the same), page-locked when the source is on CUDA.
class HostStaging {
 public:
  // A copy of `t` nothing else will change (for live training state).
  torch::Tensor copy(const std::string& key, const torch::Tensor& t);
  // `t` when it is already a host tensor nothing else holds (freshly gathered), else copy(key, t).
  torch::Tensor host(const std::string& key, const torch::Tensor& t);
  // Waits for the copies from the device (a no-op unless one came from CUDA).
  void wait();

 private:
  std::map<std::string, torch::Tensor> buffers_;
  bool from_cuda_ = false;
};

// Seconds one save held the step (waiting for the previous save's write not counted: that is
// waited_seconds) and, once written, how long its writing took.
struct SaveTiming {
  int64_t step;
  double waited_seconds;   // for the save in flight before it (async; 0 when it had finished)
  double blocked_seconds;  // gathering + staging (async) or gathering + writing (synchronous)
  double write_seconds = -1;  // -1 until the write finished
};

class CheckpointSaver {
 public:
  CheckpointSaver(const TrainConfig& cfg, model::LoadedModel& loaded, const std::vector<LoraModule>& lora,
                  const LoraConfig& lora_config, ShardedAdamW& optimizer, dist::Communicator& comm, bool async);
  ~CheckpointSaver();  // a write in flight is waited for (a kill, of course, leaves it partial)

  // checkpoint-<state.global_step>. next_lr_factor: the schedule's factor of the next step (HF's
  // optimizer.pt / scheduler.pt hold the next step's lr). Waits for the save in flight first.
  void save(const checkpoint::TrainerState& state, const RunSignature& signature, double next_lr_factor);
  // Once per step: a background write that failed ends the run here on every rank (llava::Error).
  void check();
  // Waits for the save in flight; its failure is the error on every rank.
  void finish();

  bool async() const { return async_; }
  const std::vector<SaveTiming>& timings() const { return timings_; }

 private:
  struct Staged;
  std::shared_ptr<Staged> stage(const checkpoint::TrainerState& state, const RunSignature& signature,
                                double next_lr_factor);
  AdamW staged_whole_optimizer(std::vector<std::pair<std::string, torch::Tensor>>& masters);
  void write_synchronously(const std::shared_ptr<Staged>& staged);
  void start_background_write(const std::shared_ptr<Staged>& staged);

  const TrainConfig& cfg_;
  model::LoadedModel& loaded_;
  const std::vector<LoraModule>& lora_;
  LoraConfig lora_config_;
  ShardedAdamW& optimizer_;
  dist::Communicator& comm_;
  bool async_;
  HostStaging staging_;
  checkpoint::AsyncWriter writer_;
  bool in_flight_ = false;  // the same on every rank: saves are collective
  std::shared_ptr<Staged> in_flight_staged_;
  std::vector<SaveTiming> timings_;
};

}  // namespace llava::train
