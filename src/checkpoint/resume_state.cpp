#include "checkpoint/resume_state.h"

#include <ATen/CPUGeneratorImpl.h>

#include <filesystem>
#include <mutex>
#include <set>

#include "checkpoint/checkpoint_dir.h"
#include "checkpoint/state_checks.h"
#include "io/error.h"
#include "io/file_util.h"
#include "io/json_input.h"
#include "io/safetensors.h"

namespace llava::checkpoint {

namespace {
namespace fs = std::filesystem;
const char* kSignatureFile = "llava_resume.json";
const char* kRngFile = "llava_rng_state.safetensors";
const char* kMasterFile = "llava_master_weights.safetensors";

std::string in_dir(const std::string& dir, const char* file) { return (fs::path(dir) / file).string(); }

std::string shape_text(const std::vector<int64_t>& shape) { return nlohmann::json(shape).dump(); }

std::vector<int64_t> shape_from_json(const nlohmann::json& j, const std::string& where) {
  if (!j.is_array()) fail(where, "expected a shape (a list of sizes), got " + std::string(j.type_name()));
  std::vector<int64_t> shape;
  for (auto& d : j) shape.push_back(io::json_integer(d, where + ": shape", 0));
  return shape;
}
// {"epoch", "position"} of the next batch: whole numbers, the position a multiple of the samples an optimizer
// step takes (the trainer writes (step % steps_per_epoch) x samples_per_step).
void check_sampler_position(const nlohmann::json& sampler, int64_t samples_per_step, const std::string& path) {
  if (!sampler.is_object()) fail(path, "\"sampler\": expected {\"epoch\": integer, \"position\": integer}");
  for (const char* key : {"epoch", "position"})
    if (!sampler.contains(key)) fail(path, std::string("\"sampler\": no \"") + key + "\"");
  io::json_integer(sampler.at("epoch"), path + ": \"sampler.epoch\"", 0, kMaxStep);
  const int64_t position = io::json_integer(sampler.at("position"), path + ": \"sampler.position\"", 0, kMaxStep);
  if (position % samples_per_step != 0)
    fail(path, "\"sampler.position\" " + std::to_string(position) + " is not a multiple of samples_per_step " +
                   std::to_string(samples_per_step) + " (the trainer saves between optimizer steps)");
}

}  // namespace

void write_run_signature(const std::string& dir, const RunSignature& s) {
  nlohmann::json trainables = nlohmann::json::array();
  for (auto& [name, shape] : s.trainables) trainables.push_back({{"name", name}, {"shape", shape}});
  nlohmann::json j = {{"format", 1},          {"trainables", trainables},   {"lora", s.lora},
                      {"dtype", s.dtype},      {"samples_per_step", s.samples_per_step},
                      {"world_size", s.world_size}, {"zero_stage", s.zero_stage}, {"sampler", s.sampler}};
  if (s.logging)
    j["logging"] = {{"last_logged_step", s.logging->last_logged_step}, {"loss_since_log", s.logging->loss_since_log}};
  io::write_file_atomic(in_dir(dir, kSignatureFile), j.dump(1) + "\n");
}

std::optional<RunSignature> read_run_signature(const std::string& dir) {
  const std::string path = in_dir(dir, kSignatureFile);
  if (!fs::exists(path)) return std::nullopt;
  const auto j = io::read_json_file(path);
  try {
    if (!j.is_object()) fail(path, "expected a resume state object, got " + std::string(j.type_name()));
    if (!j.contains("format") || j.at("format") != 1)
      fail(path, "\"format\": expected 1 (the only format this version reads), got " +
                     (j.contains("format") ? j.at("format").dump() : std::string("none")));
    RunSignature s;
    for (auto& t : j.at("trainables")) s.trainables.push_back({t.at("name"), shape_from_json(t.at("shape"), path + ": trainables")});
    s.lora = j.at("lora");
    s.dtype = j.at("dtype");
    s.samples_per_step = io::json_integer(j.at("samples_per_step"), path + ": samples_per_step", 1);
    s.world_size = io::json_integer(j.at("world_size"), path + ": world_size", 1, 1 << 20);
    s.zero_stage = io::json_integer(j.at("zero_stage"), path + ": zero_stage", 0, 3);
    s.sampler = j.at("sampler");
    check_sampler_position(s.sampler, s.samples_per_step, path);
    if (j.contains("logging")) {
      const auto& l = j.at("logging");
      if (!l.at("last_logged_step").is_number_integer() || !l.at("loss_since_log").is_number())
        fail(path, "\"logging\": expected {\"last_logged_step\": integer, \"loss_since_log\": number}");
      s.logging = RunSignature::LogProgress{l.at("last_logged_step").get<int64_t>(), l.at("loss_since_log").get<double>()};
    }
    return s;
  } catch (const nlohmann::json::exception& e) {
    fail(path, "not a valid resume state: " + io::json_error_text(e));
  }
}

std::vector<std::string> check_resume_compatible(const RunSignature& saved, const RunSignature& now,
                                                 const std::string& where) {
  auto incompatible = [&](const std::string& what) {
    fail(where, "cannot resume: " + what + "; nothing was changed");
  };
  if (saved.lora != now.lora)
    incompatible("the LoRA settings differ (checkpoint " + saved.lora.dump() + ", config " + now.lora.dump() + ")");
  std::set<std::string> now_names;
  for (auto& t : now.trainables) now_names.insert(t.first);
  for (size_t i = 0; i < std::max(saved.trainables.size(), now.trainables.size()); ++i) {
    if (i >= now.trainables.size() || i >= saved.trainables.size() ||
        saved.trainables[i].first != now.trainables[i].first) {
      std::string first_extra;  // the first name only one side trains
      for (auto& t : saved.trainables)
        if (!now_names.count(t.first)) { first_extra = "'" + t.first + "' trains in the checkpoint but not in this config"; break; }
      if (first_extra.empty()) first_extra = "the order of trainable parameters differs at #" + std::to_string(i);
      incompatible("the trainable set differs (checkpoint " + std::to_string(saved.trainables.size()) +
                   " tensors, config " + std::to_string(now.trainables.size()) + "): " + first_extra);
    }
    if (saved.trainables[i].second != now.trainables[i].second)
      incompatible("'" + now.trainables[i].first + "' has shape " + shape_text(saved.trainables[i].second) +
                   " in the checkpoint but " + shape_text(now.trainables[i].second) + " now");
  }
  if (saved.samples_per_step != now.samples_per_step)
    incompatible("an optimizer step takes " + std::to_string(saved.samples_per_step) +
                 " samples in the checkpoint but " + std::to_string(now.samples_per_step) +
                 " now (per_device_train_batch_size x ranks x gradient_accumulation_steps must stay the same)");
  std::vector<std::string> allowed;
  if (saved.dtype != now.dtype) allowed.push_back("weights dtype " + saved.dtype + " -> " + now.dtype);
  if (saved.world_size != now.world_size)
    allowed.push_back("world size " + std::to_string(saved.world_size) + " -> " + std::to_string(now.world_size));
  if (saved.zero_stage != now.zero_stage)
    allowed.push_back("ZeRO stage " + std::to_string(saved.zero_stage) + " -> " + std::to_string(now.zero_stage));
  return allowed;
}

void check_same_model(const std::string& checkpoint_dir, const std::string& model_dir) {
  const fs::path saved_path = fs::path(checkpoint_dir) / "config.json", base_path = fs::path(model_dir) / "config.json";
  if (!fs::exists(saved_path) || !fs::exists(base_path)) return;
  auto parse = [](const fs::path& p) { return io::read_json_file(p.string()); };
  static const std::set<std::string> volatile_keys = {"transformers_version", "_name_or_path", "torch_dtype", "dtype",
                                                      "use_cache", "architectures"};
  std::function<void(const nlohmann::json&, const nlohmann::json&, const std::string&)> compare =
      [&](const nlohmann::json& a, const nlohmann::json& b, const std::string& path) {
        if (a.is_object() && b.is_object()) {
          for (auto& [key, value] : a.items()) {
            if (volatile_keys.count(key)) continue;
            compare(value, b.contains(key) ? b.at(key) : nlohmann::json(), path.empty() ? key : path + "." + key);
          }
          return;
        }
        if (a != b)
          fail(saved_path.string(), "this checkpoint is from another model: " + path + " is " + a.dump() +
                                        " here but " + b.dump() + " in " + base_path.string() + "; nothing was changed");
      };
  compare(parse(saved_path), parse(base_path), "");
}

torch::Tensor cpu_rng_state() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_cpu_rng_state(const torch::Tensor& state) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

torch::Tensor cuda_rng_state(const torch::Device& device) {
  auto gen = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_cuda_rng_state(const torch::Device& device, const torch::Tensor& state) {
  auto gen = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

void write_rng_states(const std::string& dir, const std::vector<torch::Tensor>& states_by_rank,
                      const std::vector<torch::Tensor>& cuda_states_by_rank) {
  io::NamedTensors tensors;
  for (size_t r = 0; r < states_by_rank.size(); ++r) tensors.push_back({"rank_" + std::to_string(r), states_by_rank[r]});
  for (size_t r = 0; r < cuda_states_by_rank.size(); ++r)
    tensors.push_back({"cuda_rank_" + std::to_string(r), cuda_states_by_rank[r]});
  io::save_safetensors(in_dir(dir, kRngFile), tensors);
}

std::optional<torch::Tensor> read_cuda_rng_state(const std::string& dir, int rank) {
  const std::string path = in_dir(dir, kRngFile);
  if (!fs::exists(path)) return std::nullopt;
  auto file = io::SafetensorsFile::open(path);
  const std::string mine = "cuda_rank_" + std::to_string(rank);
  const std::string name = file.contains(mine) ? mine : "cuda_rank_0";
  if (!file.contains(name)) return std::nullopt;
  auto state = file.get(name);
  check_cuda_generator_state(state, path, name);
  return state.clone();
}

std::optional<torch::Tensor> read_rng_state(const std::string& dir, int rank) {
  const std::string path = in_dir(dir, kRngFile);
  if (!fs::exists(path)) return std::nullopt;
  auto file = io::SafetensorsFile::open(path);
  const std::string name = "rank_" + std::to_string(file.contains("rank_" + std::to_string(rank)) ? rank : 0);
  if (!file.contains(name)) fail(path, "no tensor '" + name + "'");
  auto state = file.get(name);
  if (state.scalar_type() != torch::kUInt8 || state.dim() != 1 || state.numel() != cpu_rng_state().numel())
    fail(path, "'" + name + "' is not a CPU generator state (expected uint8 [" +
                   std::to_string(cpu_rng_state().numel()) + "], got " + c10::toString(state.scalar_type()) + " " +
                   c10::str(state.sizes()) + ")");
  check_cpu_generator_state(state, path, name);
  return state.clone();
}

void write_zero_shard(const std::string& dir, int rank, int world_size, const std::vector<RangeState>& ranges) {
  io::NamedTensors tensors;
  nlohmann::json index = nlohmann::json::array();
  for (auto& r : ranges) {
    const std::string key = r.name + "/" + std::to_string(r.param_offset);
    index.push_back({{"name", r.name}, {"param_offset", r.param_offset}, {"length", r.length}, {"step", r.step}});
    if (r.step > 0) {
      tensors.push_back({"exp_avg/" + key, r.exp_avg});
      tensors.push_back({"exp_avg_sq/" + key, r.exp_avg_sq});
    }
    if (r.master.defined()) tensors.push_back({"master/" + key, r.master});
  }
  const fs::path shards = fs::path(dir) / "zero_shards";
  fs::create_directories(shards);
  const std::string file = "rank_" + std::to_string(rank) + "_of_" + std::to_string(world_size) + ".safetensors";
  io::save_safetensors((shards / file).string(), tensors, {{"ranges", index.dump()}, {"world_size", std::to_string(world_size)}});
}

std::vector<RangeState> read_zero_shards(const std::string& dir) {
  const fs::path shards = fs::path(dir) / "zero_shards";
  std::vector<RangeState> out;
  if (!fs::is_directory(shards)) return out;
  for (auto& entry : fs::directory_iterator(shards)) {
    if (entry.path().extension() != ".safetensors") continue;
    const std::string path = entry.path().string();
    auto file = io::SafetensorsFile::open(path);
    auto meta = file.metadata().find("ranges");
    if (meta == file.metadata().end()) fail(path, "no 'ranges' metadata: not a ZeRO shard file");
    const auto ranges = io::parse_json(meta->second, path + ": 'ranges' metadata");
    if (!ranges.is_array()) fail(path, "'ranges' metadata: expected a list of ranges");
    try {
      for (auto& r : ranges) {
        const std::string where = path + ": 'ranges' metadata";
        RangeState s{r.at("name"), io::json_integer(r.at("param_offset"), where + ": param_offset", 0),
                     io::json_integer(r.at("length"), where + ": length", 0),
                     io::json_integer(r.at("step"), where + ": step", 0), {}, {}, {}};
        const std::string key = s.name + "/" + std::to_string(s.param_offset);
        auto get = [&](const std::string& kind) {
          auto t = file.get(kind + "/" + key).to(torch::kFloat32).reshape({-1});
          if (t.numel() != s.length)
            fail(path, "'" + kind + "/" + key + "' has " + std::to_string(t.numel()) + " elements, the range " +
                           std::to_string(s.length));
          return t;
        };
        if (s.step > kMaxStep) fail(where, "step " + std::to_string(s.step) + " of '" + key + "' is out of range");
        if (s.step > 0) {
          s.exp_avg = get("exp_avg"), s.exp_avg_sq = get("exp_avg_sq");
          check_adam_moments(s.exp_avg, s.exp_avg_sq, path, "'" + key + "'");
        }
        if (file.contains("master/" + key)) {
          s.master = get("master");
          check_finite_weights(s.master, path, "'master/" + key + "'");
        }
        out.push_back(std::move(s));
      }
    } catch (const nlohmann::json::exception& e) {
      fail(path, "bad 'ranges' metadata: " + io::json_error_text(e));
    }
  }
  return out;
}

void write_master_weights(const std::string& dir, const std::vector<std::pair<std::string, torch::Tensor>>& weights) {
  if (!weights.empty()) io::save_safetensors(in_dir(dir, kMasterFile), weights);
}

std::vector<std::pair<std::string, torch::Tensor>> read_master_weights(const std::string& dir) {
  const std::string path = in_dir(dir, kMasterFile);
  if (!fs::exists(path)) return {};
  auto file = io::SafetensorsFile::open(path);
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (auto& t : file.tensors()) {
    out.push_back({t.name, file.get(t.name).to(torch::kFloat32).clone()});
    check_finite_weights(out.back().second, path, "'" + t.name + "'");
  }
  return out;
}

}  // namespace llava::checkpoint
