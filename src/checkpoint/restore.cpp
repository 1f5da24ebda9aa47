#include "checkpoint/restore.h"

#include <filesystem>
#include <regex>

#include "checkpoint/deepspeed_checkpoint.h"
#include "checkpoint/deepspeed_resume.h"
#include "checkpoint/hf_rng_state.h"
#include "checkpoint/hf_state.h"
#include "checkpoint/pretrained_parts.h"
#include "checkpoint/state_checks.h"
#include "io/error.h"
#include "io/json_input.h"
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

std::string in_dir(const std::string& dir, const std::string& file) { return (fs::path(dir) / file).string(); }

bool exists_quietly(const fs::path& p) {
  std::error_code ec;
  return fs::exists(p, ec);
}

// trainer_state.json's global_step against the other records of the same step: the folder's name (HF and
// we name it checkpoint-<global_step>) and llava_resume.json's sampler position, which the trainer writes as
// epoch x steps_per_epoch + position / samples_per_step = global_step with position / samples_per_step <
// steps_per_epoch. A contradiction (an edited or mixed-up file) is an Error naming both.
void check_global_step(const std::string& dir, const Restored& out) {
  const int64_t step = out.trainer.global_step;
  const std::string state_file = in_dir(dir, "trainer_state.json");
  static const std::regex folder(R"(^checkpoint-(\d+)$)");
  std::smatch m;
  const std::string name = fs::path(dir).lexically_normal().filename().string();
  if (std::regex_match(name, m, folder) && m[1].str() != std::to_string(step))
    fail(state_file, "global_step " + std::to_string(step) + " contradicts the folder name " + name +
                         " (a checkpoint-N folder holds step N); nothing was changed");
  if (!out.saved) return;
  const int64_t epoch = out.saved->sampler.at("epoch").get<int64_t>();
  const int64_t in_epoch = out.saved->sampler.at("position").get<int64_t>() / out.saved->samples_per_step;
  const bool consistent = epoch == 0 ? in_epoch == step
                                     : step > in_epoch && (step - in_epoch) % epoch == 0 &&
                                           (step - in_epoch) / epoch > in_epoch;
  if (!consistent)
    fail(state_file, "global_step " + std::to_string(step) + " contradicts " + in_dir(dir, "llava_resume.json") +
                         " (sampler epoch " + std::to_string(epoch) + ", position " +
                         std::to_string(in_epoch * out.saved->samples_per_step) + " = " + std::to_string(in_epoch) +
                         " steps into the epoch); nothing was changed");
}

// No parameter took more updates than the run made optimizer steps.
void check_steps(const Restored& out, const std::string& optimizer_file, const std::string& dir) {
  const std::string state_file = in_dir(dir, "trainer_state.json");
  const int64_t global_step = out.trainer.global_step;
  if (out.whole)
    for (size_t g = 0; g < out.whole->groups.size(); ++g)
      for (size_t i = 0; i < out.whole->state[g].size(); ++i)
        if (out.whole->state[g][i].initialized())
          check_step_at_most(out.whole->state[g][i].step, global_step, optimizer_file,
                             "the Adam step of '" + out.whole->groups[g].names[i] + "'", state_file);
  for (auto& r : out.ranges)
    check_step_at_most(r.step, global_step, out.ranges_where, "the Adam step of '" + r.name + "'", state_file);
}

// The file a full fine-tune's weight `key` (the name in the files) came from.
std::string full_weights_file(const std::string& dir, const std::string& key) {
  for (const char* index : {"model.safetensors.index.json", "pytorch_model.bin.index.json"}) {
    if (!exists_quietly(fs::path(dir) / index)) continue;
    const auto j = io::read_json_file(in_dir(dir, index));
    if (j.contains("weight_map") && j["weight_map"].contains(key) && j["weight_map"][key].is_string())
      return in_dir(dir, j["weight_map"][key].get<std::string>());
    return in_dir(dir, index);
  }
  return in_dir(dir, exists_quietly(fs::path(dir) / "model.safetensors") ? "model.safetensors" : "pytorch_model.bin");
}

// The trained weights this run takes from the checkpoint (its optimizer groups' parameters, just loaded)
// must be finite: a NaN weight would train on and be saved as the next checkpoint.
void check_trained_weights(const RestoreRequest& r, const std::optional<model::WeightLayout>& full_layout) {
  std::string adapter = in_dir(r.dir, "adapter_model.safetensors");
  if (!exists_quietly(adapter)) adapter = in_dir(r.dir, "adapter_model.bin");
  for (auto& group : r.groups)
    for (size_t i = 0; i < group.params.size(); ++i) {
      const std::string& name = group.names[i];
      std::string file, key = name;
      if (r.weights == TrainingState::Weights::kLora) {
        file = name.find(".lora_") != std::string::npos ? adapter : in_dir(r.dir, "non_lora_trainables.bin");
      } else if (r.weights == TrainingState::Weights::kProjector) {
        file = in_dir(r.dir, "mm_projector.bin");
      } else {
        if (full_layout) key = model::checkpoint_name(name, *full_layout);
        file = full_weights_file(r.dir, key);
      }
      check_finite_weights(group.params[i].detach(), file, "'" + key + "'");
    }
}

}  // namespace

std::string missing_checkpoint_file(const std::string& dir, TrainingState::Weights weights) {
  const fs::path d(dir);
  auto has = [&](const char* file) { return exists_quietly(d / file); };
  if (!has("trainer_state.json")) return "trainer_state.json";
  const bool deepspeed = has("latest") && !has("optimizer.pt");
  switch (weights) {
    case TrainingState::Weights::kLora:
      if (!has("adapter_model.safetensors") && !has("adapter_model.bin")) return "adapter_model.safetensors";
      if (!deepspeed && !has("non_lora_trainables.bin")) return "non_lora_trainables.bin";
      break;
    case TrainingState::Weights::kProjector:
      if (!deepspeed && !has("mm_projector.bin")) return "mm_projector.bin";
      break;
    case TrainingState::Weights::kFull:
      if (!deepspeed && !has("model.safetensors") && !has("model.safetensors.index.json") &&
          !has("pytorch_model.bin") && !has("pytorch_model.bin.index.json"))
        return "model.safetensors";
      break;
  }
  if (!deepspeed && !has("optimizer.pt") && !has("zero_shards")) return "optimizer.pt";
  return "";
}

std::string checkpoint_to_resume(const std::string& resume_from_checkpoint, const std::string& output_dir,
                                 TrainingState::Weights weights, std::ostream& log) {
  if (resume_from_checkpoint.empty()) return "";
  if (resume_from_checkpoint == "auto") {
    const auto folders = complete_checkpoints(output_dir);
    for (auto it = folders.rbegin(); it != folders.rend(); ++it) {
      const std::string missing = missing_checkpoint_file(*it, weights);
      if (missing.empty()) return *it;
      log << "warning: " << *it << ": incomplete checkpoint (no " << missing
          << "), skipped; resuming from the next newest" << std::endl;
    }
    return "";
  }
  if (!exists_quietly(fs::path(resume_from_checkpoint) / "trainer_state.json"))
    fail(resume_from_checkpoint, "not a checkpoint (no trainer_state.json); nothing was changed");
  if (const std::string missing = missing_checkpoint_file(resume_from_checkpoint, weights); !missing.empty())
    fail(in_dir(resume_from_checkpoint, missing),
         "no such file: the checkpoint is incomplete (this run needs it to resume); nothing was changed");
  return resume_from_checkpoint;
}

Restored restore(const RestoreRequest& r) {
  const std::string& dir = r.dir;
  Restored out;
  check_same_model(dir, r.base_model);
  out.saved = read_run_signature(dir);
  if (out.saved) out.changes = check_resume_compatible(*out.saved, r.now, dir);
  out.trainer = read_trainer_state((fs::path(dir) / "trainer_state.json").string());
  check_global_step(dir, out);
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
    check_steps(out, deepspeed_optim_file(dir, 0), dir);  // the fp32 partitions were checked as read
    read_rng(r, out);
    return out;
  }
  std::optional<model::WeightLayout> full_layout;
  if (lora) {
    r.load_lora(dir);
    load_projector_weights(*r.model, (fs::path(dir) / "non_lora_trainables.bin").string());
  } else if (r.weights == TrainingState::Weights::kProjector) {
    load_projector_weights(*r.model, (fs::path(dir) / "mm_projector.bin").string());
  } else {
    full_layout = model::load_weights(*r.model, dir);
  }
  check_trained_weights(r, full_layout);
  // The optimizer: ZeRO shard files when there are (any world size reads them), else optimizer.pt.
  const std::string optimizer_file = in_dir(dir, "optimizer.pt");
  if (auto ranges = read_zero_shards(dir); !ranges.empty()) {
    out.ranges = std::move(ranges);
    out.ranges_where = (fs::path(dir) / "zero_shards").string();
  } else {
    out.whole = stateless(r.groups);
    load_adamw_state_dict(*out.whole, io::load_pt(optimizer_file), optimizer_file);
    out.masters = read_master_weights(dir);
  }
  check_steps(out, optimizer_file, dir);
  read_rng(r, out);
  return out;
}

}  // namespace llava::checkpoint
