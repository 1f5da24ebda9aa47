#include "train/sharded_adamw.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <unordered_set>

#include "distributed/buckets.h"
#include "io/error.h"

namespace llava::train {

namespace {
constexpr int64_t kShardAlign = 16;  // 64-byte aligned fp32 shards (NCCL likes aligned buffers)
}

ShardedAdamW::ShardedAdamW(std::vector<ParamGroup> groups, AdamWOptions options, dist::Communicator& comm,
                           int zero_stage, int64_t bucket_numel, const std::vector<std::string>& first_order)
    : groups_(std::move(groups)), options_(options), comm_(comm), zero_stage_(zero_stage),
      bucket_numel_(bucket_numel), chunk_numel_(bucket_numel) {
  if (zero_stage < 0 || zero_stage > 2)
    throw Error("zero_stage: expected 0, 1 or 2, got " + std::to_string(zero_stage));
  if (bucket_numel < 1) throw Error("reduce_bucket_size: expected >= 1 element, got " + std::to_string(bucket_numel));
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
  if (!params_.empty()) device_ = params_.front().device();
  layout_ = dist::make_zero_layout(specs, sharded_ ? comm.world_size() : 1, kShardAlign);
  shard_rank_ = sharded_ ? comm.rank() : 0;

  torch::NoGradGuard no_grad;
  bool separate_master = false;
  for (auto& p : params_) separate_master |= p.scalar_type() != torch::kFloat32;
  if (separate_master) master_shard_ = torch::zeros({layout_.shard_numel}, on_device(torch::kFloat32));

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

  piece_of_param_.assign(params_.size(), -1);
  for (size_t k = 0; k < pieces_.size(); ++k) piece_of_param_[pieces_[k].param] = static_cast<int64_t>(k);
  piece_grads_.resize(pieces_.size());
  got_grad_.assign(params_.size(), false);
  if (sharded_) {
    std::vector<size_t> order;  // roughly the order backward produces gradients in
    std::vector<bool> listed(params_.size(), false);
    for (auto& name : first_order)
      if (auto it = index_of.find(name); it != index_of.end() && !listed[it->second])
        order.push_back(it->second), listed[it->second] = true;
    for (size_t i = params_.size(); i-- > 0;)
      if (!listed[i]) order.push_back(i);
    plan_buckets(order);
    if (zero_stage_ == 2) install_gradient_hooks();
  }
}

// Buckets over the parameters in `param_order`, each at most bucket_numel_ elements of one dtype; a
// parameter larger than the room left is cut into segments over several buckets.
void ShardedAdamW::plan_buckets(const std::vector<size_t>& param_order) {
  buckets_.clear();
  buckets_of_param_.assign(params_.size(), {});
  for (size_t i : param_order) {
    const auto dtype = params_[i].scalar_type();
    for (int64_t offset = 0, numel = params_[i].numel(); offset < numel;) {
      if (buckets_.empty() || buckets_.back().dtype != dtype || buckets_.back().numel == bucket_numel_) {
        buckets_.emplace_back();
        buckets_.back().dtype = dtype;
      }
      Bucket& bucket = buckets_.back();
      const int64_t length = std::min(numel - offset, bucket_numel_ - bucket.numel);
      bucket.segments.push_back({i, offset, length});
      bucket.numel += length;
      if (buckets_of_param_[i].empty() || buckets_of_param_[i].back() != buckets_.size() - 1)
        buckets_of_param_[i].push_back(buckets_.size() - 1);
      offset += length;
    }
  }
  params_in_bucket_.assign(buckets_.size(), 0);
  for (size_t i = 0; i < params_.size(); ++i)
    for (size_t b : buckets_of_param_[i]) ++params_in_bucket_[b];
  start_micro_batch();
}

void ShardedAdamW::start_micro_batch() {
  missing_ = params_in_bucket_;
  unreduced_.resize(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) unreduced_[i] = static_cast<int>(buckets_of_param_[i].size());
  arrived_.assign(params_.size(), false);
  next_bucket_ = 0;
}

void ShardedAdamW::install_gradient_hooks() {
  for (size_t i = 0; i < params_.size(); ++i)
    hooks_.push_back(std::make_unique<GradAccumulatedHook>(params_[i], [this, i] { on_gradient_ready(i); }));
}

void ShardedAdamW::on_gradient_ready(size_t param) {
  if (arrived_[param]) {  // a second accumulation in this backward pass (the parameter is used twice)
    if (unreduced_[param] < static_cast<int>(buckets_of_param_[param].size()))
      throw Error("ZeRO 2: the gradient of '" + layout_.params[param].name +
                  "' arrived again after its bucket was reduced in the same backward pass");
    return;  // still unreduced: the second part is in .grad too
  }
  arrived_[param] = true;
  if (!bucket_order_fixed_) arrival_order_.push_back(param);
  for (size_t b : buckets_of_param_[param]) --missing_[b];
  torch::NoGradGuard no_grad;
  while (next_bucket_ < buckets_.size() && missing_[next_bucket_] == 0) reduce_bucket(next_bucket_++);
}

// Sums bucket b over the ranks, adds this rank's part to its gradient pieces, frees the .grad of every
// parameter whose buckets are all reduced. Collective: every rank reduces the same buckets in the same order.
void ShardedAdamW::reduce_bucket(size_t b) {
  const Bucket& bucket = buckets_[b];
  auto flat = torch::empty({bucket.numel}, on_device(bucket.dtype));
  int64_t at = 0;
  for (const Segment& s : bucket.segments) {
    auto slot = flat.narrow(0, at, s.length);
    const torch::Tensor& grad = params_[s.param].grad();
    if (grad.defined()) {
      slot.copy_(grad.reshape({-1}).narrow(0, s.offset, s.length));
      got_grad_[s.param] = true;
    } else {
      slot.zero_();  // no gradient on this rank (e.g. no image in its micro-batch): adds nothing
    }
    at += s.length;
  }
  comm_.allreduce(flat, dist::Reduce::Sum);
  at = 0;
  for (const Segment& s : bucket.segments) {
    if (const int64_t k = piece_of_param_[s.param]; k >= 0) {
      const Piece& p = pieces_[k];
      const int64_t begin = std::max(s.offset, p.param_offset);
      const int64_t end = std::min(s.offset + s.length, p.param_offset + p.length);
      if (begin < end) {
        auto values = flat.narrow(0, at + begin - s.offset, end - begin);
        if (zero_stage_ == 2) {
          add_to_piece_grad(k, begin - p.param_offset, values);
        } else {  // ZeRO 1: the sum goes back into this rank's part of .grad, which is kept (no new memory)
          auto& grad = params_[s.param].mutable_grad();
          if (!grad.defined()) grad = torch::zeros_like(params_[s.param]);  // only other ranks had one
          grad.view({-1}).narrow(0, begin, end - begin).copy_(values);
        }
      }
    }
    at += s.length;
  }
  note_memory({flat});  // the high point: the bucket, its .grads and the shard are all alive
  for (const Segment& s : bucket.segments) {
    const bool kept = zero_stage_ == 1 && piece_of_param_[s.param] >= 0;  // holds this rank's reduced part
    if (--unreduced_[s.param] == 0 && !kept) params_[s.param].mutable_grad() = torch::Tensor();
  }
}

// piece_grads_[k] += values at `offset` of the piece; chunks are made (zeros) when first touched, so a
// rank never holds a chunk before some bucket reached it.
void ShardedAdamW::add_to_piece_grad(size_t k, int64_t offset, const torch::Tensor& values) {
  const Piece& p = pieces_[k];
  auto& chunks = piece_grads_[k];
  if (chunks.empty()) chunks.resize(static_cast<size_t>((p.length + chunk_numel_ - 1) / chunk_numel_));
  const auto dtype = params_[p.param].scalar_type();
  for (int64_t done = 0; done < values.numel();) {
    const int64_t at = offset + done, c = at / chunk_numel_, in_chunk = at - c * chunk_numel_;
    auto& chunk = chunks[static_cast<size_t>(c)];
    if (!chunk.defined()) chunk = torch::zeros({std::min(chunk_numel_, p.length - c * chunk_numel_)}, on_device(dtype));
    const int64_t n = std::min(values.numel() - done, chunk.numel() - in_chunk);
    chunk.narrow(0, in_chunk, n).add_(values.narrow(0, done, n));  // fp32 values: summed in fp32, rounded once
    done += n;
  }
}

void ShardedAdamW::reduce_remaining_buckets() {
  while (next_bucket_ < buckets_.size()) reduce_bucket(next_bucket_++);
  start_micro_batch();
}

void ShardedAdamW::finish_micro_batch() {
  if (!sharded_ || zero_stage_ != 2) return;
  torch::NoGradGuard no_grad;
  reduce_remaining_buckets();
  if (!bucket_order_fixed_) fix_bucket_order();
}

// Buckets in the order rank 0's first backward pass produced the gradients (every rank must use the same
// buckets); parameters it saw no gradient for follow in reverse parameter order.
void ShardedAdamW::fix_bucket_order() {
  std::vector<bool> seen(params_.size(), false);
  std::vector<size_t> order;
  for (size_t i : arrival_order_) seen[i] = true, order.push_back(i);
  for (size_t i = params_.size(); i-- > 0;)
    if (!seen[i]) order.push_back(i);
  auto order_tensor = torch::empty({static_cast<int64_t>(order.size())}, torch::kFloat64);
  for (size_t j = 0; j < order.size(); ++j) order_tensor[static_cast<int64_t>(j)] = static_cast<double>(order[j]);
  order_tensor = order_tensor.to(device_);
  comm_.broadcast(order_tensor, 0);
  order_tensor = order_tensor.cpu();
  for (size_t j = 0; j < order.size(); ++j) order[j] = static_cast<size_t>(order_tensor[static_cast<int64_t>(j)].item<double>());
  plan_buckets(order);
  bucket_order_fixed_ = true;
  arrival_order_.clear();
}

std::vector<torch::Tensor> ShardedAdamW::grad_chunks(size_t k) const {
  if (sharded_ && zero_stage_ == 2) return piece_grads_[k];
  // ZeRO 0 and 1 (and one rank): the summed gradient is in the parameter's .grad.
  const Piece& p = pieces_[k];
  auto grad = params_[p.param].grad().view({-1}).narrow(0, p.param_offset, p.length);
  if (grad.scalar_type() == torch::kFloat32 && !sharded_) return {grad};  // as before: one piece, no copy
  std::vector<torch::Tensor> chunks;
  for (int64_t at = 0; at < p.length; at += chunk_numel_) chunks.push_back(grad.narrow(0, at, std::min(chunk_numel_, p.length - at)));
  return chunks;
}

void ShardedAdamW::note_memory(const std::vector<torch::Tensor>& transient) {
  std::unordered_set<const void*> seen;  // storages, each counted once (views share one)
  auto bytes = [&](const torch::Tensor& t) -> int64_t {
    if (!t.defined()) return 0;
    const void* storage = t.storage().unsafeGetStorageImpl();
    return seen.insert(storage).second ? static_cast<int64_t>(t.storage().nbytes()) : 0;
  };
  MemoryUsage now;
  for (auto& p : params_) now.params += bytes(p);
  for (auto& p : params_) now.grads += bytes(p.grad());
  for (auto& chunks : piece_grads_)
    for (auto& c : chunks) now.grads += bytes(c);
  for (auto& t : transient) now.transient += bytes(t);
  now.optimizer += bytes(master_shard_);
  for (auto& group : inner_->state())
    for (auto& s : group) now.optimizer += bytes(s.exp_avg) + bytes(s.exp_avg_sq);
  if (now.total() > peak_memory_.total()) peak_memory_ = now;
}

torch::Tensor ShardedAdamW::flat_param_view(size_t param, int64_t offset, int64_t length) const {
  return params_[param].detach().view({-1}).narrow(0, offset, length);
}

std::vector<bool> ShardedAdamW::params_with_grad() {
  auto flags = torch::zeros({static_cast<int64_t>(params_.size())}, torch::kFloat32);
  for (size_t i = 0; i < params_.size(); ++i)
    if (params_[i].grad().defined() || got_grad_[i]) flags[i] = 1.0f;
  if (comm_.world_size() > 1) {  // which tensors AdamW skips must be known here: one small read per step
    flags = flags.to(device_);
    comm_.allreduce(flags, dist::Reduce::Sum);
    flags = flags.cpu();
    ++host_reads_;
  }
  std::vector<bool> out(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) out[i] = flags[i].item<float>() > 0;
  return out;
}

torch::Tensor ShardedAdamW::reduce_gradients() {
  torch::NoGradGuard no_grad;
  if (sharded_ && zero_stage_ == 1) {
    reduce_remaining_buckets();
  } else if (sharded_) {  // ZeRO 2 reduced everything in the backward passes and finish_micro_batch()
    for (size_t i = 0; i < params_.size(); ++i)
      if (params_[i].grad().defined())
        throw Error("ZeRO 2: '" + layout_.params[i].name + "' holds an unreduced gradient (finish_micro_batch() "
                    "was not called after its backward pass)");
  } else {
    note_memory();  // every .grad of the window is alive
  }
  has_grad_ = params_with_grad();
  if (!sharded_) {  // every rank holds every gradient: all-reduce them in place
    std::vector<torch::Tensor> grads;
    for (size_t i = 0; i < params_.size(); ++i) {
      if (!has_grad_[i]) continue;
      if (!params_[i].grad().defined()) params_[i].mutable_grad() = torch::zeros_like(params_[i]);
      grads.push_back(params_[i].grad());
    }
    dist::allreduce_gradients(comm_, grads, dist::Reduce::Sum);
  }
  // Global norm as torch.nn.utils.clip_grad_norm_ computes it (norm of the per-tensor norms; a piece in
  // several chunks: norm of the chunks' norms); with shards, the squares of the local norms are summed
  // over ranks first.
  std::vector<torch::Tensor> norms;
  for (size_t k = 0; k < pieces_.size(); ++k) {
    if (!has_grad_[pieces_[k].param]) continue;  // torch's AdamW skips a parameter without a gradient
    std::vector<torch::Tensor> chunk_norms;
    for (auto& chunk : grad_chunks(k)) {
      auto grad = chunk.to(torch::kFloat32);
      if (!grad.is_same(chunk)) note_memory({grad});
      chunk_norms.push_back(grad.norm(2));
    }
    norms.push_back(chunk_norms.size() == 1 ? chunk_norms[0] : torch::stack(chunk_norms).norm(2));
  }
  grad_norm_ = norms.empty() ? torch::zeros({}, on_device(torch::kFloat32)) : torch::stack(norms).norm(2);
  if (sharded_) {
    auto squares = grad_norm_.to(torch::kFloat64).pow(2).reshape({1});
    comm_.allreduce(squares, dist::Reduce::Sum);
    grad_norm_ = squares.sqrt().reshape({}).to(torch::kFloat32);
  }
  return grad_norm_;
}

// AdamW on this rank's pieces, one gradient chunk at a time (in fp32: bf16 chunks are copied to fp32
// one by one, so the fp32 gradient is never whole).
void ShardedAdamW::update(double max_norm, double lr_factor) {
  torch::NoGradGuard no_grad;
  // Clipping as clip_grad_norm_: max_norm / (norm + 1e-6), at most 1, on the device and multiplied in
  // whatever its value (a multiply by 1 changes no bit, and deciding to skip it would read the norm back).
  torch::Tensor coef;
  if (max_norm > 0) coef = torch::clamp(max_norm / (grad_norm_ + 1e-6), c10::nullopt, 1.0);
  inner_->set_lr_factor(lr_factor);
  for (auto& g : groups_) g.lr = g.base_lr * lr_factor;
  for (size_t k = 0; k < pieces_.size(); ++k) {
    const Piece& p = pieces_[k];
    if (!has_grad_[p.param]) continue;
    const auto [g, j] = inner_slot_[k];
    AdamState& s = inner_->state()[g][j];
    if (!s.initialized()) {
      s.exp_avg = torch::zeros_like(p.master, torch::MemoryFormat::Preserve);
      s.exp_avg_sq = torch::zeros_like(p.master, torch::MemoryFormat::Preserve);
    }
    s.step += 1;
    const ParamGroup& group = inner_->groups()[g];
    int64_t at = 0;
    for (auto& chunk : grad_chunks(k)) {
      auto grad = chunk.to(torch::kFloat32);
      if (coef.defined()) grad.mul_(coef);
      note_memory(grad.is_same(chunk) ? std::vector<torch::Tensor>{} : std::vector<torch::Tensor>{grad});
      const int64_t n = chunk.numel();
      adamw_update(p.master.narrow(0, at, n), grad, s.exp_avg.narrow(0, at, n), s.exp_avg_sq.narrow(0, at, n), s.step,
                   group.lr, group.weight_decay, options_);
      at += n;
    }
  }
  discard();

  if (sharded_) {
    gather_parameters();
  } else if (master_shard_.defined()) {
    for (auto& p : pieces_) flat_param_view(p.param, p.param_offset, p.length).copy_(p.master);
  }
}

void ShardedAdamW::discard() {
  for (auto& chunks : piece_grads_) chunks.clear();
  std::fill(got_grad_.begin(), got_grad_.end(), false);
  zero_grad();
}

void ShardedAdamW::zero_grad() {
  for (auto& p : params_)
    if (p.grad().defined()) p.mutable_grad() = torch::Tensor();
}

torch::Tensor ShardedAdamW::gather_shards(const std::function<torch::Tensor(const Piece&)>& value) {
  auto shard = torch::zeros({layout_.shard_numel}, on_device(torch::kFloat32));
  for (auto& p : pieces_) shard.narrow(0, p.shard_offset, p.length).copy_(value(p));
  if (!sharded_) return shard;  // one shard holds everything
  auto flat = torch::empty({layout_.padded_numel()}, on_device(torch::kFloat32));
  comm_.all_gather_into(flat, shard);
  return flat;
}

// The updated parameters into every rank's model, chunk_numel_ shard elements at a time (an all-gather
// of [N * chunk] fp32), so no fp32 copy of all the parameters is ever made.
void ShardedAdamW::gather_parameters() {
  const int64_t shard = layout_.shard_numel, ranks = layout_.world_size;
  for (int64_t first = 0; first < shard; first += chunk_numel_) {
    const int64_t length = std::min(chunk_numel_, shard - first);
    auto local = torch::zeros({length}, on_device(torch::kFloat32));  // padding stays zero
    for (auto& p : pieces_) {
      const int64_t begin = std::max(first, p.shard_offset), end = std::min(first + length, p.shard_offset + p.length);
      if (begin < end)
        local.narrow(0, begin - first, end - begin).copy_(p.master.narrow(0, begin - p.shard_offset, end - begin));
    }
    auto gathered = torch::empty({ranks * length}, on_device(torch::kFloat32));
    comm_.all_gather_into(gathered, local);
    note_memory({local, gathered});
    for (int64_t r = 0; r < ranks; ++r) copy_into_params(r * shard + first, gathered.narrow(0, r * length, length));
  }
}

// The parameters' elements at flat positions [flat_begin, flat_begin + values.numel()) = values.
void ShardedAdamW::copy_into_params(int64_t flat_begin, const torch::Tensor& values) {
  const auto& offsets = layout_.flat_offsets;
  const int64_t flat_end = flat_begin + values.numel();
  auto after = std::upper_bound(offsets.begin(), offsets.end(), flat_begin);
  for (size_t i = after == offsets.begin() ? 0 : static_cast<size_t>(after - offsets.begin() - 1);
       i < params_.size() && offsets[i] < flat_end; ++i) {
    const int64_t begin = std::max(flat_begin, offsets[i]), end = std::min(flat_end, offsets[i] + params_[i].numel());
    if (begin < end) flat_param_view(i, begin - offsets[i], end - begin).copy_(values.narrow(0, begin - flat_begin, end - begin));
  }
}

AdamW ShardedAdamW::consolidated() {
  torch::NoGradGuard no_grad;
  auto state_of = [&](const Piece& p) -> const AdamState& {
    auto [g, j] = inner_slot_[&p - pieces_.data()];
    return inner_->state()[g][j];
  };
  auto zeros = [&](const Piece& p) { return torch::zeros({p.length}, on_device(torch::kFloat32)); };
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
  if (sharded_) {
    steps = steps.to(device_);
    comm_.allreduce(steps, dist::Reduce::Sum);
    steps = steps.cpu();
  }

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
    torch::Tensor exp_avg = torch::zeros({p.length}, on_device(torch::kFloat32)),
                  exp_avg_sq = torch::zeros({p.length}, on_device(torch::kFloat32));
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
