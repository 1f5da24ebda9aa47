// The optimizer step of a run with any number of ranks, ZeRO stage 0, 1 or 2, fp32 or bf16 weights.
//
// The trainable parameters are laid end to end in one flat buffer (dist::ZeroLayout) and cut into one
// shard per rank (ZeRO 1/2), or into a single shard that every rank holds (ZeRO 0). A rank keeps fp32
// master weights and Adam moments for the pieces of parameters in its shard only. One step is
//   every rank's gradients -> summed into this rank's shard -> global norm, clipping
//   -> AdamW (torch numerics) on the shard -> the updated parameters gathered into every rank's model,
// after which every rank holds bitwise-identical trainable weights.
// Gradients are summed, not averaged, over ranks: the trainer divides every micro-batch loss by the
// scored tokens of the whole global window, so the sum is the gradient of the global mean token loss.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "dist/communicator.h"
#include "dist/zero_layout.h"
#include "train/adamw.h"

namespace llava::train {

// One parameter range of one rank's optimizer state, as ZeRO shard files store it (resume_state.h):
// param[param_offset : param_offset + length] (flattened).
struct RangeState {
  std::string name;
  int64_t param_offset = 0, length = 0, step = 0;  // step 0: never updated (no moments)
  torch::Tensor exp_avg, exp_avg_sq;                // [length] fp32
  torch::Tensor master;                             // [length] fp32, bf16 runs only
};

class ShardedAdamW {
 public:
  // groups: the model's trainable parameters (HF's groups, named_parameters() order). In fp32 the master
  // weights are the parameters themselves; for bf16 parameters they are fp32 copies of the shard.
  ShardedAdamW(std::vector<ParamGroup> groups, AdamWOptions options, dist::Communicator& comm, int zero_stage);

  // After the window's backward passes: sums the gradients over ranks into this rank's pieces and
  // returns their global norm (HF's grad_norm). Then either update() or discard().
  double reduce_gradients();
  // Clips to max_norm (<= 0: no clipping), updates with lr = base_lr * lr_factor, gathers the parameters.
  void update(double max_norm, double lr_factor);
  void discard();    // drops the reduced gradients (a skipped step)
  void zero_grad();  // drops the model parameters' gradients

  // The whole optimizer as one AdamW over the model's parameters, state as torch keeps it (what
  // optimizer.pt holds). Collective: every rank must call it; every rank gets the full state.
  AdamW consolidated();
  // The reverse: this rank takes its shard of a whole-model state (from any world size / stage).
  void load_consolidated(const AdamW& whole);
  // fp32 master weights by parameter name (collective, like consolidated()); only bf16 runs keep them
  // apart from the model, so fp32 runs return {}.
  std::vector<std::pair<std::string, torch::Tensor>> master_weights();
  void load_master_weights(const std::vector<std::pair<std::string, torch::Tensor>>& weights);

  // This rank's state by parameter range (no communication), and the reverse: take this rank's pieces
  // from the ranges of every rank of a run with any world size (llava::Error when they do not cover them).
  std::vector<RangeState> local_ranges() const;
  void load_ranges(const std::vector<RangeState>& all, const std::string& where);
  bool sharded() const { return sharded_; }

  // Bytes of optimizer state this rank holds: Adam moments plus separate master weights.
  int64_t state_bytes() const;
  const dist::ZeroLayout& layout() const { return layout_; }
  const std::vector<ParamGroup>& groups() const { return groups_; }
  int zero_stage() const { return zero_stage_; }

 private:
  // A piece of one parameter inside this rank's shard; `master` is what AdamW updates.
  struct Piece {
    size_t param;  // index into params_
    int64_t param_offset, length, shard_offset;
    torch::Tensor master;  // [length] fp32
  };
  torch::Tensor flat_param_view(size_t param, int64_t offset, int64_t length) const;
  std::vector<bool> params_with_grad();           // any rank has a gradient for the parameter
  torch::Tensor reduced_grad_shard();             // [shard_numel] fp32, summed over ranks
  torch::Tensor gather_shards(const std::function<torch::Tensor(const Piece&)>& value);  // [padded] fp32
  void gather_parameters();

  std::vector<ParamGroup> groups_;
  AdamWOptions options_;
  dist::Communicator& comm_;
  int zero_stage_;
  bool sharded_;  // ZeRO 1/2 with more than one rank
  std::vector<torch::Tensor> params_;  // flat order = groups' order
  std::vector<size_t> group_of_;       // params_[i] belongs to groups_[group_of_[i]]
  dist::ZeroLayout layout_;
  int shard_rank_;
  std::vector<Piece> pieces_;
  torch::Tensor master_shard_;  // bf16 runs: [shard_numel] fp32 master weights; fp32 runs: undefined
  torch::Tensor grad_norm_;     // fp32 0-d: the global norm of the reduced gradients
  std::unique_ptr<AdamW> inner_;  // over pieces_[i].master, groups mirroring groups_
  std::vector<std::pair<size_t, size_t>> inner_slot_;  // piece i = inner_.groups()[g].params[j]
};

}  // namespace llava::train
