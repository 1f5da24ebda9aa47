#include "distributed/zero_layout.h"

#include <algorithm>
#include <set>

#include "io/error.h"

namespace llava::dist {
namespace {

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

void check_params(const std::vector<ParamSpec>& params) {
  std::set<std::string> seen;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    std::string where = "zero layout: parameter #" + std::to_string(i) + " '" + p.name + "'";
    if (p.name.empty()) fail(where, "empty name");
    if (p.numel < 0) fail(where, "negative numel " + std::to_string(p.numel));
    if (!seen.insert(p.name).second) fail(where, "duplicate name");
  }
}

// The parts of every parameter that fall inside [begin, end) of the flat buffer.
std::vector<ShardRange> ranges_in(const ZeroLayout& layout, int64_t begin, int64_t end) {
  std::vector<ShardRange> ranges;
  for (size_t i = 0; i < layout.params.size(); ++i) {
    int64_t p_begin = layout.flat_offsets[i];
    int64_t p_end = p_begin + layout.params[i].numel;
    int64_t lo = std::max(begin, p_begin), hi = std::min(end, p_end);
    if (lo < hi) ranges.push_back({layout.params[i].name, lo - p_begin, hi - lo, lo - begin});
  }
  return ranges;
}

}  // namespace

ZeroLayout make_zero_layout(const std::vector<ParamSpec>& params, int world_size, int64_t align_numel) {
  if (world_size < 1) fail("zero layout", "world size must be >= 1, got " + std::to_string(world_size));
  if (align_numel < 1) fail("zero layout", "alignment must be >= 1, got " + std::to_string(align_numel));
  check_params(params);

  ZeroLayout layout;
  layout.world_size = world_size;
  layout.params = params;
  for (const auto& p : params) {
    layout.flat_offsets.push_back(layout.total_numel);
    layout.total_numel += p.numel;
  }
  int64_t per_rank = (layout.total_numel + world_size - 1) / world_size;
  layout.shard_numel = round_up(std::max<int64_t>(per_rank, 1), align_numel);
  for (int r = 0; r < world_size; ++r)
    layout.rank_ranges.push_back(ranges_in(layout, layout.shard_begin(r), layout.shard_begin(r + 1)));
  return layout;
}

int64_t ZeroLayout::used_numel(int rank) const {
  int64_t used = 0;
  for (const auto& range : rank_ranges.at(rank)) used += range.length;
  return used;
}

nlohmann::json ZeroLayout::to_json() const {
  nlohmann::json j;
  j["world_size"] = world_size;
  j["total_numel"] = total_numel;
  j["shard_numel"] = shard_numel;
  j["params"] = nlohmann::json::array();
  for (size_t i = 0; i < params.size(); ++i)
    j["params"].push_back({{"name", params[i].name}, {"numel", params[i].numel}, {"flat_offset", flat_offsets[i]}});
  j["ranks"] = nlohmann::json::array();
  for (const auto& ranges : rank_ranges) {
    auto rank_json = nlohmann::json::array();
    for (const auto& r : ranges)
      rank_json.push_back({{"name", r.name}, {"param_offset", r.param_offset}, {"length", r.length},
                           {"shard_offset", r.shard_offset}});
    j["ranks"].push_back(rank_json);
  }
  return j;
}

}  // namespace llava::dist
