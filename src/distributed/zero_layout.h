// ZeRO partition layout: the trainable parameters laid end to end in one flat buffer, padded to a
// multiple of the world size and cut into equal shards, one per rank. Pure arithmetic (no torch), so the
// checkpoint code can rebuild the layout of any world size from names and numels alone.
#pragma once
#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace llava::dist {

struct ParamSpec {
  std::string name;
  int64_t numel = 0;
};

// A piece of one parameter that lies in one rank's shard: param[param_offset : param_offset+length]
// (flattened) == shard[shard_offset : shard_offset+length].
struct ShardRange {
  std::string name;
  int64_t param_offset = 0;
  int64_t length = 0;
  int64_t shard_offset = 0;
};

struct ZeroLayout {
  int world_size = 1;
  std::vector<ParamSpec> params;
  std::vector<int64_t> flat_offsets;  // where each parameter starts in the flat buffer
  int64_t total_numel = 0;            // sum of numels
  int64_t shard_numel = 0;            // every rank's shard has this size (padding included)
  std::vector<std::vector<ShardRange>> rank_ranges;  // [world_size]

  int64_t padded_numel() const { return shard_numel * world_size; }
  int64_t padding() const { return padded_numel() - total_numel; }
  int64_t shard_begin(int rank) const { return shard_numel * rank; }
  // Elements of rank's shard that hold parameters (the rest is padding at the end of the last shards).
  int64_t used_numel(int rank) const;

  nlohmann::json to_json() const;
};

// Shards are a multiple of `align_numel` elements (e.g. 16 fp32 = 64 bytes for aligned NCCL buffers).
// Bad input (world size < 1, negative numel, duplicate or empty names) -> llava::Error.
ZeroLayout make_zero_layout(const std::vector<ParamSpec>& params, int world_size, int64_t align_numel = 1);

}  // namespace llava::dist
