#include "train/checkpoint_state.h"

#include "checkpoint/resume_state.h"
#include "io/safetensors.h"
#include "train/device.h"

namespace llava::train {

namespace {

// Every rank's generator state (`state`, the same size on every rank), on every rank.
std::vector<torch::Tensor> gather_rng_states(dist::Communicator& comm, const torch::Tensor& state) {
  if (comm.world_size() == 1) return {state};
  auto all = comm.all_gather(state.to(comm.device())).cpu();  // [world * n] uint8
  std::vector<torch::Tensor> out;
  for (int r = 0; r < comm.world_size(); ++r) out.push_back(all.narrow(0, r * state.numel(), state.numel()).clone());
  return out;
}

// The run's settings DeepSpeed's files record (checkpoint::deepspeed_save_of adds the optimizer and the
// saver the LambdaLR state).
checkpoint::DeepSpeedSave deepspeed_run(const TrainConfig& cfg, int64_t global_step, int64_t samples_per_step,
                                        int world_size) {
  checkpoint::DeepSpeedSave run;
  run.global_step = global_step;
  run.global_samples = global_step * samples_per_step;
  run.world_size = world_size;
  run.zero_stage = cfg.zero_stage;
  run.micro_batch = cfg.data.per_device_train_batch_size;
  run.accumulation = cfg.gradient_accumulation_steps;
  run.gradient_clipping = cfg.max_grad_norm;
  run.bf16 = cfg.bf16;
  return run;
}

// DeepSpeed's `module` of a run without LoRA: every parameter (frozen ones too: HF Trainer has DeepSpeed load
// a non-PEFT model's `module` strictly) and a tied lm_head under its own name, as the HF model's state_dict()
// lists it.
void deepspeed_module(model::LlavaForConditionalGeneration& model, checkpoint::TrainingState& s) {
  for (auto& p : model->named_parameters()) {
    s.deepspeed_module.emplace_back(p.key(), p.value());
    s.deepspeed_module_frozen.push_back(!p.value().requires_grad());
  }
  if (model->lm_head.is_empty()) {
    s.deepspeed_module.emplace_back("lm_head.weight", model->lm_head_weight());
    s.deepspeed_module_frozen.push_back(true);  // staged without a snapshot: only its trip to the host
  }
}

}  // namespace

checkpoint::TrainingState::Weights weights_kind(const TrainConfig& cfg, const std::vector<LoraModule>& lora) {
  using W = checkpoint::TrainingState::Weights;
  return !lora.empty() ? W::kLora : cfg.tune_mm_mlp_adapter ? W::kProjector : W::kFull;
}

checkpoint::SaveOptions save_options(const TrainConfig& cfg, const model::LoadedModel& loaded, bool async) {
  return {cfg.output_dir, cfg.model_name_or_path, loaded.layout, cfg.max_shard_size, cfg.save_total_limit, async};
}

checkpoint::TrainingState training_state(const TrainConfig& cfg, model::LoadedModel& loaded,
                                         const std::vector<LoraModule>& lora, const LoraConfig& lora_config,
                                         ShardedAdamW& optimizer, dist::Communicator& comm, bool async, const checkpoint::TrainerState& state,
                                         const checkpoint::RunSignature& signature, double next_lr_factor) {
  checkpoint::TrainingState s;
  s.trainer = state;
  s.signature = signature;
  s.groups = optimizer.groups();
  s.options = optimizer.options();
  s.next_lr_factor = next_lr_factor;
  s.sharded = optimizer.sharded();

  // The collective parts, on every rank. An async save without sharding has the saver copy the optimizer
  // state straight into its kept host buffers instead (consolidated() would gather it into fresh ones).
  // DeepSpeed's layout goes with optimizer.pt only; it needs the fp32 masters (bf16) under ZeRO too. The
  // same decision on every rank: master_weights() is collective under ZeRO.
  const bool consolidate = checkpoint::writes_optimizer_pt(optimizer.sharded(), optimizer.layout().total_numel, cfg.bf16,
                                                          io::parse_size(cfg.consolidate_optimizer_max_size));
  const bool deepspeed_layout = consolidate && checkpoint::writes_deepspeed_layout(!cfg.deepspeed.empty());
  if (async && !optimizer.sharded()) {
    s.whole_from_ranges = true;
  } else {
    if (consolidate) s.whole = optimizer.consolidated().data();  // fresh buffers
    if (!optimizer.sharded() || deepspeed_layout) s.masters = optimizer.master_weights();  // fresh copies
  }
  s.rng_states = gather_rng_states(comm, checkpoint::cpu_rng_state());
  const torch::Device device = loaded.model->parameters().front().device();
  if (device.is_cuda()) {
    s.cuda_rng_states = gather_rng_states(comm, checkpoint::cuda_rng_state(device));
    for (auto& index : gather_rng_states(comm, torch::tensor({static_cast<int64_t>(device.index())})))
      s.cuda_devices.push_back(index.item<int64_t>());
  }
  s.ranges = optimizer.local_ranges();  // views of the live state
  if (comm.rank() != 0) return s;

  // Rank 0's files: the live weights (the saver copies them when the write runs in the background).
  s.weights = weights_kind(cfg, lora);
  if (s.weights == checkpoint::TrainingState::Weights::kLora) {
    s.lora = lora_weights(lora);
    s.lora_settings = peft_lora_settings(lora_config);
  }
  if (s.weights == checkpoint::TrainingState::Weights::kFull) {
    for (auto& p : loaded.model->named_parameters()) {
      s.weights_to_save.emplace_back(p.key(), p.value());
      s.frozen.push_back(!p.value().requires_grad());
    }
  } else {
    for (auto& p : loaded.model->model->multi_modal_projector->named_parameters())
      s.weights_to_save.emplace_back("model.multi_modal_projector." + p.key(), p.value());
  }
  s.seed = static_cast<uint64_t>(cfg.data.seed);
  if (deepspeed_layout) {
    s.deepspeed = deepspeed_run(cfg, state.global_step, signature.samples_per_step, comm.world_size());
    if (lora.empty()) deepspeed_module(loaded.model, s);
  }
  return s;
}

checkpoint::Restored restore_training_state(const std::string& dir, const TrainConfig& cfg, model::LoadedModel& loaded,
                                            const std::vector<LoraModule>& lora, ShardedAdamW& optimizer,
                                            const checkpoint::RunSignature& now, int rank,
                                            const std::function<void(const std::string&)>& load_lora, std::ostream& log) {
  const torch::Device device = loaded.model->parameters().front().device();
  checkpoint::RestoreRequest request;
  request.dir = dir;
  request.base_model = cfg.model_name_or_path;
  request.now = now;
  request.weights = weights_kind(cfg, lora);
  request.model = &loaded.model;
  request.load_lora = load_lora;
  request.groups = optimizer.groups();
  request.rank = rank;
  request.cuda = device.is_cuda();
  request.cuda_device = device.is_cuda() ? device.index() : -1;
  auto restored = checkpoint::restore(request);
  for (auto& change : restored.changes) log << "resume: " << change << std::endl;
  if (!restored.ranges.empty()) {
    optimizer.load_ranges(restored.ranges, restored.ranges_where);
  } else {
    AdamW whole(optimizer.groups(), AdamWOptions{});
    whole.data() = *restored.whole;
    optimizer.load_consolidated(whole);
    optimizer.load_master_weights(restored.masters);
  }
  if (restored.cpu_rng) checkpoint::set_cpu_rng_state(*restored.cpu_rng);
  if (restored.cuda_rng) checkpoint::set_cuda_rng_state(device, *restored.cuda_rng);
  return restored;
}

}  // namespace llava::train
