// Saving checkpoint-N folders (HF Trainer layout plus our exact-resume files, resume_state.h), either in
// the step (synchronous) or with `async_save` in the background: the step then waits only while the
// state is gathered (the collective parts: consolidated optimizer, RNG states of every rank) and staged
// (HostStaging: device tensors copied into kept, reused host buffers; host tensors read in place, the next
// optimizer update waiting for the write); a background thread
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
#include "checkpoint/pretrained_parts.h"
#include "checkpoint/resume_state.h"
#include "distributed/communicator.h"
#include "model/weights.h"
#include "train/adamw.h"
#include "train/config.h"
#include "train/lora.h"
#include "train/sharded_adamw.h"

namespace llava::train {

// What a background write reads, on the host. A device tensor is copied into a page-locked buffer kept per
// key from save to save (reused while shape and dtype stay the same). A host tensor is not copied at all:
// live training state (parameters, moments, masters) changes only in the optimizer's update, so the write
// reads it in place and the next update waits for the write (CheckpointSaver::before_update); on the CPU
// a copy would cost about what the disk write costs.
class HostStaging {
 public:
  // Live state: a device tensor's copy, or the host tensor itself (then aliases_live() is true).
  torch::Tensor snapshot(const std::string& key, const torch::Tensor& t);
  // A tensor nothing will change (freshly gathered, or frozen): the host tensor itself, or a device one's copy.
  torch::Tensor host(const std::string& key, const torch::Tensor& t);
  // Waits for the copies from the device (a no-op unless one came from CUDA); starts the next save's count.
  void wait();
  bool aliases_live() const { return aliases_live_; }
  void reset() { aliases_live_ = false; }

 private:
  torch::Tensor copy(const std::string& key, const torch::Tensor& t);
  std::map<std::string, torch::Tensor> buffers_;
  bool from_cuda_ = false, aliases_live_ = false;
};

// Seconds one save held the step (waiting for the previous save's write not counted: that is
// waited_seconds) and, once written, how long its writing took.
struct SaveTiming {
  int64_t step;
  double waited_seconds;   // for the save in flight before it (async; 0 when it had finished)
  double blocked_seconds;  // gathering + staging (async) or gathering + writing (synchronous)
  double write_seconds = -1;  // -1 until the write finished
  double update_waited_seconds = 0;  // async on the host: the next update waiting for the write
};

class CheckpointSaver {
 public:
  CheckpointSaver(const TrainConfig& cfg, model::LoadedModel& loaded, const std::vector<LoraModule>& lora,
                  const LoraConfig& lora_config, ShardedAdamW& optimizer, dist::Communicator& comm, bool async);
  ~CheckpointSaver();  // a write in flight is waited for (a kill, of course, leaves it partial)

  // checkpoint-<state.global_step>. next_lr_factor: the schedule's factor of the next step (HF's
  // optimizer.pt / scheduler.pt hold the next step's lr). Waits for the save in flight first.
  void save(const checkpoint::TrainerState& state, const checkpoint::RunSignature& signature, double next_lr_factor);
  // Once per step: a background write that failed ends the run here on every rank (llava::Error).
  void check();
  // Right before the optimizer changes parameters and moments: waits for a write that reads them in place
  // (host tensors, see HostStaging); the wait counts as the save's update_waited_seconds.
  void before_update();
  // Waits for the save in flight; its failure is the error on every rank.
  void finish();

  bool async() const { return async_; }
  const std::vector<SaveTiming>& timings() const { return timings_; }

 private:
  struct Staged;
  std::shared_ptr<Staged> stage(const checkpoint::TrainerState& state, const checkpoint::RunSignature& signature,
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
  bool in_flight_reads_live_ = false;  // the write in flight reads live host tensors (every rank alike)
  std::shared_ptr<Staged> in_flight_staged_;
  std::vector<SaveTiming> timings_;
};

}  // namespace llava::train
