#include "checkpoint/checkpoint_saver.h"

#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <thread>

#include <torch/cuda.h>

#include "checkpoint/deepspeed_checkpoint.h"
#include "checkpoint/deepspeed_resume.h"
#include "checkpoint/hf_rng_state.h"
#include "checkpoint/hf_state.h"
#include "io/error.h"
#include "io/file_util.h"
#include "io/safetensors.h"
#include "io/torch_archive.h"

namespace llava::checkpoint {

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// Sums `t` over the ranks, on the communicator's device (NCCL takes CUDA tensors only).
void sum_over_ranks(dist::Communicator& comm, torch::Tensor& t) {
  if (comm.world_size() == 1) return;
  auto buffer = t.to(comm.device());
  comm.allreduce(buffer, dist::Reduce::Sum);
  t = buffer.to(t.device());
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
  sum_over_ranks(comm, failed);
  if (!error.empty()) throw Error(error);
  if (failed.item<float>() > 0) throw Error(what + " failed on another rank (see its error)");
}

std::string saving(int64_t step) { return "saving checkpoint-" + std::to_string(step); }

}  // namespace

bool writes_optimizer_pt(bool sharded, int64_t total_numel, bool bf16, uint64_t max_bytes) {
  if (!sharded) return true;
  const int64_t state_bytes = total_numel * (bf16 ? 12 : 8);
  return static_cast<uint64_t>(state_bytes) <= max_bytes;
}

bool writes_deepspeed_layout(bool deepspeed_config_named) { return deepspeed_config_named; }

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
  std::vector<RangeState> zero_shard;  // ZeRO: this rank's optimizer state by range
  // rank 0:
  TrainingState::Weights weights = TrainingState::Weights::kFull;
  std::vector<LoraModuleWeights> lora;
  NamedTensors trained;  // projector (stage 1 and LoRA's non_lora_trainables.bin) or every parameter (full)
  PeftLoraSettings lora_settings;
  model::WeightLayout layout;
  std::string base_model, max_shard_size;
  int64_t save_total_limit = 0;
  c10::IValue optimizer_pt, scheduler_pt;  // optimizer_pt None: not written (ZeRO past the size limit)
  TrainerState state;
  RunSignature signature;
  std::vector<torch::Tensor> rng_states, cuda_rng_states;
  std::vector<int64_t> cuda_devices;  // each rank's CUDA device index (with cuda_rng_states)
  uint64_t seed = 0;                  // HF's rng_state files: the Python and NumPy generators as seeded
  NamedTensors masters;
  std::optional<DeepSpeedSave> deepspeed;  // with `deepspeed:` in the config
  std::unique_ptr<PendingCheckpoint> pending;
  std::atomic<double> write_seconds{-1};

  void write_shard() const { write_zero_shard(partial_dir, rank, world_size, zero_shard); }

  // Rank 0's files, in the order the synchronous save has always written them.
  void write_main_files() const {
    const std::string& dir = partial_dir;
    if (pending->dir() != dir) throw Error(saving(step) + ": unexpected partial folder " + pending->dir());
    if (weights == TrainingState::Weights::kLora) {
      save_lora_adapter(dir, lora, lora_settings, layout, base_model);
      save_projector_weights(dir + "/non_lora_trainables.bin", trained, layout, /*peft_prefix=*/true);
    } else if (weights == TrainingState::Weights::kProjector) {
      save_projector_weights(dir + "/mm_projector.bin", trained, layout, /*peft_prefix=*/false);
    } else {
      save_full_model(dir, trained, layout, io::parse_size(max_shard_size));
    }
    const fs::path base_config = fs::path(base_model) / "config.json";
    if (fs::exists(base_config) && !fs::exists(fs::path(dir) / "config.json"))  // atomic and fsynced like the rest
      io::write_file_atomic(dir + "/config.json", io::read_input_file(base_config.string(), io::InputKind::kConfig));
    if (!optimizer_pt.isNone()) io::save_pt(dir + "/optimizer.pt", optimizer_pt);
    io::save_pt(dir + "/scheduler.pt", scheduler_pt);
    if (deepspeed) write_deepspeed_checkpoint(dir, *deepspeed);  // HF Trainer + DeepSpeed resume it
    write_trainer_state(dir + "/trainer_state.json", state);
    write_run_signature(dir, signature);
    write_rng_states(dir, rng_states, cuda_rng_states);
    write_hf_rng_states(dir, seed, rng_states, cuda_rng_states, cuda_devices);  // HF Trainer loads them
    if (!sharded) write_master_weights(dir, masters);  // ZeRO shards carry them
  }

  void commit() {
    pending->commit();
    rotate_checkpoints(output_dir, save_total_limit);
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

CheckpointSaver::CheckpointSaver(SaveOptions options, dist::Communicator& comm)
    : options_(std::move(options)), comm_(comm) {}

CheckpointSaver::~CheckpointSaver() = default;  // the writer cancels waits and joins

// Synchronous saves write the live tensors before the step goes on: no copies. Async ones stage for the
// background write a snapshot (tensors the next steps change) or the tensor on the host (frozen ones:
// copied there only when they live on the device).
torch::Tensor CheckpointSaver::staged_copy(const std::string& key, const torch::Tensor& t) {
  return options_.async ? staging_.snapshot(key, t) : t.detach();
}
torch::Tensor CheckpointSaver::staged_on_host(const std::string& key, const torch::Tensor& t) {
  return options_.async ? staging_.host(key, t) : t.detach();
}

std::shared_ptr<CheckpointSaver::Staged> CheckpointSaver::stage(TrainingState& state) {
  auto copy = [&](const std::string& key, const torch::Tensor& t) { return staged_copy(key, t); };
  auto host = [&](const std::string& key, const torch::Tensor& t) { return staged_on_host(key, t); };

  staging_.reset();
  auto s = std::make_shared<Staged>();
  s->step = state.trainer.global_step;
  s->output_dir = options_.output_dir;
  s->partial_dir = (fs::path(options_.output_dir) / (".checkpoint-" + std::to_string(s->step) + ".partial")).string();
  s->rank = comm_.rank();
  s->world_size = comm_.world_size();
  s->sharded = state.sharded;

  // An async save without sharding copies the optimizer state straight into the kept host buffers
  // (gathering would copy it into fresh ones); otherwise the trainer gathered it.
  std::optional<AdamWState> whole;
  NamedTensors masters;
  if (state.whole_from_ranges) {
    if (comm_.rank() == 0) whole = staged_whole_optimizer(state, masters);  // only rank 0 writes it
  } else {
    whole = std::move(state.whole);
    masters = std::move(state.masters);
  }
  s->rng_states = std::move(state.rng_states);
  s->cuda_rng_states = std::move(state.cuda_rng_states);
  s->cuda_devices = std::move(state.cuda_devices);
  if (s->sharded) {
    s->zero_shard = state.ranges;  // views of the live state
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
  s->lora_settings = state.lora_settings;
  s->layout = options_.layout;
  s->base_model = options_.base_model;
  s->max_shard_size = options_.max_shard_size;
  s->save_total_limit = options_.save_total_limit;
  s->seed = state.seed;
  s->weights = state.weights;
  for (auto& m : state.lora)
    s->lora.push_back({m.path, copy(m.path + ".lora_A", m.A), copy(m.path + ".lora_B", m.B)});
  for (size_t i = 0; i < state.weights_to_save.size(); ++i) {  // frozen weights never change: only their trip to the host
    const auto& [name, t] = state.weights_to_save[i];
    const bool frozen = i < state.frozen.size() && state.frozen[i];
    s->trained.emplace_back(name, frozen ? host(name, t) : copy(name, t));
  }
  // torch's LambdaLR steps right after the optimizer, so HF's optimizer.pt / scheduler.pt hold the lr of the
  // NEXT step, base_lr * schedule(global_step): HF Trainer resumes with exactly that lr.
  auto set_next_lr = [&](std::vector<ParamGroup>& groups) {
    for (auto& g : groups) g.lr = g.base_lr * state.next_lr_factor;
  };
  if (whole) {
    set_next_lr(whole->groups);
    for (size_t g = 0; g < whole->state.size(); ++g)
      for (size_t j = 0; j < whole->state[g].size(); ++j) {
        auto& st = whole->state[g][j];
        const std::string key = "adam/" + std::to_string(g) + "/" + std::to_string(j) + "/";
        if (st.exp_avg.defined()) st.exp_avg = host(key + "exp_avg", st.exp_avg);
        if (st.exp_avg_sq.defined()) st.exp_avg_sq = host(key + "exp_avg_sq", st.exp_avg_sq);
      }
    s->optimizer_pt = adamw_state_dict(*whole);
    s->scheduler_pt = lambda_lr_state_dict(whole->groups, state.trainer.global_step);
  } else {
    auto groups = state.groups;  // the schedule needs only the groups' lrs
    set_next_lr(groups);
    s->scheduler_pt = lambda_lr_state_dict(groups, state.trainer.global_step);
  }
  for (auto& [name, t] : masters) s->masters.emplace_back(name, host("master/" + name, t));
  if (whole && state.deepspeed) {
    state.deepspeed->lr_scheduler = s->scheduler_pt;
    s->deepspeed = deepspeed_save_of(*whole, s->masters, deepspeed_module_state(state, *s),
                                     state.weights == TrainingState::Weights::kLora, std::move(*state.deepspeed));
  }
  s->state = std::move(state.trainer);
  s->signature = std::move(state.signature);
  staging_.wait();
  return s;
}

// Without sharding this rank holds the whole optimizer state, each parameter in one range: a whole AdamW
// state made of the ranges' copies in the kept host buffers (what gathering returns, without copying into
// fresh buffers), and the fp32 master weights (bf16 runs) likewise.
AdamWState CheckpointSaver::staged_whole_optimizer(const TrainingState& state, NamedTensors& masters) {
  AdamWState whole{state.groups, state.options, {}};
  for (auto& g : whole.groups) whole.state.emplace_back(g.params.size());
  std::map<std::string, std::pair<size_t, size_t>> slot;  // name -> (group, index in group)
  std::map<std::string, torch::IntArrayRef> shape;
  for (size_t g = 0; g < whole.groups.size(); ++g)
    for (size_t j = 0; j < whole.groups[g].names.size(); ++j) {
      slot[whole.groups[g].names[j]] = {g, j};
      shape[whole.groups[g].names[j]] = whole.groups[g].params[j].sizes();
    }
  for (auto& r : state.ranges) {
    const auto& sizes = shape.at(r.name);
    if (r.param_offset != 0 || r.length != c10::multiply_integers(sizes))
      throw Error("internal: an unsharded optimizer holds '" + r.name + "' in pieces");
    if (r.master.defined()) masters.emplace_back(r.name, staging_.snapshot("master/" + r.name, r.master).view(sizes));
    if (r.step == 0) continue;  // never updated: torch keeps no state for it
    auto [g, j] = slot.at(r.name);
    AdamState& s = whole.state[g][j];
    s.exp_avg = staging_.snapshot("exp_avg/" + r.name, r.exp_avg).view(sizes);
    s.exp_avg_sq = staging_.snapshot("exp_avg_sq/" + r.name, r.exp_avg_sq).view(sizes);
    s.step = r.step;
  }
  return whole;
}

// DeepSpeed's `module` of a run without LoRA (TrainingState::deepspeed_module): the staged trained tensors
// (every parameter of a full fine-tune, the projector of stage 1) where they are staged already, the rest
// copied as live (trainable) or only brought to the host (frozen: never changed). Empty for LoRA runs,
// whose `module` is their trained tensors.
NamedTensors CheckpointSaver::deepspeed_module_state(const TrainingState& state, const Staged& s) {
  NamedTensors module;
  if (state.weights == TrainingState::Weights::kLora) return module;
  const std::map<std::string, torch::Tensor> staged(s.trained.begin(), s.trained.end());
  for (size_t i = 0; i < state.deepspeed_module.size(); ++i) {
    const auto& [name, t] = state.deepspeed_module[i];
    const bool frozen = i < state.deepspeed_module_frozen.size() && state.deepspeed_module_frozen[i];
    auto it = staged.find(name);
    if (it != staged.end()) module.emplace_back(name, it->second);
    else module.emplace_back(name, frozen ? staged_on_host(name, t) : staged_copy(name, t));
  }
  return module;
}

void CheckpointSaver::write_synchronously(const std::shared_ptr<Staged>& s) {
  const std::string what = saving(s->step);
  write_on_ranks(comm_, what, /*on_every_rank=*/false,
                 [&] { s->pending = std::make_unique<PendingCheckpoint>(s->output_dir, s->step); });
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
                 [&] { s->pending = std::make_unique<PendingCheckpoint>(s->output_dir, s->step); });
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

void CheckpointSaver::save(const std::function<TrainingState()>& gather_state) {
  const auto wait_start = Clock::now();
  finish();  // at most one save in flight
  const double waited = seconds_since(wait_start);
  const auto start = Clock::now();
  TrainingState state = gather_state();
  const int64_t step = state.trainer.global_step;
  auto staged = stage(state);
  if (options_.async) {
    // Ranks agree on it (rank 0 stages more than the others), so the update's wait stays collective.
    auto live = torch::full({1}, staging_.aliases_live() ? 1.0f : 0.0f);
    sum_over_ranks(comm_, live);
    in_flight_reads_live_ = live.item<float>() > 0;
    start_background_write(staged);
    in_flight_staged_ = staged;
  } else {
    write_synchronously(staged);
  }
  const double blocked = seconds_since(start);
  timings_.push_back({step, waited, blocked, options_.async ? -1.0 : blocked});
}

void CheckpointSaver::check() {
  if (!in_flight_) return;
  const bool done = writer_.finished();
  const std::string error = done ? writer_.error() : "";
  auto flags = torch::tensor({error.empty() ? 0.0f : 1.0f, done ? 1.0f : 0.0f});
  sum_over_ranks(comm_, flags);
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

}  // namespace llava::checkpoint
