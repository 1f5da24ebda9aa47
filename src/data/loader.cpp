#include "data/loader.h"

#include <algorithm>
#include <iostream>

namespace llava::data {

Batch collate(const std::vector<Example>& examples, int64_t pad_id, std::vector<int64_t> image_shape) {
  const int64_t b = examples.size();
  int64_t t = 0;
  for (const auto& ex : examples) t = std::max<int64_t>(t, ex.input_ids.size());
  Batch batch;
  batch.input_ids = torch::full({b, t}, pad_id, torch::kInt64);
  batch.labels = torch::full({b, t}, -100, torch::kInt64);
  batch.attention_mask = torch::zeros({b, t}, torch::kInt64);
  batch.has_image = torch::zeros({b}, torch::kBool);
  std::vector<torch::Tensor> images;
  for (int64_t i = 0; i < b; ++i) {
    const auto& ex = examples[i];
    const int64_t n = ex.input_ids.size();
    if (n > 0) {
      batch.input_ids[i].narrow(0, 0, n).copy_(torch::tensor(ex.input_ids, torch::kInt64));
      batch.labels[i].narrow(0, 0, n).copy_(torch::tensor(ex.labels, torch::kInt64));
      batch.attention_mask[i].narrow(0, 0, n).fill_(1);
    }
    if (ex.pixel_values) {
      images.push_back(*ex.pixel_values);
      batch.has_image[i] = true;
    }
  }
  image_shape.insert(image_shape.begin(), 0);
  batch.pixel_values = images.empty() ? torch::zeros(image_shape, torch::kFloat32) : torch::stack(images);
  return batch;
}

DataLoader::DataLoader(const LlavaDataset& dataset, const DistributedSampler& sampler, SamplerState start,
                       int num_workers, int prefetch_batches, bool pin_memory)
    : dataset_(dataset), state_(start), prefetch_(std::max(prefetch_batches, 1)), pin_memory_(pin_memory) {
  for (int64_t pos = start.position; pos < sampler.epoch_length(); pos += sampler.global_batch()) {
    steps_.push_back(sampler.rank_batch(start.epoch, pos));
    positions_.push_back(std::min(pos + sampler.global_batch(), sampler.epoch_length()));
  }
  for (int i = 0; i < num_workers; ++i) workers_.emplace_back([this] { work(); });
}

DataLoader::~DataLoader() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& w : workers_) w.join();
}

Batch DataLoader::build(size_t step) const {
  std::vector<Example> examples;
  Batch skipped_info;
  std::vector<int64_t> kept;
  for (int64_t index : steps_[step]) {
    auto ex = dataset_.get(index);
    if (!ex) {
      ++skipped_info.skipped;
      continue;
    }
    if (ex->mismatch) skipped_info.mismatched.push_back({index, *ex->mismatch});
    examples.push_back(std::move(*ex));
    kept.push_back(index);
  }
  const auto& img = dataset_.settings().image;
  Batch batch = collate(examples, dataset_.tokenizer().pad_id(), {3, img.crop_height, img.crop_width});
  if (pin_memory_)
    for (auto* t : {&batch.input_ids, &batch.labels, &batch.attention_mask, &batch.pixel_values, &batch.has_image})
      *t = t->pin_memory();
  batch.indices = std::move(kept);
  batch.skipped = skipped_info.skipped;
  batch.mismatched = std::move(skipped_info.mismatched);
  return batch;
}

void DataLoader::work() {
  for (;;) {
    size_t step;
    {
      std::unique_lock<std::mutex> lock(mu_);
      // Bounded: never run more than `prefetch_` batches ahead of the consumer.
      cv_.wait(lock, [&] { return stop_ || (next_task_ < steps_.size() && next_task_ < consumed_ + prefetch_); });
      if (stop_) return;
      step = next_task_++;
    }
    std::pair<Batch, std::exception_ptr> result;
    try {
      result.first = build(step);
    } catch (...) {
      result.second = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      ready_[step] = std::move(result);
    }
    cv_.notify_all();
  }
}

std::optional<Batch> DataLoader::next() {
  while (consumed_ < steps_.size()) {
    Batch batch;
    if (workers_.empty()) {
      batch = build(consumed_);
      ++consumed_;
    } else {
      std::pair<Batch, std::exception_ptr> result;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return ready_.count(consumed_) > 0; });
        result = std::move(ready_[consumed_]);
        ready_.erase(consumed_);
        ++consumed_;  // under the lock: workers read it to stay within the prefetch window
      }
      cv_.notify_all();
      if (result.second) std::rethrow_exception(result.second);
      batch = std::move(result.first);
    }
    state_.position = positions_[consumed_ - 1];
    skipped_ += batch.skipped;
    if (batch.indices.empty()) continue;
    return batch;
  }
  if (finished_) return std::nullopt;
  finished_ = true;
  if (skipped_ > 0)
    std::cerr << "data: epoch " << state_.epoch << ": skipped " << skipped_ << " samples with unreadable images\n";
  state_ = {state_.epoch + 1, 0};
  return std::nullopt;
}

}  // namespace llava::data
