// Worker threads build this rank's batches ahead of the step into a bounded window; batches come out in
// sampler order, each a pure function of its sample indices, so the output does not depend on threads.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include <torch/torch.h>

#include "data/dataset.h"
#include "data/sampler.h"

namespace llava::data {

struct Batch {
  torch::Tensor input_ids;       // [B,T] int64, right-padded with the tokenizer's pad id
  torch::Tensor labels;          // [B,T] int64, -100 on prompt, image and padding positions
  torch::Tensor attention_mask;  // [B,T] int64, 1 on real tokens
  torch::Tensor pixel_values;    // [I,3,H,W] float32, one per sample with an image, in sample order
                                 // (text-only samples contribute none; I may be 0)
  torch::Tensor has_image;       // [B] bool
  std::vector<int64_t> indices;  // dataset indices of the rows
  // Rows LLaVA's tokenization-mismatch rule masked whole (they train nothing): dataset index, lengths.
  std::vector<std::pair<int64_t, TokenizationMismatch>> mismatched;
  int64_t skipped = 0;           // samples dropped from this batch for unreadable images
};

// Pads to the longest sample. `image_shape` is [3,H,W] for an empty pixel_values.
Batch collate(const std::vector<Example>& examples, int64_t pad_id, std::vector<int64_t> image_shape);

class DataLoader {
 public:
  // Iterates the rest of `start.epoch` from `start.position`. num_workers 0: batches built on next().
  // pin_memory: each batch's tensors are copied into page-locked memory by the worker that built it (torch
  // DataLoader's pin_memory), so a CUDA copy from them never waits; only in a libtorch with CUDA.
  DataLoader(const LlavaDataset& dataset, const DistributedSampler& sampler, SamplerState start,
             int num_workers, int prefetch_batches = 4, bool pin_memory = false);
  ~DataLoader();
  DataLoader(const DataLoader&) = delete;
  DataLoader& operator=(const DataLoader&) = delete;

  // The next batch of this rank, or nullopt at the end of the epoch. Batches whose samples were all
  // skipped are passed over (the global step count still advances in state()).
  std::optional<Batch> next();
  // Where a checkpoint taken now resumes: after the last batch returned ({epoch+1, 0} at the end).
  SamplerState state() const { return state_; }
  int64_t skipped_images() const { return skipped_; }  // this epoch so far

 private:
  Batch build(size_t step) const;
  void work();

  const LlavaDataset& dataset_;
  SamplerState state_;
  std::vector<std::vector<int64_t>> steps_;  // this rank's indices per remaining global step
  std::vector<int64_t> positions_;           // global position after each step
  int prefetch_;
  bool pin_memory_;
  int64_t skipped_ = 0;
  size_t consumed_ = 0;
  bool finished_ = false;

  std::mutex mu_;
  std::condition_variable cv_;
  size_t next_task_ = 0;
  bool stop_ = false;
  std::map<size_t, std::pair<Batch, std::exception_ptr>> ready_;
  std::vector<std::thread> workers_;
};

}  // namespace llava::data
