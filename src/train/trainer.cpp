#include "train/trainer.h"

#include <charconv>
#include <cmath>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <ostream>
#include <set>

#include <nlohmann/json.hpp>

#include "checkpoint/checkpoint_dir.h"
#include "checkpoint/peft_adapter.h"
#include "checkpoint/pretrained_parts.h"
#include "checkpoint/resume_state.h"
#include "data/config.h"
#include "data/masked_samples.h"
#include "distributed/communicator.h"
#include "io/error.h"
#include "io/file_util.h"
#include "io/safetensors.h"
#include "io/torch_archive.h"
#include "model/layers.h"
#include "model/lm_loss.h"
#include "model/weights.h"
#include "train/adamw.h"
#include "train/checkpoint_state.h"
#include "train/device.h"
#include "train/lora.h"
#include "train/progress.h"
#include "train/schedule.h"
#include "train/sharded_adamw.h"
#include "train/step_values.h"
#include "train/watchdog.h"

namespace llava::train {

namespace {

namespace fs = std::filesystem;

// A tensor the optimizer updates, named as the PEFT-wrapped HF model's named_parameters() would list it
// (minus PEFT's prefixes): base parameters by their canonical name, adapters as <module>.lora_{A,B}.weight.
struct Trainable {
  std::string name;
  torch::Tensor param;
  bool no_decay;   // biases and norm weights: HF Trainer puts them in the weight_decay 0 group
  bool projector;  // LLaVATrainer gives these mm_projector_lr when it is set
};

bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }
bool is_projector(const std::string& name) { return starts_with(name, "model.multi_modal_projector."); }
bool is_vision(const std::string& name) { return starts_with(name, "model.vision_tower."); }

// PEFT target_modules from the config. LLaVA's default (find_all_linear_names) is every Linear of the
// language model; lm_head lives outside model.language_model, so it is never a default target.
LoraConfig lora_config_for(const TrainConfig& c) {
  LoraConfig l;
  l.r = c.lora_r;
  l.alpha = c.lora_alpha;
  l.dropout = c.lora_dropout;
  l.use_rslora = c.use_rslora;
  auto& t = l.target_modules;
  if (!c.lora_target_regex.empty()) {
    t.kind = TargetModules::Kind::Regex;
    t.regex = c.lora_target_regex;
  } else if (c.lora_target_modules == std::vector<std::string>{"all-linear"}) {
    t.kind = TargetModules::Kind::AllLinear;
  } else if (!c.lora_target_modules.empty()) {
    t.kind = TargetModules::Kind::Suffixes;
    t.suffixes = c.lora_target_modules;
  } else {
    t.kind = TargetModules::Kind::Regex;
    t.regex = kLlavaDefaultLoraRegex;
  }
  return l;
}

// Base weights that train: the projector always; the vision tower with unfreeze_mm_vision_tower; the
// LLM (and lm_head) only in a full fine-tune; plus PEFT's modules_to_save.
bool base_param_trains(const TrainConfig& c, const std::string& module_path, const std::string& name) {
  for (auto& m : c.modules_to_save) {  // PEFT: the module path equals the entry or ends with "." + entry
    const bool suffix = module_path.size() > m.size() && module_path.substr(module_path.size() - m.size() - 1) == "." + m;
    if (module_path == m || suffix) return true;
  }
  if (is_projector(name)) return true;
  if (is_vision(name)) return c.unfreeze_mm_vision_tower;
  return !c.tune_mm_mlp_adapter && !c.lora_enable && !c.freeze_backbone;
}

// Marks every parameter trainable or frozen and lists the trainable ones in PEFT's named_parameters()
// order: module tree pre-order, a module's own parameters first, then its adapter's lora_A, lora_B.
std::vector<Trainable> choose_trainables(model::LlavaForConditionalGeneration& model, const TrainConfig& c,
                                         const std::vector<LoraModule>& lora) {
  std::map<std::string, std::shared_ptr<LoraAdapter>> adapters;
  for (auto& m : lora) adapters[m.path] = m.adapter;
  std::vector<Trainable> out;
  for (auto& item : model->named_modules("", /*include_self=*/true)) {
    const std::string& path = item.key();
    const bool is_norm = item.value()->as<model::LayerNormImpl>() || item.value()->as<model::RMSNormImpl>();
    for (auto& p : item.value()->named_parameters(/*recurse=*/false)) {
      const std::string name = path.empty() ? p.key() : path + "." + p.key();
      const bool trains = base_param_trains(c, path, name);
      p.value().set_requires_grad(trains);
      if (trains) out.push_back({name, p.value(), is_norm || p.key() == "bias", is_projector(name)});
    }
    auto it = adapters.find(path);
    if (it == adapters.end()) continue;
    for (auto* t : {&it->second->lora_A, &it->second->lora_B}) t->set_requires_grad(true);
    out.push_back({path + ".lora_A.weight", it->second->lora_A, false, is_projector(path + ".")});
    out.push_back({path + ".lora_B.weight", it->second->lora_B, false, is_projector(path + ".")});
  }
  return out;
}

// HF Trainer's decay / no-decay groups; LLaVATrainer's separate projector groups when mm_projector_lr > 0.
std::vector<ParamGroup> param_groups(const std::vector<Trainable>& trainables, const TrainConfig& c) {
  const bool split_projector = c.mm_projector_lr > 0;
  std::vector<ParamGroup> groups = {{"decay", {}, {}, c.learning_rate, c.learning_rate, c.weight_decay},
                                    {"no_decay", {}, {}, c.learning_rate, c.learning_rate, 0.0},
                                    {"projector_decay", {}, {}, c.mm_projector_lr, c.mm_projector_lr, c.weight_decay},
                                    {"projector_no_decay", {}, {}, c.mm_projector_lr, c.mm_projector_lr, 0.0}};
  for (auto& t : trainables) {
    auto& g = groups[(split_projector && t.projector ? 2 : 0) + (t.no_decay ? 1 : 0)];
    g.names.push_back(t.name);
    g.params.push_back(t.param);
  }
  std::vector<ParamGroup> non_empty;
  for (auto& g : groups)
    if (!g.params.empty()) non_empty.push_back(std::move(g));
  return non_empty;
}

// LoRA A/B of the modules this run trains from a PEFT adapter dir (--init-lora-from, so a Python PEFT loop
// and this trainer start from the same adapters, or a resumed checkpoint, ours or HF Trainer + PEFT's) in
// any naming PEFT reads. The adapter must hold exactly these modules with the config's r / lora_alpha /
// use_rslora; `what` starts each error ("cannot resume", "--init-lora-from").
void load_peft_adapters(model::LlavaForConditionalGeneration& model, const std::vector<LoraModule>& lora,
                        const std::string& dir, const TrainConfig& cfg, const std::string& what) {
  const auto adapter = checkpoint::read_lora_adapter(model, dir);
  const std::string adapter_config = (fs::path(dir) / "adapter_config.json").string();
  if (adapter.r != cfg.lora_r || adapter.lora_alpha != cfg.lora_alpha || adapter.use_rslora != cfg.use_rslora)
    fail(adapter_config, what + ": the adapter has r " + std::to_string(adapter.r) + ", lora_alpha " +
                             format_float(adapter.lora_alpha) + ", use_rslora " + (adapter.use_rslora ? "true" : "false") +
                             " but the config says lora_r " + std::to_string(cfg.lora_r) + ", lora_alpha " +
                             format_float(cfg.lora_alpha) + ", use_rslora " + (cfg.use_rslora ? "true" : "false") +
                             "; nothing was changed");
  std::set<std::string> targets;
  for (auto& m : lora) targets.insert(m.path);
  for (auto& [path, w] : adapter.modules)
    if (!targets.count(path))
      fail(adapter.tensor_file, what + ": the adapter has LoRA weights for '" + path + "' ('" + w.key +
                                    "'), which this config does not train (lora_target_modules differ); nothing was changed");
  torch::NoGradGuard no_grad;
  for (auto& m : lora) {
    auto it = adapter.modules.find(m.path);
    if (it == adapter.modules.end())
      fail(adapter.tensor_file, what + ": no LoRA weights for '" + m.path + "', which this config trains "
                                "(lora_target_modules differ); nothing was changed");
    for (auto [value, tensor] : {std::pair{it->second.A, &m.adapter->lora_A}, std::pair{it->second.B, &m.adapter->lora_B}}) {
      if (value.sizes() != tensor->sizes())
        fail(adapter.tensor_file, what + ": '" + it->second.key + "' and its lora_B have shapes " +
                                      c10::str(it->second.A.sizes()) + " / " + c10::str(it->second.B.sizes()) +
                                      ", the model's LoRA for '" + m.path + "' needs " + c10::str(m.adapter->lora_A.sizes()) +
                                      " / " + c10::str(m.adapter->lora_B.sizes()));
      tensor->copy_(value);
    }
  }
}

// save_on_interrupt: SIGTERM/SIGINT only raise a flag; the loop saves at the end of the current step.
volatile std::sig_atomic_t g_interrupt_signal = 0;
extern "C" void note_interrupt(int signal_number) { g_interrupt_signal = signal_number; }

// True on every rank once any rank got the signal (with several ranks one tiny all-reduce per step, read
// back: save_on_interrupt costs that read). The signal is then recorded on every rank, so each exits
// 128 + its number: the run stopped before its end.
bool interrupt_requested(dist::Communicator& comm, HostReads& reads, int64_t step) {
  if (comm.world_size() == 1) return g_interrupt_signal != 0;
  auto signal_numbers =
      torch::full({1}, static_cast<float>(g_interrupt_signal), torch::TensorOptions().device(comm.device()));
  comm.allreduce(signal_numbers, dist::Reduce::Sum);
  if (reads.read(signal_numbers, step).item<float>() == 0) return false;
  if (g_interrupt_signal == 0) g_interrupt_signal = SIGTERM;  // a peer's signal (several may differ)
  return true;
}

// What the run is, for the resume check (see resume_state.h).
checkpoint::RunSignature run_signature(const TrainConfig& cfg, const std::vector<Trainable>& trainables, int world_size,
                           int64_t samples_per_step) {
  checkpoint::RunSignature s;
  for (auto& t : trainables) s.trainables.push_back({t.name, t.param.sizes().vec()});
  if (cfg.lora_enable)
    s.lora = {{"r", cfg.lora_r}, {"lora_alpha", cfg.lora_alpha}, {"use_rslora", cfg.use_rslora},
              {"target_modules", cfg.lora_target_modules}, {"target_regex", cfg.lora_target_regex}};
  s.dtype = cfg.bf16 ? "bfloat16" : "float32";
  s.samples_per_step = samples_per_step;
  s.world_size = world_size;
  s.zero_stage = cfg.zero_stage;
  return s;
}

// One micro-batch's share of the step loss: sum of its token losses / tokens of the whole accumulation
// window. Summed over the window this is the mean token loss of all its micro-batches, which is what
// transformers >= 4.46 Trainer computes (num_items_in_batch), so a sample's weight does not depend on
// how the window is cut into micro-batches.
// lm_head runs only at the scored positions (image rows and the prompt have labels -100), which is
// the same loss as HF's over all logits without the [B,T,V] logits.
// `layout` is the batch's shapes, counted on the host (its scored tokens too), so the forward never waits
// for the device to learn them; `on_device` the batch where the model is. `window_tokens`: 0-d fp64 on the
// device, never read by the host.
torch::Tensor micro_batch_loss(model::LlavaForConditionalGeneration& model, const model::BatchLayout& layout,
                               const data::Batch& on_device, const torch::Tensor& window_tokens) {
  const bool has_pixels = on_device.pixel_values.defined() && on_device.pixel_values.size(0) > 0;
  auto loss = model::scored_causal_lm_loss(model, on_device.input_ids, on_device.attention_mask,
                                           has_pixels ? on_device.pixel_values : torch::Tensor(), on_device.labels,
                                           layout);
  const int64_t n = layout.scored.numel();  // tokens the loss scores (labels shifted by one)
  if (n == 0) return loss;  // 0 that keeps the graph; contributes nothing
  // n / tokens in fp64, then the fp32 multiply: bitwise what `loss * (double(n) / tokens)` on the host gives.
  // Where the count is (the communicator's device); a 0-d CPU tensor (Gloo) multiplies a CUDA loss as a scalar.
  auto share = torch::full({}, static_cast<double>(n), window_tokens.options()) / window_tokens.clamp_min(1);
  return loss * share.to(torch::kFloat32);
}

// The HF log line: {'loss': ..., 'grad_norm': ..., 'learning_rate': ..., 'epoch': ...}
std::string log_line(double loss, double grad_norm, double lr, double epoch) {
  return "{'loss': " + format_float(loss) + ", 'grad_norm': " + format_float(grad_norm) +
         ", 'learning_rate': " + format_float(lr) + ", 'epoch': " + format_float(epoch) + "}";
}

// Memory figures of every rank (collective): final optimizer-state bytes and the peak high point.
struct RankMemory {
  int64_t state_bytes;
  MemoryUsage peak;
};
std::vector<RankMemory> gather_memory(const ShardedAdamW& optimizer, dist::Communicator& comm) {
  const MemoryUsage& m = optimizer.peak_memory();
  auto mine = torch::tensor({static_cast<double>(optimizer.state_bytes()), static_cast<double>(m.params),
                             static_cast<double>(m.grads), static_cast<double>(m.optimizer),
                             static_cast<double>(m.transient)},
                            torch::kFloat64);
  auto all = comm.world_size() > 1 ? comm.all_gather(mine.to(comm.device())).cpu() : mine;
  std::vector<RankMemory> out;
  auto at = [&](int64_t i) { return static_cast<int64_t>(all[i].item<double>()); };
  for (int64_t r = 0; r < all.numel() / 5; ++r)
    out.push_back({at(5 * r), {at(5 * r + 1), at(5 * r + 2), at(5 * r + 3), at(5 * r + 4)}});
  return out;
}

void write_metrics(const std::string& path, const std::vector<StepMetrics>& history,
                   const std::vector<Trainable>& trainables, const ShardedAdamW& optimizer,
                   const std::vector<RankMemory>& memory, const std::vector<checkpoint::SaveTiming>& saves,
                   const HostReads& host_reads) {
  nlohmann::json steps = nlohmann::json::array();
  for (auto& m : history)
    steps.push_back({{"step", m.step}, {"loss", m.loss}, {"grad_norm", m.grad_norm},
                     {"learning_rate", m.learning_rate}, {"epoch", m.epoch}});
  nlohmann::json names = nlohmann::json::array();
  for (auto& t : trainables) names.push_back(t.name);
  const auto& layout = optimizer.layout();
  std::vector<int64_t> state_bytes, params, grads, opt, transient, total;
  for (auto& m : memory) {
    state_bytes.push_back(m.state_bytes);
    params.push_back(m.peak.params);
    grads.push_back(m.peak.grads);
    opt.push_back(m.peak.optimizer);
    transient.push_back(m.peak.transient);
    total.push_back(m.peak.total());
  }
  int64_t largest = 0;
  for (auto& p : layout.params) largest = std::max(largest, p.numel);
  // Per rank, at its high point with the largest params + grads + optimizer bytes (measured from the
  // live tensors, see MemoryUsage): each figure is that moment's.
  nlohmann::json peak = {{"param_bytes", params}, {"grad_bytes", grads}, {"optimizer_bytes", opt},
                         {"transient_bytes", transient}, {"total_bytes", total}};
  nlohmann::json zero = {{"stage", optimizer.zero_stage()}, {"world_size", memory.size()},
                         {"optimizer_state_bytes", state_bytes}, {"padding_numel", layout.padding()},
                         {"trainable_numel", layout.total_numel}, {"shard_numel", layout.shard_numel},
                         {"largest_param_numel", largest}, {"bucket_numel", optimizer.bucket_numel()},
                         {"peak_memory", peak}};
  nlohmann::json save_times = nlohmann::json::array();  // rank 0's: how long each save held the step, and wrote
  for (auto& t : saves)
    save_times.push_back({{"step", t.step}, {"waited_seconds", t.waited_seconds}, {"blocked_seconds", t.blocked_seconds},
                          {"write_seconds", t.write_seconds}, {"update_waited_seconds", t.update_waited_seconds}});
  nlohmann::json reads = nlohmann::json::array();  // rank 0's reads of device values, by step (step_values.h)
  for (auto& [step, n] : host_reads.per_step()) reads.push_back({{"step", step}, {"reads", n}});
  io::write_file_atomic(path, nlohmann::json{{"steps", steps}, {"trainable", names}, {"zero", zero},
                                             {"saves", save_times}, {"host_reads", reads}}
                                  .dump(1) + "\n");
}

}  // namespace

std::string format_float(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  auto end = std::to_chars(buf, buf + sizeof buf, x, std::chars_format::scientific).ptr;  // shortest round trip
  std::string s(buf, end), sign;
  if (s[0] == '-') sign = "-", s.erase(0, 1);
  const size_t e = s.find('e');
  const int exp = std::stoi(s.substr(e + 1));
  std::string digits;
  for (size_t i = 0; i < e; ++i)
    if (s[i] != '.') digits += s[i];
  if (exp < -4 || exp >= 16) {  // Python's repr switches to exponent form outside [1e-4, 1e16)
    std::string a = std::to_string(std::abs(exp));
    return sign + digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "") + "e" +
           (exp < 0 ? "-" : "+") + (a.size() < 2 ? "0" : "") + a;
  }
  if (exp < 0) return sign + "0." + std::string(-exp - 1, '0') + digits;
  if (static_cast<int>(digits.size()) <= exp + 1) return sign + digits + std::string(exp + 1 - digits.size(), '0') + ".0";
  return sign + digits.substr(0, exp + 1) + "." + digits.substr(exp + 1);
}

std::vector<StepMetrics> train(const TrainConfig& cfg, const TrainDebugOptions& debug, std::ostream& main_log) {
  // One process, or one rank of a torchrun / llava-run launch: the same recipe, data cut by rank.
  // The device first: a CUDA device this machine lacks is a config error before anything else happens.
  const torch::Device device = training_device(cfg, dist::read_dist_env().local_rank);
  apply_tf32(cfg, device);
  dist::CommOptions comm_options;
  comm_options.timeout = std::chrono::milliseconds(static_cast<int64_t>(cfg.ddp_timeout * 1000));
  comm_options.device = device;  // NCCL for CUDA tensors when built with it, else Gloo
  auto comm = dist::Communicator::from_env(comm_options);
  const bool is_main = comm.rank() == 0;
  std::ostream null_log(nullptr);  // other ranks log nothing
  std::ostream& log = is_main ? main_log : null_log;

  // The model's config and the data first: every check of the config against them runs before the
  // weights load and long before anything is written to output_dir.
  const auto model_config = model::load_config(cfg.model_name_or_path, cfg.vision_tower);
  const auto dataset = data::make_dataset(cfg.data, image_tokens_for(model_config));
  // An added token past the embedding would fail only in the first batch that holds it.
  dataset.tokenizer().check_ids_fit(model_config.text.vocab_size, model::config_json_path(cfg.model_name_or_path));
  check_against_model_and_data(cfg, model_config, static_cast<int64_t>(dataset.size()), comm.world_size());
  // Samples LLaVA's tokenization-mismatch rule masks whole train nothing: a data set mostly made of them is
  // refused here, before anything is written; the others are named (data/masked_samples.h).
  data::MaskedSampleReport masked_samples(dataset);
  for (auto& line : masked_samples.scan()) log << line << "\n";
  if (!cfg.ignored_keys.empty()) {
    std::string keys;
    for (const auto& k : cfg.ignored_keys) keys += (keys.empty() ? "" : ", ") + k;
    log << "config: accepted for HF/LLaVA compatibility and ignored: " << keys << std::endl;
  }

  // Model, then what trains. bf16: the model computes in bf16; the optimizer keeps fp32 masters.
  auto loaded = model::load_model(cfg.model_name_or_path, cfg.bf16 ? torch::kBFloat16 : torch::kFloat32,
                                  cfg.vision_tower, device);
  auto& model = loaded.model;
  model->train();
  model->set_gradient_checkpointing(cfg.gradient_checkpointing);
  // Stage 2 starts from stage 1's projector (LLaVA's --pretrain_mm_mlp_adapter .../mm_projector.bin).
  if (!cfg.pretrain_mm_mlp_adapter.empty()) checkpoint::load_projector_weights(model, cfg.pretrain_mm_mlp_adapter);
  // As HF Trainer's set_seed(args.seed): the global generator starts from `seed` in every run (PEFT's init
  // draws lora_A from it, and llava_rng_state.safetensors is then the same for identical runs of any stage).
  torch::manual_seed(cfg.data.seed);
  std::vector<LoraModule> lora;
  if (cfg.lora_enable) {
    try {
      lora = attach_lora(*model, lora_config_for(cfg));
    } catch (const Error& e) {  // name the config key that chose the targets
      const std::string key = cfg.lora_target_regex.empty() ? "lora_target_modules" : "lora_target_regex";
      throw Error("config key '" + key + "': " + e.what());
    }
    if (!debug.init_lora_from.empty()) load_peft_adapters(model, lora, debug.init_lora_from, cfg, "--init-lora-from");
  } else if (!debug.init_lora_from.empty()) {
    throw Error("--init-lora-from needs lora_enable: true");
  }
  const auto trainables = choose_trainables(model, cfg, lora);
  if (trainables.empty()) throw Error("config: nothing to train (every parameter is frozen)");

  // Data: batches exactly as `llava preprocess` writes them; every rank takes its part of each global batch.
  data::DistributedSampler sampler(data::sampler_config_for(cfg.data), dataset.modality_lengths(), comm.rank(),
                                   comm.world_size());
  const int64_t batches_per_epoch = sampler.epoch_length() / sampler.global_batch();
  if (batches_per_epoch == 0) throw Error("data set has fewer samples than one batch (dataloader_drop_last)");

  // Steps as HF Trainer counts them: an epoch's last window may hold fewer micro-batches.
  const int64_t accum = cfg.gradient_accumulation_steps;
  const int64_t steps_per_epoch = (batches_per_epoch + accum - 1) / accum;
  const int64_t max_steps = cfg.max_steps > 0 ? cfg.max_steps
                                              : static_cast<int64_t>(std::ceil(cfg.num_train_epochs * steps_per_epoch));
  const int64_t epochs = (max_steps + steps_per_epoch - 1) / steps_per_epoch;

  std::vector<std::string> backward_order;  // backward makes the gradients roughly in reverse model order
  for (auto it = trainables.rbegin(); it != trainables.rend(); ++it) backward_order.push_back(it->name);
  ShardedAdamW optimizer(param_groups(trainables, cfg), {cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon}, comm,
                         static_cast<int>(cfg.zero_stage), cfg.reduce_bucket_size, backward_order);
  Schedule schedule{schedule_from_name(cfg.lr_scheduler_type),
                    warmup_steps_for(cfg.warmup_steps, cfg.warmup_ratio, max_steps), max_steps, cfg.num_cycles,
                    cfg.min_lr > 0 ? cfg.min_lr / cfg.learning_rate : cfg.min_lr_rate};
  int64_t trainable_count = 0, total_count = 0;
  for (auto& t : trainables) trainable_count += t.param.numel();
  for (auto& p : model->parameters()) total_count += p.numel();
  for (auto& m : lora) total_count += m.adapter->lora_A.numel() + m.adapter->lora_B.numel();
  log << "training: " << dataset.size() << " samples, " << batches_per_epoch << " batches of "
      << cfg.data.per_device_train_batch_size << " x " << comm.world_size() << " ranks per epoch, " << max_steps
      << " optimizer steps (accumulation " << accum << ", ZeRO " << cfg.zero_stage << ", "
      << (cfg.bf16 ? "bf16" : "fp32") << "); trainable parameters: " << trainable_count << " of " << total_count
      << (lora.empty() ? "" : ", LoRA on " + std::to_string(lora.size()) + " Linear modules") << std::endl;

  double logged_loss = 0;        // sum of step losses since the last log line (as last read back)
  int64_t last_logged_step = 0;  // HF Trainer's _globalstep_last_logged: a log line averages over the steps since
  checkpoint::TrainerState state;
  state.max_steps = max_steps;
  state.logging_steps = cfg.logging_steps;
  state.save_steps = cfg.save_steps;
  state.train_batch_size = cfg.data.per_device_train_batch_size;
  state.num_train_epochs = epochs;
  const bool save_every = cfg.save_strategy == "steps" && cfg.save_steps > 0;
  const int64_t samples_per_step = accum * sampler.global_batch();
  auto signature = [&](int64_t step) {
    auto s = run_signature(cfg, trainables, comm.world_size(), samples_per_step);
    s.sampler = {{"epoch", step / steps_per_epoch}, {"position", (step % steps_per_epoch) * samples_per_step}};
    s.logging = checkpoint::RunSignature::LogProgress{last_logged_step, logged_loss};
    return s;
  };
  int64_t step = 0;
  if (const std::string resume = checkpoint::checkpoint_to_resume(cfg.resume_from_checkpoint, cfg.output_dir,
                                                                       weights_kind(cfg, lora), log);
      !resume.empty()) {
    auto load_lora = [&](const std::string& dir) { load_peft_adapters(model, lora, dir, cfg, "cannot resume"); };
    const auto restored = restore_training_state(resume, cfg, loaded, lora, optimizer, signature(0), comm.rank(),
                                                 load_lora, log);
    step = restored.trainer.global_step;
    state.global_step = step;  // a run resumed at max_steps saves checkpoint-<step>, not checkpoint-0
    state.epoch = restored.trainer.epoch;
    state.log_history = restored.trainer.log_history;
    last_logged_step = step;  // as HF Trainer: the first log line averages over the steps this run makes
    if (const auto& saved = restored.saved; saved && saved->logging) {  // ours: continue the line
      last_logged_step = saved->logging->last_logged_step;
      logged_loss = saved->logging->loss_since_log;
    }
    log << "resuming from " << resume << " at step " << step << std::endl;
  }
  // Loss and grad_norm stay on the device; they come back at log lines, saves and the end (step_values.h).
  HostReads host_reads;
  StepValues values(device, logged_loss, host_reads);
  auto& history = values.history();
  int64_t optimizer_reads = 0;  // optimizer.host_reads() already counted
  std::optional<torch::Tensor> tokens_seen;  // several ranks: scored tokens of every window so far, summed
  // Without skip_nonfinite_steps a NaN/Inf step is found where its values come back (not in the step that
  // made it): the run stops there, before any save holds the weights that step updated.
  auto read_back_values = [&](int64_t at_step) {
    const auto bad = values.read_back(at_step);
    logged_loss = values.loss_since_log();
    if (bad && !cfg.skip_nonfinite_steps)
      throw Error("step " + std::to_string(bad->step) + ": loss " + format_float(bad->loss) + ", grad_norm " +
                  format_float(bad->grad_norm) + ": not finite; stopping at step " + std::to_string(at_step) +
                  " (read back at log lines and saves: no checkpoint holds an update of step " +
                  std::to_string(bad->step) + " or later; set skip_nonfinite_steps: true to skip such steps)");
  };
  std::optional<double> shown_loss, shown_grad_norm;  // the progress bar's: the last log line's
  const int64_t first_epoch = step / steps_per_epoch, first_window = step % steps_per_epoch;
  // Rank 0 on a terminal: a bar redrawn in place, log lines above it; otherwise the log lines only.
  Progress progress(log, is_main && is_terminal(main_log), Progress::steady_seconds, terminal_columns(main_log));
  bool stopped = false;  // --stop-after-steps (as if killed right after that step) or save_on_interrupt
  int64_t skipped_steps = 0;  // non-finite steps skipped
  int64_t micro_batches_run = 0;
  int64_t samples_drawn = 0;  // this rank's, for the masked-sample summary
  bool scored_any = false;  // any scored token yet in this run
  const int64_t first_step = step;
  // An epoch (or the whole run) without one token to learn: the data is at fault. A rank that scored tokens
  // knows there were some; one that did not reads the global count, once, when the check is due.
  auto check_tokens_scored = [&](int64_t done, int64_t local_tokens, const torch::Tensor& window_tokens) {
    scored_any = scored_any || local_tokens > 0;
    if (scored_any) return;
    if (comm.world_size() > 1) tokens_seen = tokens_seen ? *tokens_seen + window_tokens : window_tokens.clone();
    if (!(done - first_step + 1 >= steps_per_epoch || done + 1 >= max_steps)) return;
    if (comm.world_size() > 1 && host_reads.read(*tokens_seen, done + 1).item<double>() > 0) {
      scored_any = true;
      return;
    }
    std::string files;
    for (auto& f : cfg.data.data_path) files += (files.empty() ? "" : ", ") + f;
    throw Error(files + ": no record in a whole epoch has a token to learn (every label is "
                "masked: answers missing, or cut off by model_max_length " +
                std::to_string(cfg.data.model_max_length) + ")");
  };
  if (cfg.save_on_interrupt) {
    std::signal(SIGTERM, note_interrupt);
    std::signal(SIGINT, note_interrupt);
  }
  checkpoint::CheckpointSaver saver(save_options(cfg, loaded, async_save_enabled(cfg, device)), comm);
  const LoraConfig lora_config = lora_config_for(cfg);
  auto save = [&] {  // checkpoint-<step>: collective
    saver.save([&] {
      return training_state(cfg, loaded, lora, lora_config, optimizer, comm, saver.async(), state, signature(step),
                            schedule.factor(step));
    });
  };
  Watchdog watchdog(cfg.step_timeout, comm.rank(), step);  // step_timeout: a rank stuck anywhere exits
  // A library error inside the loop (a tensor op, a collective) names where this rank was.
  try {
    for (int64_t epoch = first_epoch; epoch < epochs && step < max_steps && !stopped; ++epoch) {
      // A resumed run starts at the next window of its epoch: no batch is replayed.
      const int64_t skip_windows = epoch == first_epoch ? first_window : 0;
      data::DataLoader loader(dataset, sampler, {epoch, skip_windows * samples_per_step}, cfg.data.dataloader_num_workers,
                              /*prefetch_batches=*/4, pin_batches(cfg, device));
      int64_t batches_seen = skip_windows * accum;
      for (int64_t window = skip_windows; window < steps_per_epoch && step < max_steps && !stopped; ++window) {
        // One optimizer step: a window of micro-batches on every rank, their gradients summed.
        std::vector<data::Batch> micro_batches;
        watchdog.enter(Phase::data);
        hang_here_if_testing(step + 1, comm.rank());
        const int64_t size = std::min(accum, batches_per_epoch - window * accum);
        for (int64_t i = 0; i < size; ++i)
          if (auto b = loader.next()) micro_batches.push_back(std::move(*b));
        if (micro_batches.empty()) break;
        for (auto& b : micro_batches) {
          samples_drawn += b.input_ids.size(0);
          for (auto& line : masked_samples.note(b)) progress.log(line);
        }
        // The loss is the mean over every scored token of the global window, so ranks agree on its count:
        // this rank's count is known on the host; the global one is summed on the communicator's device
        // and used there (no read back).
        std::vector<model::BatchLayout> layouts;
        int64_t local_tokens = 0;
        for (auto& b : micro_batches) {
          layouts.push_back(model::batch_layout(b.input_ids, b.attention_mask, b.labels, model->config.image_token_index));
          local_tokens += layouts.back().scored.numel();
        }
        auto window_tokens = torch::full({1}, static_cast<double>(local_tokens),
                                         torch::TensorOptions().dtype(torch::kFloat64).device(comm.device()));
        watchdog.enter(Phase::collective);
        allreduce_sum(comm, window_tokens);
        window_tokens = window_tokens.reshape({});
        check_tokens_scored(step, local_tokens, window_tokens);

        // The window's batches go to the device at once: the copies run while the first forward starts.
        std::vector<data::Batch> on_device;
        for (auto& b : micro_batches) on_device.push_back(batch_on_device(b, device));
        // Summed where the losses are, and there it stays (the log and saves read it back).
        auto loss_sum = torch::zeros({1}, torch::TensorOptions().dtype(torch::kFloat64).device(device));
        for (size_t i = 0; i < micro_batches.size(); ++i) {
          watchdog.enter(Phase::forward);
          torch::Tensor l;
          {
            DeviceSyncWarnings no_waits_expected(debug.warn_device_syncs, device);
            l = micro_batch_loss(model, layouts[i], on_device[i], window_tokens);
            watchdog.enter(Phase::backward);
            if (l.requires_grad()) l.backward();  // e.g. a text-only micro-batch in stage 1 reaches no trainable
          }
          optimizer.finish_micro_batch();       // every rank (ZeRO 2: the buckets its backward did not reduce)
          loss_sum += l.detach().to(torch::kFloat64);
          if (++micro_batches_run == debug.stop_after_micro_batches) {  // as if killed here
            read_back_values(step);
            return history;
          }
        }
        watchdog.enter(Phase::collective);
        allreduce_sum(comm, loss_sum);
        batches_seen += static_cast<int64_t>(micro_batches.size());

        const torch::Tensor grad_norm = optimizer.reduce_gradients();  // the same on every rank, on the device
        const double factor = schedule.factor(step);
        StepMetrics m{step + 1, 0, 0, cfg.learning_rate * factor,
                      epoch + static_cast<double>(batches_seen) / batches_per_epoch};
        if (!cfg.skip_nonfinite_steps) {  // a NaN/Inf step stops the run where its values are read back
          saver.before_update();  // an async save reading the parameters and moments in place ends first
          optimizer.update(cfg.max_grad_norm, factor);
          values.add(m, loss_sum, grad_norm);
        } else {  // skipping must be decided before the update: the one read per step this option costs
          m = values.add_and_read(m, loss_sum, grad_norm, step - last_logged_step);
          if (std::isfinite(m.loss) && std::isfinite(m.grad_norm)) {
            saver.before_update();
            optimizer.update(cfg.max_grad_norm, factor);
          } else {
            optimizer.discard();
            progress.log("step " + std::to_string(m.step) + ": loss " + format_float(m.loss) + ", grad_norm " +
                         format_float(m.grad_norm) + ": update skipped (" + std::to_string(++skipped_steps) +
                         " skipped so far; skip_nonfinite_steps: true)");
          }
        }
        ++step;
        host_reads.count(step, optimizer.host_reads() - optimizer_reads);
        optimizer_reads = optimizer.host_reads();
        watchdog.step_done(step);

        int64_t samples = 0;  // this rank's; every rank takes equal batches
        for (auto& b : micro_batches) samples += b.input_ids.size(0);
        state.global_step = step;
        state.epoch = m.epoch;
        const bool log_now = cfg.logging_steps > 0 && step % cfg.logging_steps == 0;
        if (log_now || values.pending_full()) read_back_values(step);
        double mean_loss = 0;
        if (log_now) {
          // HF Trainer's _maybe_log_save_evaluate: the mean over the steps since the last line (fewer than
          // logging_steps after a resume from a checkpoint that did not carry the line in progress); grad_norm
          // and learning_rate are this step's.
          mean_loss = logged_loss / static_cast<double>(step - last_logged_step);
          shown_loss = mean_loss;
          shown_grad_norm = history.back().grad_norm;
        }
        progress.update({step, max_steps, shown_loss, m.learning_rate, shown_grad_norm, samples * comm.world_size()});
        if (log_now) {
          progress.log(log_line(mean_loss, *shown_grad_norm, m.learning_rate, m.epoch));
          state.log_history.push_back({{"loss", mean_loss}, {"grad_norm", *shown_grad_norm},
                                       {"learning_rate", m.learning_rate}, {"epoch", m.epoch}, {"step", step}});
          values.start_log_line();
          logged_loss = 0;
          last_logged_step = step;
        }
        watchdog.enter(Phase::save);
        saver.check();  // a background save that failed ends the run here, on every rank
        if (save_every && step % cfg.save_steps == 0) {
          read_back_values(step);  // the line in progress goes into the checkpoint; a NaN/Inf step stops here
          save();
        }
        if (debug.stop_after_steps > 0 && step == debug.stop_after_steps) stopped = true;
        if (cfg.save_on_interrupt && interrupt_requested(comm, host_reads, step)) {
          if (!(save_every && step % cfg.save_steps == 0)) {
            read_back_values(step);
            save();
          }
          saver.finish();
          progress.log("interrupted by a signal: saved checkpoint-" + std::to_string(step) + ", stopping");
          stopped = true;
        }
      }
    }
  } catch (const c10::Error& e) {
    throw Error("training, rank " + std::to_string(comm.rank()) + ", " + watchdog.where() + ": " +
                e.what_without_backtrace());
  }

  read_back_values(step);  // the steps since the last read (a no-op when the last step logged)
  progress.finish();
  auto masked_counts = torch::tensor({static_cast<double>(masked_samples.masked_drawn()), static_cast<double>(samples_drawn)},
                                     torch::kFloat64);
  allreduce_sum(comm, masked_counts);
  const auto masked_summary = masked_samples.summary(static_cast<int64_t>(masked_counts[0].item<double>()),
                                                     static_cast<int64_t>(masked_counts[1].item<double>()));
  if (!masked_summary.empty()) log << masked_summary << std::endl;
  watchdog.enter(Phase::save);
  // HF Trainer saves at the end too (unless the last step just did).
  if (!stopped && cfg.save_strategy == "steps" && step > 0 && !(save_every && step % cfg.save_steps == 0))
    save();
  saver.finish();
  if (!debug.metrics_out.empty()) {
    const auto memory = gather_memory(optimizer, comm);
    if (is_main) write_metrics(debug.metrics_out, history, trainables, optimizer, memory, saver.timings(), host_reads);
  }
  if (!debug.save_trainables.empty()) {  // rank 0 at the path, rank R > 0 at path.rank<R>
    io::NamedTensors out;
    for (auto& t : trainables) out.push_back({t.name, t.param.detach().to(torch::kFloat32)});
    io::save_safetensors(debug.save_trainables + (is_main ? "" : ".rank" + std::to_string(comm.rank())), out);
  }
  return history;
}

int stopped_by_signal() { return g_interrupt_signal; }

data::ImageTokens image_tokens_for(const model::LlavaConfig& c) {
  return {c.image_token_index, c.image_seq_length()};
}

}  // namespace llava::train
