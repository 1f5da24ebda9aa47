#include "data/sampler.h"

#include <algorithm>
#include <numeric>
#include <string>

#include "io/error.h"

namespace llava::data {
namespace {

// splitmix64: a tiny, fully specified generator, so the order is the same with every standard library.
struct Rng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
};

template <typename T>
void shuffle(std::vector<T>& v, Rng& rng) {  // Fisher-Yates
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[rng.next() % i]);
}

// LLaVA's modality grouping at per-device-batch granularity: each pool shuffled and cut into batches
// (sorted by length, longest first); full batches shuffled; the two leftovers form one last mixed batch.
std::vector<int64_t> modality_grouped(const std::vector<int64_t>& lengths, int64_t batch, Rng& rng) {
  std::vector<int64_t> image_pool, text_pool;
  for (size_t i = 0; i < lengths.size(); ++i) (lengths[i] >= 0 ? image_pool : text_pool).push_back(i);
  std::vector<std::vector<int64_t>> batches;
  std::vector<int64_t> leftovers;
  for (auto* pool : {&image_pool, &text_pool}) {
    shuffle(*pool, rng);
    for (size_t start = 0; start < pool->size(); start += batch) {
      std::vector<int64_t> b(pool->begin() + start, pool->begin() + std::min(pool->size(), size_t(start + batch)));
      std::stable_sort(b.begin(), b.end(),
                       [&](int64_t x, int64_t y) { return std::abs(lengths[x]) > std::abs(lengths[y]); });
      if (static_cast<int64_t>(b.size()) == batch)
        batches.push_back(std::move(b));
      else
        leftovers.insert(leftovers.end(), b.begin(), b.end());
    }
  }
  shuffle(batches, rng);
  std::vector<int64_t> order;
  for (const auto& b : batches) order.insert(order.end(), b.begin(), b.end());
  order.insert(order.end(), leftovers.begin(), leftovers.end());
  return order;
}

}  // namespace

std::vector<int64_t> epoch_order(const SamplerConfig& cfg, const std::vector<int64_t>& lengths, int64_t epoch) {
  Rng rng{cfg.seed * 0x100000001b3ull + static_cast<uint64_t>(epoch)};
  const bool mixed = std::any_of(lengths.begin(), lengths.end(), [](int64_t l) { return l >= 0; }) &&
                     std::any_of(lengths.begin(), lengths.end(), [](int64_t l) { return l < 0; });
  if (cfg.shuffle && cfg.group_by_modality && mixed) return modality_grouped(lengths, cfg.per_device_batch, rng);
  std::vector<int64_t> order(lengths.size());
  std::iota(order.begin(), order.end(), 0);
  if (cfg.shuffle) shuffle(order, rng);
  return order;
}

DistributedSampler::DistributedSampler(SamplerConfig cfg, std::vector<int64_t> lengths, int rank, int world)
    : cfg_(cfg), lengths_(std::move(lengths)), rank_(rank), world_(world) {
  if (world < 1 || rank < 0 || rank >= world)
    throw Error("sampler: rank " + std::to_string(rank) + " is outside world size " + std::to_string(world));
  if (cfg.per_device_batch < 1) throw Error("per_device_train_batch_size: expected >= 1");
  if (lengths_.empty()) throw Error("sampler: the dataset is empty");
}

int64_t DistributedSampler::epoch_length() const {
  const int64_t n = lengths_.size(), g = global_batch();
  return cfg_.drop_last ? n / g * g : (n + g - 1) / g * g;
}

const std::vector<int64_t>& DistributedSampler::order(int64_t epoch) const {
  if (cached_epoch_ != epoch) {
    cached_order_ = epoch_order(cfg_, lengths_, epoch);
    const size_t n = cached_order_.size();
    for (size_t i = 0; cached_order_.size() < static_cast<size_t>(epoch_length()); ++i)
      cached_order_.push_back(cached_order_[i % n]);  // padding repeats the start of the order
    cached_order_.resize(epoch_length());
    cached_epoch_ = epoch;
  }
  return cached_order_;
}

std::vector<int64_t> DistributedSampler::rank_batch(int64_t epoch, int64_t position) const {
  const auto& o = order(epoch);
  const int64_t begin = std::min<int64_t>(position + rank_ * cfg_.per_device_batch, o.size());
  const int64_t end = std::min<int64_t>(begin + cfg_.per_device_batch, o.size());
  return std::vector<int64_t>(o.begin() + begin, o.begin() + end);
}

}  // namespace llava::data
