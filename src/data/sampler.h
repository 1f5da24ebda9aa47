// The sample order: a pure function of (seed, epoch), defined once for all ranks, then cut into global
// batches of world*per_device samples, each split across ranks. A run's position is (epoch, samples of
// the global order consumed), so a resumed run - with any number of ranks - continues with the next batch.
#pragma once
#include <cstdint>
#include <vector>

namespace llava::data {

struct SamplerConfig {
  uint64_t seed = 42;
  int64_t per_device_batch = 1;
  bool shuffle = true;
  bool drop_last = false;          // else pad with samples from the start of the order (DistributedSampler)
  bool group_by_modality = false;  // every per-device batch is all-image or all-text (LLaVA stage 2)
};

struct SamplerState {
  int64_t epoch = 0;
  int64_t position = 0;  // samples of the epoch's global order already handed out (all ranks together)
};

// The epoch's order of dataset indices, independent of world size. `lengths`: LLaVA's modality lengths
// (word counts, negative for text-only samples); only their signs and sizes matter for grouping.
std::vector<int64_t> epoch_order(const SamplerConfig& cfg, const std::vector<int64_t>& lengths, int64_t epoch);

class DistributedSampler {
 public:
  DistributedSampler(SamplerConfig cfg, std::vector<int64_t> lengths, int rank, int world);

  int64_t global_batch() const { return cfg_.per_device_batch * world_; }
  // Length of the epoch's order after padding/dropping to whole global batches.
  int64_t epoch_length() const;
  // This rank's indices of the global batch starting at `position` of `epoch`'s order.
  std::vector<int64_t> rank_batch(int64_t epoch, int64_t position) const;
  int rank() const { return rank_; }
  int world() const { return world_; }
  size_t dataset_size() const { return lengths_.size(); }

 private:
  const std::vector<int64_t>& order(int64_t epoch) const;
  SamplerConfig cfg_;
  std::vector<int64_t> lengths_;
  int rank_, world_;
  mutable int64_t cached_epoch_ = -1;
  mutable std::vector<int64_t> cached_order_;  // padded
};

}  // namespace llava::data
