// Saving checkpoint-N folders (HF Trainer layout plus our exact-resume files, resume_state.h) from the
// trainer's state as plain data (TrainingState): which files a checkpoint holds, their order, the atomic
// commit and rotation, either in the step (synchronous) or with `async_save` in the background: the step then
// waits only while the trainer gathers its state (the collective parts: consolidated optimizer, RNG states of
// every rank) and the saver stages it (HostStaging: device tensors copied into kept, reused host buffers;
// host tensors read in place, the next optimizer update waiting for the write); a background thread
// (async_writer.h) writes the files and commits the folder atomically (the .partial folder and
// rename of checkpoint_dir.h), then rotates. At most one save is in flight: the next save, and the end of
// the run, wait for it. A kill during the background write leaves the previous complete checkpoint the
// newest. A failed background write ends the run at the next step's check, with its error on the rank
// that failed and "failed on another rank" on the others. Every method is collective (the communicator
// makes every rank agree on a save's success).
#pragma once
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <optional>

#include "checkpoint/async_writer.h"
#include "checkpoint/checkpoint_dir.h"
#include "checkpoint/deepspeed_checkpoint.h"
#include "checkpoint/optimizer_state.h"
#include "checkpoint/pretrained_parts.h"
#include "checkpoint/resume_state.h"
#include "distributed/communicator.h"
#include "model/weights.h"

namespace llava::checkpoint {

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

// How a run's checkpoints are written (the same for every save of the run).
struct SaveOptions {
  std::string output_dir;
  std::string base_model;        // model_name_or_path: its config.json is copied in, adapter_config.json names it
  model::WeightLayout layout;    // the base checkpoint's key names, which the weight files use
  std::string max_shard_size;    // full fine-tunes: model.safetensors shards (io::parse_size text)
  int64_t save_total_limit = 0;  // rotation (0: keep all)
  bool async = false;
};

// What one checkpoint holds, as the trainer hands it over: live tensors (the saver copies what the
// training would change before the write reads it, or the write runs before the step goes on) and what
// the trainer gathered from the other ranks. Every rank passes its own; rank 0 writes everything but the
// ZeRO shards, which every rank writes.
struct TrainingState {
  TrainerState trainer;    // trainer_state.json: global_step (the N of checkpoint-N), epoch, log_history, ...
  RunSignature signature;  // llava_resume.json

  enum class Weights { kLora, kProjector, kFull } weights = Weights::kFull;
  std::vector<LoraModuleWeights> lora;  // kLora: adapter_config.json + adapter_model.safetensors
  PeftLoraSettings lora_settings;
  // kLora: non_lora_trainables.bin; kProjector: mm_projector.bin (both model.multi_modal_projector.*);
  // kFull: model.safetensors, every parameter in named_parameters() order.
  NamedTensors weights_to_save;
  std::vector<bool> frozen;  // per weights_to_save entry: never changes (staged without a snapshot)

  // The optimizer. optimizer.pt holds `whole` (gathered into fresh buffers) or, when `whole_from_ranges`
  // (one rank holds everything: no gathering), the whole state built from `ranges`; neither: no optimizer.pt
  // (ZeRO past consolidate_optimizer_max_size). scheduler.pt always.
  std::vector<ParamGroup> groups;  // names, live parameters, base lrs
  AdamWOptions options;
  double next_lr_factor = 1;       // the schedule's factor of the next step: HF's files hold the next step's lr
  std::optional<AdamWState> whole;
  bool whole_from_ranges = false;
  bool sharded = false;            // ZeRO 1/2: `ranges` are this rank's shard, written to zero_shards/
  std::vector<RangeState> ranges;  // this rank's optimizer state by parameter range (live views)
  NamedTensors masters;            // gathered fp32 master weights (bf16 runs), by name

  std::vector<torch::Tensor> rng_states, cuda_rng_states;  // every rank's generator (CUDA: runs on a GPU)
  std::vector<int64_t> cuda_devices;  // each rank's CUDA device index (with cuda_rng_states)
  uint64_t seed = 0;                  // HF's rng_state files: the Python and NumPy generators as seeded
  // With `deepspeed:` (and `whole`): DeepSpeed's layout too; its run settings (deepspeed_save_of adds the rest).
  std::optional<DeepSpeedSave> deepspeed;
  // With `deepspeed` and no LoRA: DeepSpeed's `module`, every parameter of the HF model's state_dict() by our
  // names (live; a tied lm_head under its own name too), as HF Trainer has DeepSpeed load a non-PEFT model's
  // `module` strictly. Those also in weights_to_save are staged once; the rest as `deepspeed_module_frozen`
  // says (frozen: never changes, staged without a snapshot).
  NamedTensors deepspeed_module;
  std::vector<bool> deepspeed_module_frozen;
};

// Whether optimizer.pt (the whole state, gathered on every rank) is written: always without sharding
// (`sharded` false); under ZeRO only while the state (fp32 moments, + fp32 masters in bf16 runs) of
// `total_numel` trainable elements is at most `max_bytes` (consolidate_optimizer_max_size), as gathering it
// costs every rank the whole state's memory.
bool writes_optimizer_pt(bool sharded, int64_t total_numel, bool bf16, uint64_t max_bytes);

// With a DeepSpeed config named (`deepspeed:`, as LLaVA's scripts pass it) the checkpoints also carry
// DeepSpeed's layout (LoRA, stage 1 and full fine-tunes): the run was meant for DeepSpeed, and HF Trainer
// under DeepSpeed resumes nothing else (it looks for global_step*/). Written with optimizer.pt (the
// consolidated optimizer) only.
bool writes_deepspeed_layout(bool deepspeed_config_named);

class CheckpointSaver {
 public:
  CheckpointSaver(SaveOptions options, dist::Communicator& comm);
  ~CheckpointSaver();  // a write in flight is waited for (a kill, of course, leaves it partial)

  // checkpoint-<global_step>: waits for the save in flight, then takes the state from `gather_state` (on
  // every rank: it may gather collectively; its time counts as the save's blocked_seconds) and writes it.
  // The state's live tensors must not change before this returns, nor (host tensors, async) before
  // before_update().
  void save(const std::function<TrainingState()>& gather_state);
  // Once per step: a background write that failed ends the run here on every rank (llava::Error).
  void check();
  // Right before the optimizer changes parameters and moments: waits for a write that reads them in place
  // (host tensors, see HostStaging); the wait counts as the save's update_waited_seconds.
  void before_update();
  // Waits for the save in flight; its failure is the error on every rank.
  void finish();

  bool async() const { return options_.async; }
  const std::vector<SaveTiming>& timings() const { return timings_; }

 private:
  struct Staged;
  std::shared_ptr<Staged> stage(TrainingState& state);
  torch::Tensor staged_copy(const std::string& key, const torch::Tensor& t);
  torch::Tensor staged_on_host(const std::string& key, const torch::Tensor& t);
  AdamWState staged_whole_optimizer(const TrainingState& state, NamedTensors& masters);
  NamedTensors deepspeed_module_state(const TrainingState& state, const Staged& staged);
  void write_synchronously(const std::shared_ptr<Staged>& staged);
  void start_background_write(const std::shared_ptr<Staged>& staged);

  SaveOptions options_;
  dist::Communicator& comm_;
  HostStaging staging_;
  AsyncWriter writer_;
  bool in_flight_ = false;  // the same on every rank: saves are collective
  bool in_flight_reads_live_ = false;  // the write in flight reads live host tensors (every rank alike)
  std::shared_ptr<Staged> in_flight_staged_;
  std::vector<SaveTiming> timings_;
};

}  // namespace llava::checkpoint
