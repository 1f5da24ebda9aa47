// The sampler's contract: a world-size-independent global order, disjoint rank shards, exact resume.
#include <catch2/catch.hpp>

#include <algorithm>
#include <set>

#include "data/sampler.h"

using namespace llava::data;

namespace {

std::vector<int64_t> lengths_of(int n, bool mixed) {  // word counts; text-only samples negative
  std::vector<int64_t> l;
  for (int i = 0; i < n; ++i) l.push_back((mixed && i % 3 == 0 ? -1 : 1) * (5 + (i * 7) % 11));
  return l;
}

// All global batches of an epoch, each as the concatenation of rank 0..world-1's batches.
std::vector<int64_t> global_sequence(const SamplerConfig& cfg, const std::vector<int64_t>& lengths, int world,
                                     int64_t epoch, int64_t start = 0) {
  std::vector<DistributedSampler> ranks;
  for (int r = 0; r < world; ++r) ranks.emplace_back(cfg, lengths, r, world);
  std::vector<int64_t> seq;
  for (int64_t pos = start; pos < ranks[0].epoch_length(); pos += ranks[0].global_batch())
    for (auto& s : ranks) {
      auto b = s.rank_batch(epoch, pos);
      seq.insert(seq.end(), b.begin(), b.end());
    }
  return seq;
}

}  // namespace

TEST_CASE("epoch order is a permutation and a pure function of (seed, epoch)") {
  SamplerConfig cfg;
  cfg.seed = 7;
  auto lengths = lengths_of(50, false);
  auto a = epoch_order(cfg, lengths, 3);
  auto sorted = a;
  std::sort(sorted.begin(), sorted.end());
  for (int i = 0; i < 50; ++i) REQUIRE(sorted[i] == i);
  REQUIRE(epoch_order(cfg, lengths, 3) == a);
  REQUIRE(epoch_order(cfg, lengths, 4) != a);
  cfg.seed = 8;
  REQUIRE(epoch_order(cfg, lengths, 3) != a);
}

TEST_CASE("two ranks see disjoint shards whose union is the epoch") {
  SamplerConfig cfg;
  cfg.per_device_batch = 3;
  for (bool drop_last : {false, true}) {
    cfg.drop_last = drop_last;
    auto lengths = lengths_of(24, false);  // 24 = 4 global batches of 6: no padding either way
    DistributedSampler r0(cfg, lengths, 0, 2), r1(cfg, lengths, 1, 2);
    std::multiset<int64_t> seen0, seen1;
    for (int64_t pos = 0; pos < r0.epoch_length(); pos += r0.global_batch()) {
      for (auto i : r0.rank_batch(1, pos)) seen0.insert(i);
      for (auto i : r1.rank_batch(1, pos)) seen1.insert(i);
    }
    std::set<int64_t> all(seen0.begin(), seen0.end());
    for (auto i : seen0) REQUIRE(seen1.count(i) == 0);
    all.insert(seen1.begin(), seen1.end());
    REQUIRE(all.size() == 24);
    REQUIRE(seen0.size() + seen1.size() == 24);
  }
}

TEST_CASE("an uneven epoch is padded from its start or dropped, like DistributedSampler") {
  SamplerConfig cfg;
  cfg.per_device_batch = 2;
  auto lengths = lengths_of(11, false);
  DistributedSampler r0(cfg, lengths, 0, 2);
  REQUIRE(r0.epoch_length() == 12);
  auto seq = global_sequence(cfg, lengths, 2, 0);
  auto order = epoch_order(cfg, lengths, 0);
  REQUIRE(seq.size() == 12);
  REQUIRE(std::vector<int64_t>(seq.begin(), seq.begin() + 11) == order);
  REQUIRE(seq[11] == order[0]);
  cfg.drop_last = true;
  REQUIRE(DistributedSampler(cfg, lengths, 1, 2).epoch_length() == 8);
  REQUIRE(global_sequence(cfg, lengths, 2, 0) == std::vector<int64_t>(order.begin(), order.begin() + 8));
}

TEST_CASE("1, 2 and 3 ranks walk the same global sequence") {
  for (bool grouped : {false, true}) {
    SamplerConfig cfg;
    cfg.per_device_batch = 2;
    cfg.drop_last = true;
    cfg.group_by_modality = grouped;
    auto lengths = lengths_of(37, true);
    auto one = global_sequence(cfg, lengths, 1, 2);
    auto two = global_sequence(cfg, lengths, 2, 2);
    auto three = global_sequence(cfg, lengths, 3, 2);
    REQUIRE(two.size() == 36);
    REQUIRE(three.size() == 36);
    REQUIRE(std::equal(two.begin(), two.end(), one.begin()));
    REQUIRE(std::equal(three.begin(), three.end(), one.begin()));
  }
}

TEST_CASE("a restore from any position continues with exactly the next batch, any world size") {
  SamplerConfig cfg;
  cfg.per_device_batch = 2;
  cfg.drop_last = true;
  auto lengths = lengths_of(30, true);
  auto uninterrupted = global_sequence(cfg, lengths, 1, 5);
  for (int world : {1, 2, 3}) {
    const int64_t g = 2 * world, end = DistributedSampler(cfg, lengths, 0, world).epoch_length();
    for (int64_t pos = 0; pos + g <= end; pos += 2) {  // every position a run with 1 rank can stop at
      auto resumed = global_sequence(cfg, lengths, world, 5, pos);
      REQUIRE(resumed.size() >= static_cast<size_t>(g));
      REQUIRE(std::equal(resumed.begin(), resumed.end(), uninterrupted.begin() + pos));
    }
  }
}

TEST_CASE("group_by_modality_length: every per-device batch holds one modality, except the last") {
  SamplerConfig cfg;
  cfg.per_device_batch = 4;
  cfg.group_by_modality = true;
  auto lengths = lengths_of(45, true);  // 15 text-only, 30 with image
  auto order = epoch_order(cfg, lengths, 0);
  REQUIRE(std::set<int64_t>(order.begin(), order.end()).size() == 45);
  const size_t full = order.size() / 4 * 4 - 4;  // the leftovers (30%4 + 15%4 = 5) span the last two batches
  int mixed = 0;
  for (size_t b = 0; b < full; b += 4) {
    int images = 0;
    for (size_t i = b; i < b + 4; ++i) images += lengths[order[i]] >= 0;
    REQUIRE((images == 0 || images == 4));
    mixed += images == 0;
  }
  REQUIRE(mixed == 3);  // 15 text-only samples -> 3 full text batches
  cfg.group_by_modality = false;
  REQUIRE(epoch_order(cfg, lengths, 0) != order);
}

TEST_CASE("bad ranks are errors") {
  SamplerConfig cfg;
  REQUIRE_THROWS_WITH(DistributedSampler(cfg, lengths_of(4, false), 2, 2), Catch::Contains("rank 2"));
}
