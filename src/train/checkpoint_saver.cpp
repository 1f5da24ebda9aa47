#include "train/checkpoint_saver.h"

#include <chrono>
#include <filesystem>
#include <functional>
#include <optional>
#include <thread>

#include <torch/cuda.h>

#include "checkpoint/deepspeed_checkpoint.h"
#include "io/error.h"
#include "io/file_util.h"
#include "io/safetensors.h"
#include "io/torch_archive.h"
#include "checkpoint/deepspeed_resume.h"
#include "checkpoint/hf_state.h"
#include "train/adamw.h"
#include "train/device.h"

namespace llava::train {

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// Every rank's generator state (`state`, the same size on every rank), on every rank.
std::vector<torch::Tensor> gather_rng_states(dist::Communicator& comm, const torch::Tensor& state) {
  if (comm.world_size() == 1) return {state};
  auto all = comm.all_gather(state.to(comm.device())).cpu();  // [world * n] uint8
  std::vector<torch::Tensor> out;
  for (int r = 0; r < comm.world_size(); ++r) out.push_back(all.narrow(0, r * state.numel(), state.numel()).clone());
  return out;
}

// Runs `write` on the ranks given (`on_every_rank`, or rank 0 only) and tells every rank whether it
// worked everywhere, so a failed save ends every rank with the same clear error instead of leaving the
// others waiting in the next collective.
void write_on_ranks(dist::Communicator& comm, const std::string& what, bool on_every_rank,
                    const std::function<void()>& write) {
  std::string error;
  if (on_every_rank || comm.rank() == 0) {
    try {
      write();
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  auto failed = torch::full({1}, error.empty() ? 0.0f : 1.0f);
  allreduce_sum(comm, failed);
  if (!error.empty()) throw Error(error);
  if (failed.item<float>() > 0) throw Error(what + " failed on another rank (see its error)");
}

// Whether optimizer.pt (the whole state, gathered on every rank) is written: always without sharding;
// under ZeRO only while the state is at most consolidate_optimizer_max_size, as gathering it costs
// every rank the whole state's memory.
// With `deepspeed:` in the config (as LLaVA's scripts pass it) a LoRA run's checkpoints also carry
// DeepSpeed's layout: the run was meant for DeepSpeed, and HF Trainer under DeepSpeed resumes nothing else
// (it looks for global_step*/). Written with the consolidated optimizer only.
bool writes_deepspeed_layout(const TrainConfig& cfg, const std::vector<LoraModule>& lora) {
  return !cfg.deepspeed.empty() && !lora.empty();
}

bool write_consolidated_optimizer(const TrainConfig& cfg, const ShardedAdamW& optimizer) {
  if (!optimizer.sharded()) return true;
  const int64_t state_bytes = optimizer.layout().total_numel * (cfg.bf16 ? 12 : 8);
  return static_cast<uint64_t>(state_bytes) <= io::parse_size(cfg.consolidate_optimizer_max_size);
}

// The run's settings DeepSpeed's files record (checkpoint::deepspeed_save_of adds the optimizer).
checkpoint::DeepSpeedSave deepspeed_run(const TrainConfig& cfg, int64_t global_step, int64_t samples_per_step,
                                        int world_size, const c10::IValue& lr_scheduler) {
  checkpoint::DeepSpeedSave run;
  run.global_step = global_step;
  run.global_samples = global_step * samples_per_step;
  run.world_size = world_size;
  run.zero_stage = cfg.zero_stage;
  run.micro_batch = cfg.data.per_device_train_batch_size;
  run.accumulation = cfg.gradient_accumulation_steps;
  run.gradient_clipping = cfg.max_grad_norm;
  run.lr_scheduler = lr_scheduler;
  run.bf16 = cfg.bf16;
  return run;
}

std::string saving(int64_t step) { return "saving checkpoint-" + std::to_string(step); }

}  // namespace

// ------------------------------------------------------------------------------------------ staging

torch::Tensor HostStaging::copy(const std::string& key, const torch::Tensor& t) {
  auto& buffer = buffers_[key];
  if (!buffer.defined() || buffer.sizes() != t.sizes() || buffer.scalar_type() != t.scalar_type()) {
    auto options = torch::TensorOptions().dtype(t.scalar_type()).device(torch::kCPU).pinned_memory(t.is_cuda());
    buffer = torch::empty(t.sizes(), options);
  }
  from_cuda_ = from_cuda_ || t.is_cuda();
  buffer.copy_(t.detach(), /*non_blocking=*/t.is_cuda());
  return buffer;
}

torch::Tensor HostStaging::snapshot(const std::string& key, const torch::Tensor& t) {
  if (!t.is_cpu()) return copy(key, t);
  aliases_live_ = true;
  return t.detach();
}

torch::Tensor HostStaging::host(const std::string& key, const torch::Tensor& t) {
  return t.is_cpu() ? t.detach() : copy(key, t);
}

void HostStaging::wait() {
  if (from_cuda_) torch::cuda::synchronize();
  from_cuda_ = false;
}

// ------------------------------------------------------------------------------------------ the files

// Everything one rank writes for one checkpoint, in tensors the training no longer touches (async) or
// the live ones (synchronous: written before the step goes on), and the settings the writing needs.
struct CheckpointSaver::Staged {
  int64_t step = 0;
  std::string output_dir, partial_dir;
  int rank = 0, world_size = 1;
  bool sharded = false;
  std::vector<checkpoint::RangeState> zero_shard;  // ZeRO: this rank's optimizer state by range
  // rank 0:
  enum class Weights { kLora, kProjector, kFull } weights = Weights::kFull;
  std::vector<checkpoint::LoraModuleWeights> lora;
  NamedTensors trained;  // projector (stage 1 and LoRA's non_lora_trainables.bin) or every parameter (full)
  checkpoint::PeftLoraSettings lora_settings;
  model::WeightLayout layout;
  std::string base_model, max_shard_size;
  int64_t save_total_limit = 0;
  c10::IValue optimizer_pt, scheduler_pt;  // optimizer_pt None: not written (ZeRO past the size limit)
  checkpoint::TrainerState state;
  checkpoint::RunSignature signature;
  std::vector<torch::Tensor> rng_states, cuda_rng_states;
  NamedTensors masters;
  std::optional<checkpoint::DeepSpeedSave> deepspeed;  // with `deepspeed:` in a LoRA run's config
  std::unique_ptr<checkpoint::PendingCheckpoint> pending;
  std::atomic<double> write_seconds{-1};

  void write_shard() const { checkpoint::write_zero_shard(partial_dir, rank, world_size, zero_shard); }

  // Rank 0's files, in the order the synchronous save has always written them.
  void write_main_files() const {
    const std::string& dir = partial_dir;
    if (pending->dir() != dir) throw Error(saving(step) + ": unexpected partial folder " + pending->dir());
    if (weights == Weights::kLora) {
      checkpoint::save_lora_adapter(dir, lora, lora_settings, layout, base_model);
      checkpoint::save_projector_weights(dir + "/non_lora_trainables.bin", trained, layout, /*peft_prefix=*/true);
    } else if (weights == Weights::kProjector) {
      checkpoint::save_projector_weights(dir + "/mm_projector.bin", trained, layout, /*peft_prefix=*/false);
    } else {
      checkpoint::save_full_model(dir, trained, layout, io::parse_size(max_shard_size));
    }
    const fs::path base_config = fs::path(base_model) / "config.json";
    if (fs::exists(base_config) && !fs::exists(fs::path(dir) / "config.json"))  // atomic and fsynced like the rest
      io::write_file_atomic(dir + "/config.json", io::read_input_file(base_config.string(), io::InputKind::kConfig));
    if (!optimizer_pt.isNone()) io::save_pt(dir + "/optimizer.pt", optimizer_pt);
    io::save_pt(dir + "/scheduler.pt", scheduler_pt);
    if (deepspeed) checkpoint::write_deepspeed_checkpoint(dir, *deepspeed);  // HF Trainer + DeepSpeed resume it
    checkpoint::write_trainer_state(dir + "/trainer_state.json", state);
    checkpoint::write_run_signature(dir, signature);
    checkpoint::write_rng_states(dir, rng_states, cuda_rng_states);
    if (!sharded) checkpoint::write_master_weights(dir, masters);  // ZeRO shards carry them
  }

  void commit() {
    pending->commit();
    checkpoint::rotate_checkpoints(output_dir, save_total_limit);
  }

  // Rank 0, async under ZeRO: the other ranks write their shard files (each appears whole, by rename)
  // in their own background threads; the folder is committed once all are there.
  void wait_for_other_shards(const std::atomic<bool>& cancelled) const {
    for (int r = 0; r < world_size; ++r) {
      const fs::path shard = fs::path(partial_dir) / "zero_shards" /
                             ("rank_" + std::to_string(r) + "_of_" + std::to_string(world_size) + ".safetensors");
      while (!fs::exists(shard)) {
        if (cancelled) throw Error(saving(step) + ": stopped waiting for rank " + std::to_string(r) + "'s ZeRO shard");
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
    }
  }
};

// ------------------------------------------------------------------------------------------ the saver

CheckpointSaver::CheckpointSaver(const TrainConfig& cfg, model::LoadedModel& loaded, const std::vector<LoraModule>& lora,
                                 const LoraConfig& lora_config, ShardedAdamW& optimizer, dist::Communicator& comm,
                                 bool async)
    : cfg_(cfg), loaded_(loaded), lora_(lora), lora_config_(lora_config), optimizer_(optimizer), comm_(comm),
      async_(async) {}

CheckpointSaver::~CheckpointSaver() = default;  // the writer cancels waits and joins

std::shared_ptr<CheckpointSaver::Staged> CheckpointSaver::stage(const checkpoint::TrainerState& state,
                                                                const checkpoint::RunSignature& signature, double next_lr_factor) {
  // Synchronous saves write the live tensors before the step goes on: no copies.
  auto copy = [&](const std::string& key, const torch::Tensor& t) { return async_ ? staging_.snapshot(key, t) : t.detach(); };
  auto host = [&](const std::string& key, const torch::Tensor& t) { return async_ ? staging_.host(key, t) : t.detach(); };

  staging_.reset();
  auto s = std::make_shared<Staged>();
  s->step = state.global_step;
  s->output_dir = cfg_.output_dir;
  s->partial_dir = (fs::path(cfg_.output_dir) / (".checkpoint-" + std::to_string(s->step) + ".partial")).string();
  s->rank = comm_.rank();
  s->world_size = comm_.world_size();
  s->sharded = optimizer_.sharded();

  // The collective parts, on every rank. An async save without sharding copies the optimizer state
  // straight into the kept host buffers instead (consolidated() would gather it into fresh ones).
  std::optional<AdamW> whole;
  NamedTensors masters;
  // DeepSpeed's layout goes with optimizer.pt only; it needs the fp32 masters (bf16) under ZeRO too. The
  // same decision on every rank: master_weights() is collective under ZeRO.
  const bool consolidate = write_consolidated_optimizer(cfg_, optimizer_);
  const bool deepspeed_layout = consolidate && writes_deepspeed_layout(cfg_, lora_);
  if (async_ && !optimizer_.sharded()) {
    if (comm_.rank() == 0) whole = staged_whole_optimizer(masters);  // only rank 0 writes it
  } else {
    if (consolidate) whole = optimizer_.consolidated();  // fresh buffers
    if (!optimizer_.sharded() || deepspeed_layout) masters = optimizer_.master_weights();    // fresh copies
  }
  s->rng_states = gather_rng_states(comm_, checkpoint::cpu_rng_state());
  const torch::Device device = loaded_.model->parameters().front().device();
  if (device.is_cuda()) s->cuda_rng_states = gather_rng_states(comm_, checkpoint::cuda_rng_state(device));
  if (s->sharded) {
    s->zero_shard = optimizer_.local_ranges();  // views of the live state
    for (auto& r : s->zero_shard) {
      const std::string key = "zero/" + r.name + "/" + std::to_string(r.param_offset) + "/";
      if (r.exp_avg.defined()) r.exp_avg = copy(key + "exp_avg", r.exp_avg);
      if (r.exp_avg_sq.defined()) r.exp_avg_sq = copy(key + "exp_avg_sq", r.exp_avg_sq);
      if (r.master.defined()) r.master = copy(key + "master", r.master);
    }
  }
  if (comm_.rank() != 0) {
    staging_.wait();
    return s;
  }

  // Rank 0's files.
  s->lora_settings = peft_lora_settings(lora_config_);
  s->layout = loaded_.layout;
  s->base_model = cfg_.model_name_or_path;
  s->max_shard_size = cfg_.max_shard_size;
  s->save_total_limit = cfg_.save_total_limit;
  auto& model = loaded_.model;
  if (!lora_.empty()) {
    s->weights = Staged::Weights::kLora;
    for (auto& m : lora_)
      s->lora.push_back({m.path, copy(m.path + ".lora_A", m.adapter->lora_A), copy(m.path + ".lora_B", m.adapter->lora_B)});
  } else if (cfg_.tune_mm_mlp_adapter) {
    s->weights = Staged::Weights::kProjector;
  }
  if (s->weights == Staged::Weights::kFull) {
    for (auto& p : model->named_parameters())  // frozen weights never change: only their trip to the host
      s->trained.emplace_back(p.key(), p.value().requires_grad() ? copy(p.key(), p.value()) : host(p.key(), p.value()));
  } else {
    for (auto& p : model->model->multi_modal_projector->named_parameters()) {
      const std::string name = "model.multi_modal_projector." + p.key();
      s->trained.emplace_back(name, copy(name, p.value()));
    }
  }
  // torch's LambdaLR steps right after the optimizer, so HF's optimizer.pt / scheduler.pt hold the lr of the
  // NEXT step, base_lr * schedule(global_step): HF Trainer resumes with exactly that lr.
  auto set_next_lr = [&](AdamW& a) {
    for (auto& g : a.groups()) g.lr = g.base_lr * next_lr_factor;
  };
  if (whole) {
    set_next_lr(*whole);
    for (size_t g = 0; g < whole->state().size(); ++g)
      for (size_t j = 0; j < whole->state()[g].size(); ++j) {
        auto& st = whole->state()[g][j];
        const std::string key = "adam/" + std::to_string(g) + "/" + std::to_string(j) + "/";
        if (st.exp_avg.defined()) st.exp_avg = host(key + "exp_avg", st.exp_avg);
        if (st.exp_avg_sq.defined()) st.exp_avg_sq = host(key + "exp_avg_sq", st.exp_avg_sq);
      }
    s->optimizer_pt = checkpoint::adamw_state_dict(whole->data());
    s->scheduler_pt = checkpoint::lambda_lr_state_dict(whole->groups(), state.global_step);
  } else {
    AdamW stateless(optimizer_.groups(), AdamWOptions{});  // the schedule needs only the groups' lrs
    set_next_lr(stateless);
    s->scheduler_pt = checkpoint::lambda_lr_state_dict(stateless.groups(), state.global_step);
  }
  for (auto& [name, t] : masters) s->masters.emplace_back(name, host("master/" + name, t));
  if (whole && deepspeed_layout)
    s->deepspeed = checkpoint::deepspeed_save_of(whole->data(), s->masters,
                                                 deepspeed_run(cfg_, state.global_step, signature.samples_per_step,
                                                               comm_.world_size(), s->scheduler_pt));
  s->state = state;
  s->signature = signature;
  staging_.wait();
  return s;
}

// Without sharding this rank holds the whole optimizer state, each parameter in one range: an AdamW
// whose state is the ranges' copies in the kept host buffers (what consolidated() returns, without the
// gathering into fresh buffers), and the fp32 master weights (bf16 runs) likewise.
AdamW CheckpointSaver::staged_whole_optimizer(NamedTensors& masters) {
  AdamW whole(optimizer_.groups(), optimizer_.options());
  std::map<std::string, std::pair<size_t, size_t>> slot;  // name -> (group, index in group)
  std::map<std::string, torch::IntArrayRef> shape;
  for (size_t g = 0; g < whole.groups().size(); ++g)
    for (size_t j = 0; j < whole.groups()[g].names.size(); ++j) {
      slot[whole.groups()[g].names[j]] = {g, j};
      shape[whole.groups()[g].names[j]] = whole.groups()[g].params[j].sizes();
    }
  for (auto& r : optimizer_.local_ranges()) {
    const auto& sizes = shape.at(r.name);
    if (r.param_offset != 0 || r.length != c10::multiply_integers(sizes))
      throw Error("internal: an unsharded optimizer holds '" + r.name + "' in pieces");
    if (r.master.defined()) masters.emplace_back(r.name, staging_.snapshot("master/" + r.name, r.master).view(sizes));
    if (r.step == 0) continue;  // never updated: torch keeps no state for it
    auto [g, j] = slot.at(r.name);
    AdamState& s = whole.state()[g][j];
    s.exp_avg = staging_.snapshot("exp_avg/" + r.name, r.exp_avg).view(sizes);
    s.exp_avg_sq = staging_.snapshot("exp_avg_sq/" + r.name, r.exp_avg_sq).view(sizes);
    s.step = r.step;
  }
  return whole;
}

void CheckpointSaver::write_synchronously(const std::shared_ptr<Staged>& s) {
  const std::string what = saving(s->step);
  write_on_ranks(comm_, what, /*on_every_rank=*/false,
                 [&] { s->pending = std::make_unique<checkpoint::PendingCheckpoint>(s->output_dir, s->step); });
  if (s->sharded)  // every rank writes its own shard into rank 0's partial folder
    write_on_ranks(comm_, what, /*on_every_rank=*/true, [&] { s->write_shard(); });
  write_on_ranks(comm_, what, /*on_every_rank=*/false, [&] {
    s->write_main_files();
    s->commit();
  });
}

void CheckpointSaver::start_background_write(const std::shared_ptr<Staged>& s) {
  // The partial folder exists before any rank's thread writes into it.
  write_on_ranks(comm_, saving(s->step), /*on_every_rank=*/false,
                 [&] { s->pending = std::make_unique<checkpoint::PendingCheckpoint>(s->output_dir, s->step); });
  writer_.start([s](const std::atomic<bool>& cancelled) {
    const auto start = Clock::now();
    try {
      if (s->sharded) s->write_shard();
      if (s->rank == 0) {
        s->write_main_files();
        if (s->sharded) s->wait_for_other_shards(cancelled);
        s->commit();
      }
    } catch (...) {
      s->pending.reset();  // the partial folder goes now, before the error is seen
      throw;
    }
    s->write_seconds = seconds_since(start);
  });
  in_flight_ = true;
}

void CheckpointSaver::save(const checkpoint::TrainerState& state, const checkpoint::RunSignature& signature, double next_lr_factor) {
  const auto wait_start = Clock::now();
  finish();  // at most one save in flight
  const double waited = seconds_since(wait_start);
  const auto start = Clock::now();
  auto staged = stage(state, signature, next_lr_factor);
  if (async_) {
    // Ranks agree on it (rank 0 stages more than the others), so the update's wait stays collective.
    auto live = torch::full({1}, staging_.aliases_live() ? 1.0f : 0.0f);
    allreduce_sum(comm_, live);
    in_flight_reads_live_ = live.item<float>() > 0;
    start_background_write(staged);
    in_flight_staged_ = staged;
  } else {
    write_synchronously(staged);
  }
  const double blocked = seconds_since(start);
  timings_.push_back({state.global_step, waited, blocked, async_ ? -1.0 : blocked});
}

void CheckpointSaver::check() {
  if (!in_flight_) return;
  const bool done = writer_.finished();
  const std::string error = done ? writer_.error() : "";
  auto flags = torch::tensor({error.empty() ? 0.0f : 1.0f, done ? 1.0f : 0.0f});
  allreduce_sum(comm_, flags);
  const int64_t step = in_flight_staged_->step;
  if (!error.empty()) throw Error(error);
  if (flags[0].item<float>() > 0) throw Error(saving(step) + " failed on another rank (see its error)");
  if (flags[1].item<float>() < static_cast<float>(comm_.world_size())) return;  // still writing somewhere
  writer_.join();
  for (auto& t : timings_)
    if (t.step == step) t.write_seconds = in_flight_staged_->write_seconds;
  in_flight_staged_.reset();
  in_flight_ = false;
}

void CheckpointSaver::before_update() {
  if (!in_flight_ || !in_flight_reads_live_) return;
  const auto start = Clock::now();
  const int64_t step = in_flight_staged_->step;
  finish();
  for (auto& t : timings_)
    if (t.step == step) t.update_waited_seconds = seconds_since(start);
}

void CheckpointSaver::finish() {
  while (in_flight_) {
    check();
    if (in_flight_) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

}  // namespace llava::train
