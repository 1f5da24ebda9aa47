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
//
// Gradient memory per rank (Ψ trainable parameters, N ranks), as the ZeRO paper counts it:
//   ZeRO 1: the parameters' .grad accumulate over the window (Ψ elements); at its end they are
//           all-reduced bucket by bucket, this rank's part of each sum is written back into .grad, and
//           every .grad without a part of this rank's shard is freed as soon as its buckets are done, so
//           nothing beyond the Ψ elements of .grad is ever allocated.
//   ZeRO 2: like DeepSpeed, buckets are reduced DURING each backward pass (a hook on every parameter's
//           gradient accumulator, as torch's DDP Reducer), this rank's part is added to its persistent
//           shard (Ψ/N elements, parameter dtype) and each .grad is freed once its buckets are reduced.
// Buckets hold at most `bucket_numel` elements (a parameter may span several); their buffers, the fp32
// copies the norm and the update make of gradient chunks of at most `bucket_numel` elements, and the
// all-gather of the updated parameters in chunks of `bucket_numel` shard elements ([N * chunk] fp32) are
// the only transient buffers. A bucket is summed in the parameters' dtype where the backend can (fp32;
// bf16 on NCCL), else in an fp32 buffer (bf16 on Gloo), then added to the shard (rounded once).
// Buckets follow the order in which rank 0's first backward pass produced the gradients (like DDP's
// rebuilt buckets; the first micro-batch of a run uses `first_order`), and every rank reduces
// them in the same order: a bucket is reduced in the backward pass once its parameters' gradients and
// all earlier buckets are done, the rest (parameters without a gradient on this rank: zeros) in
// finish_micro_batch(), which every rank calls after every micro-batch.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "distributed/communicator.h"
#include "distributed/zero_layout.h"
#include "train/adamw.h"
#include "train/grad_accumulated_hook.h"

namespace llava::train {

// One parameter range of one rank's optimizer state, as ZeRO shard files store it (checkpoint/optimizer_state.h).
using RangeState = checkpoint::RangeState;

// Bytes this rank holds by role, read from the storages of the live tensors (each storage counted once)
// at the optimizer's high points: every bucket reduction (before the reduced .grads are freed), every
// chunk of the norm, of the update and of the parameter all-gather.
struct MemoryUsage {
  int64_t params = 0;     // the trainable parameters as the model holds them
  int64_t grads = 0;      // parameters' .grad + this rank's reduced gradient shard
  int64_t optimizer = 0;  // fp32 master weights kept apart from the model + Adam moments
  int64_t transient = 0;  // bucket buffers, fp32 gradient chunks, all-gather chunks alive at that moment
  int64_t total() const { return params + grads + optimizer + transient; }
};

class ShardedAdamW {
 public:
  // groups: the model's trainable parameters (HF's groups, named_parameters() order). In fp32 the master
  // weights are the parameters themselves; for bf16 parameters they are fp32 copies of the shard.
  // bucket_numel: the cap of a gradient bucket and of an fp32 gradient chunk (elements).
  // first_order: parameter names in the order backward is expected to make their gradients (reverse
  // model order), for the buckets of a run's first micro-batch; empty: reverse of the groups' order.
  ShardedAdamW(std::vector<ParamGroup> groups, AdamWOptions options, dist::Communicator& comm, int zero_stage,
               int64_t bucket_numel = kDefaultBucketNumel, const std::vector<std::string>& first_order = {});
  ShardedAdamW(const ShardedAdamW&) = delete;  // the gradient hooks point at this object
  ShardedAdamW& operator=(const ShardedAdamW&) = delete;
  static constexpr int64_t kDefaultBucketNumel = 50'000'000;

  // Every rank, after every micro-batch's backward pass (or instead of it, when its loss reaches no
  // trainable): ZeRO 2 reduces the buckets not yet reduced. A no-op otherwise.
  void finish_micro_batch();

  // After the window's backward passes: sums the gradients over ranks into this rank's pieces and
  // returns their global norm (HF's grad_norm) as a 0-d fp32 tensor on the parameters' device, not read
  // back (the caller reads it when it logs). Then either update() or discard().
  torch::Tensor reduce_gradients();
  // Clips to max_norm (<= 0: no clipping) with a coefficient computed on the device, as clip_grad_norm_
  // (min(max_norm / (norm + 1e-6), 1), multiplied in even when it is 1: no host read), updates with
  // lr = base_lr * lr_factor, gathers the parameters.
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
  // The high point with the largest total so far (see MemoryUsage).
  const MemoryUsage& peak_memory() const { return peak_memory_; }
  int64_t bucket_numel() const { return bucket_numel_; }
  const dist::ZeroLayout& layout() const { return layout_; }
  const std::vector<ParamGroup>& groups() const { return groups_; }
  const AdamWOptions& options() const { return options_; }
  int zero_stage() const { return zero_stage_; }
  // Reads of device values by the host so far (each one waits for the device): only the multi-rank
  // exchange of which parameters got a gradient (see params_with_grad). Tests count them.
  int64_t host_reads() const { return host_reads_; }

 private:
  // A piece of one parameter inside this rank's shard; `master` is what AdamW updates.
  struct Piece {
    size_t param;  // index into params_
    int64_t param_offset, length, shard_offset;
    torch::Tensor master;  // [length] fp32
  };
  // A stretch of one parameter's gradient in a bucket: grad.view(-1)[offset : offset + length].
  struct Segment {
    size_t param;
    int64_t offset, length;
  };
  struct Bucket {
    std::vector<Segment> segments;
    int64_t numel = 0;
    torch::Dtype dtype = torch::kFloat32;
  };

  torch::Tensor flat_param_view(size_t param, int64_t offset, int64_t length) const;
  std::vector<bool> params_with_grad();           // any rank has a gradient for the parameter
  // The gradient of piece k, summed over ranks, in chunks of at most chunk_numel_ (parameter dtype).
  std::vector<torch::Tensor> grad_chunks(size_t k) const;
  void plan_buckets(const std::vector<size_t>& param_order);
  void install_gradient_hooks();
  void on_gradient_ready(size_t param);  // ZeRO 2: called by autograd after param.grad was accumulated
  void reduce_bucket(size_t b);
  void reduce_remaining_buckets();  // in order, then start_micro_batch()
  void start_micro_batch();         // no gradient arrived, no bucket reduced
  void add_to_piece_grad(size_t k, int64_t offset, const torch::Tensor& values);
  void fix_bucket_order();          // ZeRO 2, after the first micro-batch: rank 0's gradient order
  void note_memory(const std::vector<torch::Tensor>& transient = {});
  torch::Tensor gather_shards(const std::function<torch::Tensor(const Piece&)>& value);  // [padded] fp32
  void gather_parameters();
  void copy_into_params(int64_t flat_begin, const torch::Tensor& values);

  std::vector<ParamGroup> groups_;
  AdamWOptions options_;
  dist::Communicator& comm_;
  int zero_stage_;
  bool sharded_;  // ZeRO 1/2 with more than one rank
  std::vector<torch::Tensor> params_;  // flat order = groups' order
  torch::Device device_ = torch::kCPU; // the parameters' device: every buffer and collective lives there
  torch::TensorOptions on_device(torch::Dtype dtype) const { return torch::TensorOptions().dtype(dtype).device(device_); }
  std::vector<size_t> group_of_;       // params_[i] belongs to groups_[group_of_[i]]
  dist::ZeroLayout layout_;
  int shard_rank_;
  std::vector<Piece> pieces_;
  torch::Tensor master_shard_;  // bf16 runs: [shard_numel] fp32 master weights; fp32 runs: undefined
  torch::Tensor grad_norm_;     // fp32 0-d: the global norm of the reduced gradients
  std::unique_ptr<AdamW> inner_;  // over pieces_[i].master, groups mirroring groups_
  std::vector<std::pair<size_t, size_t>> inner_slot_;  // piece i = inner_.groups()[g].params[j]
  std::vector<bool> has_grad_;  // per parameter, for this step: some rank had a gradient for it

  // Gradient reduction (sharded runs).
  int64_t bucket_numel_, chunk_numel_;
  std::vector<Bucket> buckets_;
  std::vector<std::vector<size_t>> buckets_of_param_;
  std::vector<int64_t> piece_of_param_;                // index into pieces_, -1: not in this rank's shard
  std::vector<std::vector<torch::Tensor>> piece_grads_;  // per piece: reduced gradient chunks, made on first use
  std::vector<int> params_in_bucket_;
  std::vector<int> missing_;    // per bucket: parameters whose gradient has not arrived in this micro-batch
  std::vector<int> unreduced_;  // per parameter: its buckets not reduced yet in this micro-batch
  std::vector<bool> arrived_;   // per parameter: its gradient arrived in this micro-batch
  std::vector<bool> got_grad_;  // per parameter: this rank had a gradient for it in this window
  size_t next_bucket_ = 0;
  std::vector<size_t> arrival_order_;  // ZeRO 2, first micro-batch of the run
  bool bucket_order_fixed_ = false;
  std::vector<std::unique_ptr<GradAccumulatedHook>> hooks_;
  MemoryUsage peak_memory_;
  int64_t host_reads_ = 0;
};

}  // namespace llava::train
