// ZeRO partition layout and gradient bucket planning: pure arithmetic, checked element by element.
#include <catch2/catch.hpp>

#include "distributed/buckets.h"
#include "distributed/zero_layout.h"
#include "io/error.h"

using namespace llava::dist;

namespace {

// Rebuilds the flat buffer from the ranges of every rank: each element of every parameter must be
// covered exactly once, at the flat position the layout claims.
void check_covers_every_element_once(const ZeroLayout& layout) {
  std::vector<int> covered(static_cast<size_t>(layout.padded_numel()), 0);
  for (int r = 0; r < layout.world_size; ++r) {
    int64_t shard_used = 0;
    for (const auto& range : layout.rank_ranges[r]) {
      size_t p = 0;
      while (layout.params[p].name != range.name) ++p;
      REQUIRE(range.length > 0);
      REQUIRE(range.param_offset + range.length <= layout.params[p].numel);
      REQUIRE(range.shard_offset + range.length <= layout.shard_numel);
      // The shard position and the parameter position name the same flat element.
      REQUIRE(layout.shard_begin(r) + range.shard_offset == layout.flat_offsets[p] + range.param_offset);
      for (int64_t j = 0; j < range.length; ++j) covered[layout.shard_begin(r) + range.shard_offset + j]++;
      shard_used += range.length;
    }
    REQUIRE(layout.used_numel(r) == shard_used);
  }
  for (int64_t i = 0; i < layout.padded_numel(); ++i) REQUIRE(covered[i] == (i < layout.total_numel ? 1 : 0));
}

}  // namespace

TEST_CASE("zero layout: 31 elements over 2 and 3 ranks", "[dist][zero]") {
  std::vector<ParamSpec> params = {{"a", 10}, {"b", 7}, {"c", 1}, {"d", 13}};

  auto two = make_zero_layout(params, 2);
  CHECK(two.total_numel == 31);
  CHECK(two.shard_numel == 16);
  CHECK(two.padding() == 1);
  CHECK(two.flat_offsets == std::vector<int64_t>{0, 10, 17, 18});
  REQUIRE(two.rank_ranges[0].size() == 2);  // a[0:10], b[0:6]
  CHECK(two.rank_ranges[0][1].name == "b");
  CHECK(two.rank_ranges[0][1].length == 6);
  REQUIRE(two.rank_ranges[1].size() == 3);  // b[6:7], c, d
  CHECK(two.rank_ranges[1][0].param_offset == 6);
  CHECK(two.rank_ranges[1][0].shard_offset == 0);
  CHECK(two.rank_ranges[1][2].shard_offset == 2);
  check_covers_every_element_once(two);

  auto three = make_zero_layout(params, 3);
  CHECK(three.shard_numel == 11);
  CHECK(three.padding() == 2);
  CHECK(three.used_numel(2) == 9);
  check_covers_every_element_once(three);
}

TEST_CASE("zero layout: many sizes, world sizes and alignments", "[dist][zero]") {
  for (int world = 1; world <= 8; ++world)
    for (int64_t align : {1, 4, 16}) {
      std::vector<ParamSpec> params;
      for (int p = 0; p < 9; ++p) params.push_back({"p" + std::to_string(p), (p * 37) % 23});  // zeros too
      auto layout = make_zero_layout(params, world, align);
      INFO("world " << world << " align " << align);
      CHECK(layout.shard_numel % align == 0);
      CHECK(layout.padded_numel() >= layout.total_numel);
      // Padding is less than one aligned slot per rank: nobody holds a whole extra shard.
      CHECK(layout.padding() < static_cast<int64_t>(world) * align);
      check_covers_every_element_once(layout);
    }
}

TEST_CASE("zero layout: json names every range", "[dist][zero]") {
  auto layout = make_zero_layout({{"w", 5}, {"v", 4}}, 2);
  auto j = layout.to_json();
  CHECK(j["shard_numel"] == 5);
  CHECK(j["ranks"][1][0]["name"] == "v");
  CHECK(j["ranks"][1][0]["length"] == 4);
  CHECK(j["params"][1]["flat_offset"] == 5);
}

TEST_CASE("zero layout: bad input is a clear error", "[dist][zero]") {
  CHECK_THROWS_WITH(make_zero_layout({{"a", 1}}, 0), Catch::Contains("world size must be >= 1"));
  CHECK_THROWS_WITH(make_zero_layout({{"a", 1}, {"a", 2}}, 2), Catch::Contains("'a'") && Catch::Contains("duplicate"));
  CHECK_THROWS_WITH(make_zero_layout({{"a", -3}}, 2), Catch::Contains("negative numel -3"));
}

TEST_CASE("bucket plan: in order, capped, split on dtype", "[dist][buckets]") {
  auto f = torch::kFloat32, h = torch::kBFloat16;
  auto buckets = plan_buckets({12, 5, 8, 7, 40, 1, 2}, {f, f, f, f, f, h, h}, 16);
  REQUIRE(buckets.size() == 5);
  CHECK(buckets[0].indices == std::vector<size_t>{0});     // 12 (+5 > 16)
  CHECK(buckets[1].indices == std::vector<size_t>{1, 2});  // 5+8 (+7 > 16)
  CHECK(buckets[2].indices == std::vector<size_t>{3});     // 7 (+40 > 16)
  CHECK(buckets[3].indices == std::vector<size_t>{4});     // larger than the cap: alone
  CHECK(buckets[4].indices == std::vector<size_t>{5, 6});  // bf16 starts a new bucket
  CHECK(buckets[3].numel == 40);
  CHECK_THROWS_WITH(plan_buckets({1}, {f}, 0), Catch::Contains("bucket cap"));
}

TEST_CASE("allreduce_gradients with one rank leaves gradients as they are", "[dist][buckets]") {
  auto comm = Communicator::single_process();
  std::vector<torch::Tensor> grads = {torch::randn({3, 4}), torch::randn({5})};
  auto before = grads[0].clone();
  allreduce_gradients(comm, grads, Reduce::Avg, 4);
  CHECK(torch::equal(grads[0], before));
  std::vector<torch::Tensor> missing = {torch::randn({2}), torch::Tensor()};
  CHECK_THROWS_WITH(allreduce_gradients(comm, missing, Reduce::Avg), Catch::Contains("gradient #1 is undefined"));
}
