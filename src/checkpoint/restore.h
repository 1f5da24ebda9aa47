// Reading a checkpoint-N back for a resume: ours (any world size and ZeRO stage), HF Trainer + PEFT's, and
// HF Trainer + DeepSpeed's (ZeRO 1/2, global_stepN/ without optimizer.pt). Which files hold what is decided
// here; the trainer hands over what its run is and puts the optimizer state and generator states it gets
// back into its optimizer and generators.
#pragma once
#include <functional>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "checkpoint/checkpoint_dir.h"
#include "checkpoint/checkpoint_saver.h"
#include "checkpoint/optimizer_state.h"
#include "checkpoint/resume_state.h"
#include "model/llava.h"

namespace llava::checkpoint {

// The first file a checkpoint-N must hold for a run training `weights` to resume from it, that `dir` lacks
// ("" when complete): trainer_state.json; the trained weights (adapter_model.safetensors|.bin +
// non_lora_trainables.bin, mm_projector.bin, or model.safetensors[.index.json] / pytorch_model.bin[.index.json]);
// the optimizer state (optimizer.pt or zero_shards/). A HF Trainer + DeepSpeed checkpoint (`latest`, no
// optimizer.pt) keeps weights and state in global_stepN/ (its reader names what is missing there); a LoRA
// one still needs the adapter.
std::string missing_checkpoint_file(const std::string& dir, TrainingState::Weights weights);

// resume_from_checkpoint: "auto" = the newest complete checkpoint-N of output_dir (an incomplete one, e.g.
// an interrupted copy, is skipped with one warning line on `log` naming the folder and the missing file;
// none: a fresh start), or a checkpoint dir (an error naming the missing file when it is incomplete).
// Returns "" for a fresh start.
std::string checkpoint_to_resume(const std::string& resume_from_checkpoint, const std::string& output_dir,
                                 TrainingState::Weights weights, std::ostream& log);

// What the resuming run is.
struct RestoreRequest {
  std::string dir;                              // the checkpoint-N folder
  std::string base_model;                       // model_name_or_path: the checkpoint's config.json must match it
  RunSignature now;                             // checked against the checkpoint's llava_resume.json
  TrainingState::Weights weights = TrainingState::Weights::kFull;
  model::LlavaForConditionalGeneration* model = nullptr;  // the projector / every weight is copied into it
  std::function<void(const std::string& dir)> load_lora;  // kLora: the run's LoRA modules take dir's adapter
  std::vector<ParamGroup> groups;               // the run's optimizer groups (names, live parameters)
  int rank = 0;
  bool cuda = false;                            // the run is on a CUDA device: its generator state is read too
  int cuda_device = -1;                         // with `cuda`: its index (HF's files hold each device's state)
};

struct Restored {
  TrainerState trainer;                        // trainer_state.json
  std::optional<RunSignature> saved;           // llava_resume.json (ours only)
  std::vector<std::string> changes;            // allowed differences to log (world size, ZeRO stage, dtype)
  // The optimizer: our ZeRO shards by range (`ranges_where` names them), else the whole state.
  std::vector<RangeState> ranges;
  std::string ranges_where;
  std::optional<AdamWState> whole;             // groups, lrs and per-parameter state (options default)
  NamedTensors masters;                        // fp32 master weights by name (may be empty)
  std::optional<torch::Tensor> cpu_rng, cuda_rng;  // this rank's generator states (ours, else HF's)
};

// Checks the checkpoint against the run (another model or an incompatible run: a llava::Error naming the
// difference, before anything changes), copies its trained weights into the model (LoRA through
// request.load_lora) and reads the optimizer and this rank's generator states.
Restored restore(const RestoreRequest& request);

}  // namespace llava::checkpoint
