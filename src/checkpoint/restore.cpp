#include "checkpoint/restore.h"

#include <filesystem>

#include "checkpoint/deepspeed_checkpoint.h"
#include "checkpoint/deepspeed_resume.h"
#include "checkpoint/hf_rng_state.h"
#include "checkpoint/hf_state.h"
#include "checkpoint/pretrained_parts.h"
#include "io/error.h"
#include "io/torch_archive.h"
#include "model/weights.h"

namespace llava::checkpoint {

namespace {

namespace fs = std::filesystem;

AdamWState stateless(const std::vector<ParamGroup>& groups) {
  AdamWState whole{groups, AdamWOptions{}, {}};
  for (auto& g : whole.groups) whole.state.emplace_back(g.params.size());
  return whole;
}

// This rank's generators: the CPU one (LoRA dropout draws from it) and, on a CUDA device, its generator:
// ours (llava_rng_state.safetensors), else HF Trainer's rng_state[_R].pth (a CPU run's checkpoint has no
// CUDA state: the CUDA generator then stays as seeded).
void read_rng(const RestoreRequest& r, Restored& out) {
  out.cpu_rng = read_rng_state(r.dir, r.rank);
  if (r.cuda) out.cuda_rng = read_cuda_rng_state(r.dir, r.rank);
  if (!out.cpu_rng || (r.cuda && !out.cuda_rng))
    if (auto hf = read_hf_rng_state(r.dir, r.rank, r.cuda ? r.cuda_device : -1)) {
      if (!out.cpu_rng) out.cpu_rng = hf->cpu;
      if (!out.cuda_rng) out.cuda_rng = hf->cuda;
    }
}

}  // namespace

std::string checkpoint_to_resume(const std::string& resume_from_checkpoint, const std::string& output_dir) {
  if (resume_from_checkpoint.empty()) return "";
  if (resume_from_checkpoint == "auto") return latest_checkpoint(output_dir).value_or("");
  if (!fs::exists(fs::path(resume_from_checkpoint) / "trainer_state.json"))
    fail(resume_from_checkpoint, "not a checkpoint (no trainer_state.json); nothing was changed");
  return resume_from_checkpoint;
}

Restored restore(const RestoreRequest& r) {
  const std::string& dir = r.dir;
  Restored out;
  check_same_model(dir, r.base_model);
  out.saved = read_run_signature(dir);
  if (out.saved) out.changes = check_resume_compatible(*out.saved, r.now, dir);
  out.trainer = read_trainer_state((fs::path(dir) / "trainer_state.json").string());
  if (out.saved && out.saved->logging &&
      (out.saved->logging->last_logged_step < 0 || out.saved->logging->last_logged_step > out.trainer.global_step))
    fail((fs::path(dir) / "llava_resume.json").string(),
         "\"logging\": last_logged_step " + std::to_string(out.saved->logging->last_logged_step) +
             " is not in [0, global_step " + std::to_string(out.trainer.global_step) + "]");
  const bool lora = r.weights == TrainingState::Weights::kLora;
  // HF Trainer + DeepSpeed: weights and state in global_stepN/ (ours carry optimizer.pt beside it).
  if (is_deepspeed_checkpoint(dir) && !fs::exists(fs::path(dir) / "optimizer.pt")) {
    if (lora) r.load_lora(dir);  // checks r / lora_alpha
    std::vector<std::string> model_names;
    for (auto& p : (*r.model)->named_parameters()) model_names.push_back(p.key());
    out.whole = stateless(r.groups);
    out.masters = restore_deepspeed_state(dir, model_names, *out.whole);
    read_rng(r, out);
    return out;
  }
  if (lora) {
    r.load_lora(dir);
    load_projector_weights(*r.model, (fs::path(dir) / "non_lora_trainables.bin").string());
  } else if (r.weights == TrainingState::Weights::kProjector) {
    load_projector_weights(*r.model, (fs::path(dir) / "mm_projector.bin").string());
  } else {
    model::load_weights(*r.model, dir);
  }
  // The optimizer: ZeRO shard files when there are (any world size reads them), else optimizer.pt.
  if (auto ranges = read_zero_shards(dir); !ranges.empty()) {
    out.ranges = std::move(ranges);
    out.ranges_where = (fs::path(dir) / "zero_shards").string();
  } else {
    const std::string optimizer_file = (fs::path(dir) / "optimizer.pt").string();
    out.whole = stateless(r.groups);
    load_adamw_state_dict(*out.whole, io::load_pt(optimizer_file), optimizer_file);
    out.masters = read_master_weights(dir);
  }
  read_rng(r, out);
  return out;
}

}  // namespace llava::checkpoint
