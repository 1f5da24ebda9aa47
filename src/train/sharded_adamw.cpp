#include "train/sharded_adamw.h"

#include <cmath>
#include <map>

#include "dist/buckets.h"
#include "io/error.h"

namespace llava::train {

namespace {
constexpr int64_t kShardAlign = 16;  // 64-byte aligned fp32 shards (NCCL likes aligned buffers)
}

ShardedAdamW::ShardedAdamW(std::vector<ParamGroup> groups, AdamWOptions options, dist::Communicator& comm,
                           int zero_stage)
    : groups_(std::move(groups)), options_(options), comm_(comm), zero_stage_(zero_stage) {
  if (zero_stage < 0 || zero_stage > 2)
    throw Error("zero_stage: expected 0, 1 or 2, got " + std::to_string(zero_stage));
  sharded_ = zero_stage > 0 && comm.world_size() > 1;
  std::vector<dist::ParamSpec> specs;
  std::map<std::string, size_t> index_of;
  for (size_t g = 0; g < groups_.size(); ++g)
    for (size_t j = 0; j < groups_[g].params.size(); ++j) {
      index_of[groups_[g].names[j]] = params_.size();
      params_.push_back(groups_[g].params[j]);
      group_of_.push_back(g);
      specs.push_back({groups_[g].names[j], groups_[g].params[j].numel()});
    }
  layout_ = dist::make_zero_layout(specs, sharded_ ? comm.world_size() : 1, kShardAlign);
  shard_rank_ = sharded_ ? comm.rank() : 0;

  torch::NoGradGuard no_grad;
  bool separate_master = false;
  for (auto& p : params_) separate_master |= p.scalar_type() != torch::kFloat32;
  if (separate_master) master_shard_ = torch::zeros({layout_.shard_numel}, torch::kFloat32);

  std::vector<ParamGroup> inner_groups;
  for (auto& g : groups_) inner_groups.push_back({g.name, {}, {}, g.base_lr, g.lr, g.weight_decay});
  for (auto& r : layout_.rank_ranges[shard_rank_]) {
    Piece piece{index_of.at(r.name), r.param_offset, r.length, r.shard_offset, {}};
    auto view = flat_param_view(piece.param, piece.param_offset, piece.length);
    piece.master = separate_master ? master_shard_.narrow(0, r.shard_offset, r.length).copy_(view) : view;
    auto& g = inner_groups[group_of_[piece.param]];
    inner_slot_.push_back({group_of_[piece.param], g.params.size()});
    g.names.push_back(r.name + "[" + std::to_string(r.param_offset) + ":]");
    g.params.push_back(piece.master);
    pieces_.push_back(std::move(piece));
  }
  inner_ = std::make_unique<AdamW>(std::move(inner_groups), options);
}

torch::Tensor ShardedAdamW::flat_param_view(size_t param, int64_t offset, int64_t length) const {
  return params_[param].detach().view({-1}).narrow(0, offset, length);
}

std::vector<bool> ShardedAdamW::params_with_grad() {
  auto flags = torch::zeros({static_cast<int64_t>(params_.size())}, torch::kFloat32);
  for (size_t i = 0; i < params_.size(); ++i)
    if (params_[i].grad().defined()) flags[i] = 1.0f;
  if (comm_.world_size() > 1) comm_.allreduce(flags, dist::Reduce::Sum);
  std::vector<bool> out(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) out[i] = flags[i].item<float>() > 0;
  return out;
}

torch::Tensor ShardedAdamW::reduced_grad_shard() {
  auto flat = torch::zeros({layout_.padded_numel()}, torch::kFloat32);  // padding stays zero
  for (size_t i = 0; i < params_.size(); ++i)
    if (params_[i].grad().defined())
      flat.narrow(0, layout_.flat_offsets[i], params_[i].numel()).copy_(params_[i].grad().view({-1}));
  zero_grad();  // the model's gradients are no longer needed: stage 2 keeps only the shard from here
  if (zero_stage_ == 2) return comm_.reduce_scatter(flat, dist::Reduce::Sum);
  comm_.allreduce(flat, dist::Reduce::Sum);  // stage 1: every rank reduces everything, keeps its part
  return flat.narrow(0, layout_.shard_begin(shard_rank_), layout_.shard_numel).clone();
}

double ShardedAdamW::reduce_gradients() {
  torch::NoGradGuard no_grad;
  const auto has_grad = params_with_grad();

  // Gradients of this rank's pieces, summed over ranks, as fp32.
  torch::Tensor grad_shard;
  if (sharded_) {
    grad_shard = reduced_grad_shard();
  } else {
    std::vector<torch::Tensor> grads;
    for (size_t i = 0; i < params_.size(); ++i) {
      if (!has_grad[i]) continue;
      if (!params_[i].grad().defined()) params_[i].mutable_grad() = torch::zeros_like(params_[i]);
      grads.push_back(params_[i].grad());
    }
    dist::allreduce_gradients(comm_, grads, dist::Reduce::Sum);
  }
  std::vector<torch::Tensor> norms;
  for (auto& p : pieces_) {
    if (!has_grad[p.param]) continue;  // torch's AdamW skips a parameter without a gradient
    p.master.mutable_grad() = sharded_ ? grad_shard.narrow(0, p.shard_offset, p.length)
                                       : params_[p.param].grad().view({-1}).narrow(0, p.param_offset, p.length).to(torch::kFloat32);
    norms.push_back(p.master.grad().norm(2));
  }

  // Global norm as torch.nn.utils.clip_grad_norm_ computes it (norm of the per-tensor norms); with
  // shards, the squares of the local norms are summed over ranks first.
  grad_norm_ = norms.empty() ? torch::zeros({}, torch::kFloat32) : torch::stack(norms).norm(2);
  if (sharded_) {
    auto squares = grad_norm_.to(torch::kFloat64).pow(2).reshape({1});
    comm_.allreduce(squares, dist::Reduce::Sum);
    grad_norm_ = squares.sqrt().reshape({}).to(torch::kFloat32);
  }
  return grad_norm_.item<double>();
}

void ShardedAdamW::update(double max_norm, double lr_factor) {
  torch::NoGradGuard no_grad;
  if (max_norm > 0) {
    auto coef = torch::clamp(max_norm / (grad_norm_ + 1e-6), c10::nullopt, 1.0);
    if (coef.item<float>() < 1.0f)  // a multiply by exactly 1 changes no bit: skip the pass over the gradients
      for (auto& p : pieces_)
        if (p.master.grad().defined()) p.master.mutable_grad().mul_(coef);
  }
  inner_->set_lr_factor(lr_factor);
  for (auto& g : groups_) g.lr = g.base_lr * lr_factor;
  inner_->step();
  discard();

  if (sharded_) {
    gather_parameters();
  } else if (master_shard_.defined()) {
    for (auto& p : pieces_) flat_param_view(p.param, p.param_offset, p.length).copy_(p.master);
  }
}

void ShardedAdamW::discard() {
  for (auto& p : pieces_) p.master.mutable_grad() = torch::Tensor();
  zero_grad();
}

void ShardedAdamW::zero_grad() {
  for (auto& p : params_)
    if (p.grad().defined()) p.mutable_grad() = torch::Tensor();
}

torch::Tensor ShardedAdamW::gather_shards(const std::function<torch::Tensor(const Piece&)>& value) {
  auto shard = torch::zeros({layout_.shard_numel}, torch::kFloat32);
  for (auto& p : pieces_) shard.narrow(0, p.shard_offset, p.length).copy_(value(p));
  if (!sharded_) return shard;  // one shard holds everything
  auto flat = torch::empty({layout_.padded_numel()}, torch::kFloat32);
  comm_.all_gather_into(flat, shard);
  return flat;
}

void ShardedAdamW::gather_parameters() {
  auto flat = gather_shards([](const Piece& p) { return p.master; });
  for (size_t i = 0; i < params_.size(); ++i)
    params_[i].detach().view({-1}).copy_(flat.narrow(0, layout_.flat_offsets[i], params_[i].numel()));
}

AdamW ShardedAdamW::consolidated() {
  torch::NoGradGuard no_grad;
  auto state_of = [&](const Piece& p) -> const AdamState& {
    auto [g, j] = inner_slot_[&p - pieces_.data()];
    return inner_->state()[g][j];
  };
  auto zeros = [](const Piece& p) { return torch::zeros({p.length}, torch::kFloat32); };
  auto exp_avg = gather_shards([&](const Piece& p) { auto& s = state_of(p); return s.initialized() ? s.exp_avg : zeros(p); });
  auto exp_avg_sq =
      gather_shards([&](const Piece& p) { auto& s = state_of(p); return s.initialized() ? s.exp_avg_sq : zeros(p); });
  // Every piece of a parameter has taken the same number of steps: average over the pieces' owners.
  const auto n = static_cast<int64_t>(params_.size());
  auto steps = torch::zeros({2, n}, torch::kFloat64);  // [sum of steps, pieces] per parameter
  for (auto& p : pieces_) {
    steps[0][p.param] += static_cast<double>(state_of(p).step);
    steps[1][p.param] += 1.0;
  }
  if (sharded_) comm_.allreduce(steps, dist::Reduce::Sum);

  AdamW whole(groups_, options_);
  std::vector<size_t> index_in_group(groups_.size(), 0);
  for (size_t i = 0; i < params_.size(); ++i) {
    AdamState& s = whole.state()[group_of_[i]][index_in_group[group_of_[i]]++];
    const auto step = std::llround(steps[0][i].item<double>() / std::max(1.0, steps[1][i].item<double>()));
    if (step == 0) continue;  // never updated: torch keeps no state for it
    const auto& shape = params_[i].sizes();
    // Views into the freshly gathered buffers (nothing else holds them): no second copy of the state,
    // which a checkpoint save would otherwise pay while the step waits.
    s.exp_avg = exp_avg.narrow(0, layout_.flat_offsets[i], params_[i].numel()).view(shape);
    s.exp_avg_sq = exp_avg_sq.narrow(0, layout_.flat_offsets[i], params_[i].numel()).view(shape);
    s.step = step;
  }
  return whole;
}

void ShardedAdamW::load_consolidated(const AdamW& whole) {
  if (whole.groups().size() != groups_.size())
    throw Error("optimizer state has " + std::to_string(whole.groups().size()) + " parameter groups, expected " +
                std::to_string(groups_.size()));
  for (size_t g = 0; g < groups_.size(); ++g) {
    groups_[g].base_lr = whole.groups()[g].base_lr;
    groups_[g].weight_decay = whole.groups()[g].weight_decay;
    inner_->groups()[g].base_lr = groups_[g].base_lr;
    inner_->groups()[g].weight_decay = groups_[g].weight_decay;
  }
  std::vector<std::pair<size_t, size_t>> slot_of_param;
  for (size_t g = 0; g < groups_.size(); ++g)
    for (size_t j = 0; j < groups_[g].params.size(); ++j) slot_of_param.push_back({g, j});
  for (size_t k = 0; k < pieces_.size(); ++k) {
    const Piece& p = pieces_[k];
    auto [wg, wj] = slot_of_param[p.param];
    const AdamState& from = whole.state()[wg][wj];
    AdamState& to = inner_->state()[inner_slot_[k].first][inner_slot_[k].second];
    if (!from.initialized()) {
      to = AdamState{};
      continue;
    }
    auto piece_of = [&](const torch::Tensor& t) { return t.reshape({-1}).narrow(0, p.param_offset, p.length).clone(); };
    to.exp_avg = piece_of(from.exp_avg);
    to.exp_avg_sq = piece_of(from.exp_avg_sq);
    to.step = from.step;
  }
}

std::vector<std::pair<std::string, torch::Tensor>> ShardedAdamW::master_weights() {
  if (!master_shard_.defined()) return {};
  auto flat = gather_shards([](const Piece& p) { return p.master; });
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (size_t i = 0; i < params_.size(); ++i)
    out.push_back({layout_.params[i].name,
                   flat.narrow(0, layout_.flat_offsets[i], params_[i].numel()).clone().view(params_[i].sizes())});
  return out;
}

void ShardedAdamW::load_master_weights(const std::vector<std::pair<std::string, torch::Tensor>>& weights) {
  if (!master_shard_.defined()) return;
  std::map<std::string, torch::Tensor> by_name(weights.begin(), weights.end());
  torch::NoGradGuard no_grad;
  for (auto& p : pieces_) {
    const std::string& name = layout_.params[p.param].name;
    auto it = by_name.find(name);
    if (it == by_name.end()) throw Error("master weights: no tensor for '" + name + "'");
    if (it->second.numel() != params_[p.param].numel())
      throw Error("master weights: '" + name + "' has " + std::to_string(it->second.numel()) + " elements, expected " +
                  std::to_string(params_[p.param].numel()));
    p.master.copy_(it->second.reshape({-1}).narrow(0, p.param_offset, p.length));
    flat_param_view(p.param, p.param_offset, p.length).copy_(p.master);
  }
}

std::vector<RangeState> ShardedAdamW::local_ranges() const {
  std::vector<RangeState> out;
  for (size_t k = 0; k < pieces_.size(); ++k) {
    const Piece& p = pieces_[k];
    const AdamState& s = inner_->state()[inner_slot_[k].first][inner_slot_[k].second];
    RangeState r{layout_.params[p.param].name, p.param_offset, p.length, s.step, s.exp_avg, s.exp_avg_sq, {}};
    if (master_shard_.defined()) r.master = p.master;
    out.push_back(std::move(r));
  }
  return out;
}

void ShardedAdamW::load_ranges(const std::vector<RangeState>& all, const std::string& where) {
  std::map<std::string, std::vector<const RangeState*>> by_name;
  for (auto& r : all) by_name[r.name].push_back(&r);
  torch::NoGradGuard no_grad;
  for (size_t k = 0; k < pieces_.size(); ++k) {
    Piece& p = pieces_[k];
    const std::string& name = layout_.params[p.param].name;
    AdamState& to = inner_->state()[inner_slot_[k].first][inner_slot_[k].second];
    to = AdamState{};
    int64_t covered = 0, step = 0;
    torch::Tensor exp_avg = torch::zeros({p.length}), exp_avg_sq = torch::zeros({p.length});
    for (const RangeState* r : by_name[name]) {  // copy the overlap of each saved range with this piece
      const int64_t begin = std::max(p.param_offset, r->param_offset);
      const int64_t end = std::min(p.param_offset + p.length, r->param_offset + r->length);
      if (begin >= end) continue;
      covered += end - begin;
      step = r->step;
      if (r->step > 0) {
        exp_avg.narrow(0, begin - p.param_offset, end - begin).copy_(r->exp_avg.narrow(0, begin - r->param_offset, end - begin));
        exp_avg_sq.narrow(0, begin - p.param_offset, end - begin)
            .copy_(r->exp_avg_sq.narrow(0, begin - r->param_offset, end - begin));
      }
      if (master_shard_.defined() && r->master.defined())
        p.master.narrow(0, begin - p.param_offset, end - begin).copy_(r->master.narrow(0, begin - r->param_offset, end - begin));
    }
    if (covered != p.length)
      fail(where, "the ZeRO shards hold " + std::to_string(covered) + " of the " + std::to_string(p.length) +
                      " elements of '" + name + "' from offset " + std::to_string(p.param_offset) +
                      " (a shard file is missing or from another run)");
    if (step > 0) to = AdamState{exp_avg, exp_avg_sq, step};
    if (master_shard_.defined()) flat_param_view(p.param, p.param_offset, p.length).copy_(p.master);
  }
}

int64_t ShardedAdamW::state_bytes() const {
  int64_t bytes = master_shard_.defined() ? master_shard_.nbytes() : 0;
  for (auto& group : inner_->state())
    for (auto& s : group)
      if (s.initialized()) bytes += s.exp_avg.nbytes() + s.exp_avg_sq.nbytes();
  return bytes;
}

}  // namespace llava::train
