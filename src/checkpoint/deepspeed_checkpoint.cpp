#include "checkpoint/deepspeed_checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <map>

#include "checkpoint/state_checks.h"
#include "checkpoint/torch_optimizer.h"
#include "io/error.h"
#include "io/file_util.h"
#include "io/pickle.h"
#include "io/torch_archive.h"

namespace llava::checkpoint {

namespace {

namespace fs = std::filesystem;
using Dict = c10::impl::GenericDict;

// Typed access to the unpickled dicts, each fault an Error naming the file and the key.
struct Reader {
  std::string file;

  [[noreturn]] void bad(const std::string& what) const { fail(file, what); }
  const c10::IValue& at(const Dict& d, const std::string& key) const {
    auto it = d.find(key);
    if (it == d.end()) bad("no '" + key + "'");
    return it->value();
  }
  Dict dict(const c10::IValue& v, const std::string& what) const {
    if (!v.isGenericDict()) bad(what + ": expected a dict");
    return v.toGenericDict();
  }
  c10::impl::GenericList list(const c10::IValue& v, const std::string& what) const {
    if (!v.isList()) bad(what + ": expected a list");
    return v.toList();
  }
  int64_t integer(const c10::IValue& v, const std::string& what) const {
    if (!v.isInt()) bad(what + ": expected an integer");
    return v.toInt();
  }
  double number(const c10::IValue& v, const std::string& what) const {
    if (v.isTensor() && v.toTensor().numel() == 1) return v.toTensor().item<double>();
    if (!v.isDouble() && !v.isInt()) bad(what + ": expected a number");
    return v.isDouble() ? v.toDouble() : static_cast<double>(v.toInt());
  }
  torch::Tensor flat_fp32(const c10::IValue& v, const std::string& what) const {
    if (!v.isTensor() || v.toTensor().dim() != 1 || v.toTensor().scalar_type() != torch::kFloat32)
      bad(what + ": expected a 1-D float32 tensor");
    return v.toTensor();
  }
};

std::string read_tag(const std::string& dir) {
  const std::string path = (fs::path(dir) / "latest").string();
  std::string tag = io::read_input_file(path, io::InputKind::kConfig);
  while (!tag.empty() && std::isspace(static_cast<unsigned char>(tag.back()))) tag.pop_back();
  if (tag.empty() || tag.size() > 255 || tag.find('/') != std::string::npos || tag == "." || tag == "..")
    fail(path, "expected the name of a folder beside it (e.g. global_step100), got '" + tag.substr(0, 64) + "'");
  std::error_code ec;  // a symlink loop or dangling link is no folder either
  if (!fs::is_directory(fs::path(dir) / tag, ec) || ec)
    fail(path, "names '" + tag + "', which is not a folder of " + dir);
  return tag;
}

// One group's parameters in flattening order: name, shape, offset in the unpadded flat buffer.
struct Slot {
  std::string name;
  std::vector<int64_t> shape;
  int64_t offset = 0, numel = 0;
};

std::vector<std::vector<Slot>> read_param_shapes(const Reader& r, const Dict& root) {
  std::vector<std::vector<Slot>> groups;
  auto shapes = r.list(r.at(root, "param_shapes"), "param_shapes");
  for (size_t g = 0; g < shapes.size(); ++g) {
    const std::string what = "param_shapes[" + std::to_string(g) + "]";
    std::vector<Slot> slots;
    int64_t offset = 0;
    for (auto& entry : r.dict(shapes.get(g), what)) {
      if (!entry.key().isString() || !entry.value().isTuple()) r.bad(what + ": expected {name: shape}");
      Slot s{entry.key().toStringRef(), {}, offset, 1};
      for (auto& d : entry.value().toTupleRef().elements()) {
        const int64_t n = r.integer(d, what + "['" + s.name + "']");
        if (n < 0 || (n > 0 && s.numel > (int64_t{1} << 40) / n)) r.bad(what + "['" + s.name + "']: bad shape");
        s.shape.push_back(n);
        s.numel *= n;
      }
      offset += s.numel;
      slots.push_back(std::move(s));
    }
    groups.push_back(std::move(slots));
  }
  return groups;
}

std::string rank_file(const std::string& tag_dir, int64_t rank) {
  const std::string name = "zero_pp_rank_" + std::to_string(rank) + "_mp_rank_00_optim_states.pt";
  for (const std::string prefix : {"", "bf16_"})
    if (fs::exists(fs::path(tag_dir) / (prefix + name))) return (fs::path(tag_dir) / (prefix + name)).string();
  return "";
}

bool any_nonzero_int(const c10::IValue& v) {
  if (v.isInt()) return v.toInt() != 0;
  if (v.isList()) {
    for (const auto& e : v.toList())
      if (any_nonzero_int(e)) return true;
  }
  if (v.isTuple()) {
    for (const auto& e : v.toTupleRef().elements())
      if (any_nonzero_int(e)) return true;
  }
  return false;
}

// One rank's optimizer file, its groups checked against param_shapes.
struct RankState {
  std::vector<torch::Tensor> master, exp_avg, exp_avg_sq;  // per group: this rank's partition
  std::vector<int64_t> paddings;
  std::vector<DeepSpeedGroup> groups;
  int64_t partition_count = 0;
  c10::IValue slice_mappings;  // None when the file has none (older DeepSpeed versions)
};

RankState read_rank(const std::string& file, const std::vector<std::vector<Slot>>& shapes) {
  Reader r{file};
  auto root = r.dict(io::load_pt(file, io::pickle::Globals::kDeepSpeed), "the file");
  auto osd = r.dict(r.at(root, "optimizer_state_dict"), "optimizer_state_dict");
  const size_t groups = shapes.size();
  auto count_of = [&](const std::string& key) {
    auto l = r.list(r.at(osd, key), key);
    if (l.size() != groups)
      r.bad(key + " has " + std::to_string(l.size()) + " groups, param_shapes has " + std::to_string(groups));
    return l;
  };
  RankState s;
  // zero_optimization.parameter_alignment pads each tensor inside the flat buffer: not this layout.
  if (osd.contains("param_alignment_paddings") && any_nonzero_int(osd.at("param_alignment_paddings")))
    r.bad("param_alignment_paddings: checkpoints saved with zero_optimization.parameter_alignment are not supported");
  if (osd.contains("param_slice_mappings")) s.slice_mappings = osd.at("param_slice_mappings");
  // ZeRO-3 partitions every parameter itself (zero_pp_rank_R_mp_rank_00_optim_states.pt holds other keys):
  // only the flat per-group partitions of stages 1 and 2 are read here.
  if (osd.contains("zero_stage")) {
    const int64_t stage = r.integer(osd.at("zero_stage"), "zero_stage");
    if (stage != 1 && stage != 2) r.bad("zero_stage: expected 1 or 2 (ZeRO-3 checkpoints are not supported), got " + std::to_string(stage));
  }
  auto counts = count_of("partition_count");
  auto paddings = count_of("group_paddings");
  auto partitions = count_of("single_partition_of_fp32_groups");
  auto base = r.dict(r.at(osd, "base_optimizer_state"), "base_optimizer_state");
  auto state = r.dict(r.at(base, "state"), "base_optimizer_state.state");
  auto param_groups = r.list(r.at(base, "param_groups"), "base_optimizer_state.param_groups");
  if (param_groups.size() != groups) r.bad("base_optimizer_state.param_groups does not have one group per param_shapes group");
  for (size_t g = 0; g < groups; ++g) {
    const std::string gs = "[" + std::to_string(g) + "]";
    const int64_t count = r.integer(counts.get(g), "partition_count" + gs);
    if (count < 1 || count > 65536 || (g > 0 && count != s.partition_count))
      r.bad("partition_count" + gs + ": expected the same world size for every group, got " + std::to_string(count));
    s.partition_count = count;
    s.paddings.push_back(r.integer(paddings.get(g), "group_paddings" + gs));
    s.master.push_back(r.flat_fp32(partitions.get(g), "single_partition_of_fp32_groups" + gs));
    check_finite_weights(s.master.back(), file, "single_partition_of_fp32_groups" + gs);
    auto pg = r.dict(param_groups.get(g), "param_groups" + gs);
    DeepSpeedGroup group;
    group.lr = r.number(r.at(pg, "lr"), "param_groups" + gs + ".lr");
    group.initial_lr = pg.contains("initial_lr") ? r.number(pg.at("initial_lr"), "initial_lr") : group.lr;
    group.weight_decay = r.number(r.at(pg, "weight_decay"), "param_groups" + gs + ".weight_decay");
    const int64_t numel = s.master.back().numel();
    auto it = state.find(static_cast<int64_t>(g));
    if (it == state.end()) {  // never stepped
      s.exp_avg.push_back(torch::Tensor());
      s.exp_avg_sq.push_back(torch::Tensor());
    } else {
      auto gstate = r.dict(it->value(), "base_optimizer_state.state" + gs);
      group.step = adam_step_from(r.number(r.at(gstate, "step"), "state" + gs + ".step"), file,
                                  "base_optimizer_state.state" + gs + ".step");
      s.exp_avg.push_back(r.flat_fp32(r.at(gstate, "exp_avg"), "state" + gs + ".exp_avg"));
      s.exp_avg_sq.push_back(r.flat_fp32(r.at(gstate, "exp_avg_sq"), "state" + gs + ".exp_avg_sq"));
      check_adam_moments(s.exp_avg.back(), s.exp_avg_sq.back(), file, "base_optimizer_state.state" + gs);
      if (s.exp_avg.back().numel() != numel || s.exp_avg_sq.back().numel() != numel)
        r.bad("state" + gs + ": the Adam moments have " + std::to_string(s.exp_avg.back().numel()) + " / " +
              std::to_string(s.exp_avg_sq.back().numel()) + " elements, the fp32 partition " + std::to_string(numel));
    }
    s.groups.push_back(group);
  }
  return s;
}

// param_slice_mappings of `rank` must place each parameter where param_shapes and the partition size do.
void check_slice_mappings(const std::string& file, const RankState& state, int64_t rank, size_t g, int64_t partition,
                          const std::vector<std::vector<Slot>>& shapes) {
  Reader r{file};
  if (state.slice_mappings.isNone()) return;
  auto mappings = r.list(state.slice_mappings, "param_slice_mappings");
  if (mappings.size() != shapes.size()) r.bad("param_slice_mappings does not have one entry per param_shapes group");
  {
    auto m = r.dict(mappings.get(g), "param_slice_mappings");
    size_t expected = 0;
    const int64_t begin = rank * partition, end = begin + partition;
    for (auto& s : shapes[g]) {
      const int64_t lo = std::max(begin, s.offset), hi = std::min(end, s.offset + s.numel);
      if (hi <= lo) continue;
      ++expected;
      auto it = m.find(s.name);
      if (it == m.end() || !it->value().isTuple() || it->value().toTupleRef().elements().size() != 2)
        r.bad("param_slice_mappings[" + std::to_string(g) + "] has no fragment for '" + s.name +
              "', which param_shapes places in this rank's partition");
      const auto& f = it->value().toTupleRef().elements();
      if (f[0] != c10::IValue(hi - lo) || f[1] != c10::IValue(lo - begin))
        r.bad("param_slice_mappings[" + std::to_string(g) + "]['" + s.name + "'] is (numel " + c10::str(f[0]) +
              ", start " + c10::str(f[1]) + "), param_shapes and the partition size put it at (numel " +
              std::to_string(hi - lo) + ", start " + std::to_string(lo - begin) + ")");
    }
    if (m.size() != expected)
      r.bad("param_slice_mappings[" + std::to_string(g) + "] names " + std::to_string(m.size()) +
            " tensors, param_shapes places " + std::to_string(expected) + " in this rank's partition");
  }
}

}  // namespace

bool is_deepspeed_checkpoint(const std::string& dir) { return fs::is_regular_file(fs::path(dir) / "latest"); }

std::string deepspeed_optim_file(const std::string& dir, int64_t rank) {
  const std::string tag_dir = (fs::path(dir) / read_tag(dir)).string();
  const std::string file = rank_file(tag_dir, rank);
  return file.empty() ? (fs::path(tag_dir) / ("zero_pp_rank_" + std::to_string(rank) + "_mp_rank_00_optim_states.pt")).string()
                      : file;
}

DeepSpeedCheckpoint read_deepspeed_checkpoint(const std::string& dir) {
  DeepSpeedCheckpoint ckpt;
  ckpt.tag_dir = (fs::path(dir) / read_tag(dir)).string();
  ckpt.model_file = (fs::path(ckpt.tag_dir) / "mp_rank_00_model_states.pt").string();
  Reader model{ckpt.model_file};
  const auto shapes = read_param_shapes(model, model.dict(io::load_pt(ckpt.model_file, io::pickle::Globals::kDeepSpeed), "the file"));

  const std::string first = rank_file(ckpt.tag_dir, 0);
  if (first.empty()) fail(ckpt.tag_dir, "no zero_pp_rank_0_mp_rank_00_optim_states.pt (nor bf16_...): not a ZeRO 1/2 checkpoint");
  std::vector<RankState> ranks{read_rank(first, shapes)};
  std::vector<std::string> files{first};
  ckpt.world_size = ranks[0].partition_count;
  for (int64_t r = 1; r < ckpt.world_size; ++r) {
    files.push_back(rank_file(ckpt.tag_dir, r));
    if (files.back().empty())
      fail((fs::path(ckpt.tag_dir) / ("zero_pp_rank_" + std::to_string(r) + "_mp_rank_00_optim_states.pt")).string(),
           "missing: " + first + " says the run had " + std::to_string(ckpt.world_size) + " ranks (partition_count)");
    ranks.push_back(read_rank(files.back(), shapes));
    if (ranks.back().partition_count != ckpt.world_size)
      fail(files.back(), "partition_count " + std::to_string(ranks.back().partition_count) + ", rank 0's file says " +
                             std::to_string(ckpt.world_size));
  }

  for (size_t g = 0; g < shapes.size(); ++g) {
    const int64_t partition = ranks[0].master[g].numel();
    int64_t padding = 0;
    for (size_t r = 0; r < ranks.size(); ++r) {
      if (ranks[r].master[g].numel() != partition)
        fail(files[r], "group " + std::to_string(g) + ": the fp32 partition has " + std::to_string(ranks[r].master[g].numel()) +
                           " elements, rank 0's has " + std::to_string(partition) + " (partitions are equal in size)");
      if (ranks[r].exp_avg[g].defined() != ranks[0].exp_avg[g].defined() || ranks[r].groups[g].step != ranks[0].groups[g].step)
        fail(files[r], "group " + std::to_string(g) + ": the Adam step differs from rank 0's");
      padding += ranks[r].paddings[g];
    }
    const int64_t used = shapes[g].empty() ? 0 : shapes[g].back().offset + shapes[g].back().numel;
    if (padding < 0 || used + padding != partition * ckpt.world_size)
      fail(files[0], "group " + std::to_string(g) + ": " + std::to_string(ckpt.world_size) + " partitions of " +
                         std::to_string(partition) + " elements (padding " + std::to_string(padding) +
                         ") do not hold the " + std::to_string(used) + " elements param_shapes lists in " +
                         ckpt.model_file);
    for (size_t r = 0; r < ranks.size(); ++r)
      check_slice_mappings(files[r], ranks[r], static_cast<int64_t>(r), g, partition, shapes);
    ckpt.groups.push_back(ranks[0].groups[g]);
    auto whole = [&](std::vector<torch::Tensor> RankState::*field) {
      std::vector<torch::Tensor> parts;
      for (auto& rank : ranks) parts.push_back(((&rank)->*field)[g]);
      return torch::cat(parts);
    };
    const auto master = whole(&RankState::master);
    const bool stepped = ranks[0].exp_avg[g].defined();
    const auto exp_avg = stepped ? whole(&RankState::exp_avg) : torch::Tensor();
    const auto exp_avg_sq = stepped ? whole(&RankState::exp_avg_sq) : torch::Tensor();
    for (auto& s : shapes[g]) {
      auto cut = [&](const torch::Tensor& flat) {
        return flat.defined() ? flat.narrow(0, s.offset, s.numel).reshape(s.shape).clone() : torch::Tensor();
      };
      ckpt.params.push_back({s.name, g, cut(master), cut(exp_avg), cut(exp_avg_sq)});
    }
  }
  return ckpt;
}

namespace {

// DeepSpeed's stage 1/2 optimizer: nccl_start_alignment_factor (2) x world size.
int64_t padded_numel(int64_t numel, int64_t world_size) {
  const int64_t align = 2 * world_size;
  return (numel + align - 1) / align * align;
}

c10::IValue ds_config(const DeepSpeedSave& save) {
  auto zero = io::pickle::new_dict();
  zero.insert("stage", save.zero_stage);
  auto config = io::pickle::new_dict();
  config.insert("zero_optimization", zero);
  config.insert("train_micro_batch_size_per_gpu", save.micro_batch);
  config.insert("train_batch_size", save.micro_batch * save.accumulation * save.world_size);
  config.insert("gradient_accumulation_steps", save.accumulation);
  config.insert("gradient_clipping", save.gradient_clipping);
  if (save.bf16) {
    auto bf16 = io::pickle::new_dict();
    bf16.insert("enabled", true);
    config.insert("bf16", bf16);
  }
  return config;
}

const char* kDeepSpeedVersion = "0.19.8";  // the layout written is that of this version

c10::IValue model_states(const DeepSpeedSave& save) {
  auto module = io::pickle::new_dict();
  auto shapes = io::pickle::new_list();
  for (size_t g = 0; g < save.groups.size(); ++g) {
    auto group = io::pickle::new_dict();
    for (auto& p : save.params) {
      if (p.group != g) continue;
      std::vector<c10::IValue> dims(p.master.sizes().begin(), p.master.sizes().end());
      group.insert(p.name, c10::ivalue::Tuple::create(std::move(dims)));
    }
    shapes.push_back(group);
  }
  if (save.module.empty())
    for (auto& p : save.params) module.insert(p.name, p.master);
  for (auto& [name, tensor] : save.module) module.insert(name, tensor);
  auto d = io::pickle::new_dict();
  d.insert("module", module);
  d.insert("buffer_names", io::pickle::new_list());
  d.insert("optimizer", c10::IValue());
  d.insert("param_shapes", shapes);
  d.insert("frozen_param_shapes", c10::IValue());
  d.insert("shared_params", io::pickle::new_dict());
  d.insert("frozen_param_fragments", c10::IValue());
  d.insert("lr_scheduler", save.lr_scheduler);
  d.insert("data_sampler", c10::IValue());
  d.insert("random_ltd", c10::IValue());
  d.insert("sparse_tensor_module_names", io::pickle::new_list());
  d.insert("skipped_steps", int64_t{0});
  d.insert("global_steps", save.global_step);
  d.insert("global_samples", save.global_samples);
  d.insert("dp_world_size", save.world_size);
  d.insert("mp_world_size", int64_t{1});
  d.insert("ds_config", ds_config(save));
  d.insert("ds_version", kDeepSpeedVersion);
  return d;
}

c10::IValue rank_states(const DeepSpeedSave& save, int64_t rank) {
  auto state = io::pickle::new_dict();
  auto param_groups = io::pickle::new_list(), partitions = io::pickle::new_list(), paddings = io::pickle::new_list(),
       counts = io::pickle::new_list();
  for (size_t g = 0; g < save.groups.size(); ++g) {
    std::vector<torch::Tensor> master, exp_avg, exp_avg_sq;
    int64_t numel = 0;
    for (auto& p : save.params) {
      if (p.group != g) continue;
      master.push_back(p.master.to(torch::kFloat32).reshape({-1}));
      exp_avg.push_back(p.exp_avg.defined() ? p.exp_avg.reshape({-1}) : torch::zeros_like(master.back()));
      exp_avg_sq.push_back(p.exp_avg_sq.defined() ? p.exp_avg_sq.reshape({-1}) : torch::zeros_like(master.back()));
      numel += master.back().numel();
    }
    const int64_t padded = padded_numel(numel, save.world_size), partition = padded / save.world_size;
    auto part = [&](const std::vector<torch::Tensor>& pieces) {
      auto flat = torch::cat(pieces);
      flat = torch::constant_pad_nd(flat, {0, padded - numel}, 0);
      return flat.narrow(0, rank * partition, partition).clone();
    };
    partitions.push_back(part(master));
    paddings.push_back(rank == save.world_size - 1 ? padded - numel : int64_t{0});
    counts.push_back(save.world_size);
    const DeepSpeedGroup& group = save.groups[g];
    if (group.step > 0) {
      auto s = io::pickle::new_dict();
      s.insert("step", torch::tensor(static_cast<float>(group.step)));
      s.insert("exp_avg", part(exp_avg));
      s.insert("exp_avg_sq", part(exp_avg_sq));
      state.insert(static_cast<int64_t>(g), s);
    }
    auto ids = io::pickle::new_list();
    ids.push_back(static_cast<int64_t>(g));
    param_groups.push_back(adamw_param_group(
        {group.weight_decay, group.lr, save.beta1, save.beta2, save.eps, group.initial_lr}, ids));
  }
  auto base = io::pickle::new_dict();
  base.insert("state", state);
  base.insert("param_groups", param_groups);
  auto osd = io::pickle::new_dict();
  osd.insert("dynamic_loss_scale", false);
  osd.insert("overflow", false);
  osd.insert("clip_grad", save.gradient_clipping);
  osd.insert("base_optimizer_state", base);
  osd.insert("single_partition_of_fp32_groups", partitions);
  osd.insert("zero_stage", save.zero_stage);
  osd.insert("group_paddings", paddings);
  osd.insert("partition_count", counts);
  osd.insert("ds_version", kDeepSpeedVersion);
  auto d = io::pickle::new_dict();
  d.insert("optimizer_state_dict", osd);
  d.insert("ds_config", ds_config(save));
  d.insert("ds_version", kDeepSpeedVersion);
  return d;
}

}  // namespace

void write_deepspeed_checkpoint(const std::string& dir, const DeepSpeedSave& save) {
  const std::string tag = "global_step" + std::to_string(save.global_step);
  const fs::path tag_dir = fs::path(dir) / tag;
  fs::create_directories(tag_dir);
  io::save_pt((tag_dir / "mp_rank_00_model_states.pt").string(), model_states(save));
  for (int64_t r = 0; r < save.world_size; ++r)
    io::save_pt((tag_dir / ((save.bf16 ? "bf16_zero_pp_rank_" : "zero_pp_rank_") + std::to_string(r) +
                            "_mp_rank_00_optim_states.pt")).string(),
                rank_states(save, r));
  io::write_file_atomic((fs::path(dir) / "latest").string(), tag);
}

}  // namespace llava::checkpoint
