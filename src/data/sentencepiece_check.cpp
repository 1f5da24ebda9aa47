#include "data/sentencepiece_check.h"

#include <cstdint>
#include <optional>
#include <vector>

#include "io/error.h"

namespace llava::data {
namespace {

// ---- protobuf wire format (only what locating the charsmaps needs) ----

constexpr int kVarint = 0, kFixed64 = 1, kLengthDelimited = 2, kFixed32 = 5;

struct Field {
  uint32_t number;
  int wire_type;
  std::string_view payload;  // length-delimited fields only
};

// Reads a message's fields one by one; `ok()` turns false at the first malformed byte (where sentencepiece's
// protobuf parser would refuse the file too). Groups (wire types 3, 4) are refused: sentencepiece's
// messages have none.
class WireReader {
 public:
  explicit WireReader(std::string_view data) : data_(data) {}
  bool ok() const { return ok_; }
  size_t position() const { return pos_; }

  bool next(Field& field) {
    if (!ok_ || pos_ >= data_.size()) return false;
    uint64_t key = 0;
    if (!varint(key) || (key >> 3) == 0 || (key >> 3) > (uint64_t{1} << 29) - 1) return fail();
    field = {static_cast<uint32_t>(key >> 3), static_cast<int>(key & 7), {}};
    uint64_t value = 0;
    switch (field.wire_type) {
      case kVarint: return varint(value) || fail();
      case kFixed64: return skip(8);
      case kFixed32: return skip(4);
      case kLengthDelimited:
        if (!varint(value) || value > data_.size() - pos_) return fail();
        field.payload = data_.substr(pos_, value);
        pos_ += value;
        return true;
      default: return fail();
    }
  }

 private:
  bool varint(uint64_t& value) {
    value = 0;
    for (int shift = 0; shift < 64 && pos_ < data_.size(); shift += 7) {
      const uint8_t byte = static_cast<uint8_t>(data_[pos_++]);
      value |= uint64_t{byte & 0x7fu} << shift;
      if (!(byte & 0x80)) return true;
    }
    return false;
  }
  bool skip(size_t n) {
    if (n > data_.size() - pos_) return fail();
    pos_ += n;
    return true;
  }
  bool fail() {
    ok_ = false;
    return false;
  }

  std::string_view data_;
  size_t pos_ = 0;
  bool ok_ = true;
};

// ModelProto: normalizer_spec = 3, denormalizer_spec = 5; NormalizerSpec: precompiled_charsmap = 2.
constexpr uint32_t kNormalizerSpec = 3, kDenormalizerSpec = 5, kPrecompiledCharsmap = 2;

// ---- Darts-clone double array, as sentencepiece's Normalizer walks it ----

// Unit layout (darts.h): bit 31 marks a value unit, bit 9 scales the offset by 256, bit 8 "has a leaf".
struct Unit {
  uint32_t bits;
  bool has_leaf() const { return (bits >> 8) & 1; }
  uint32_t value() const { return bits & 0x7fffffffu; }
  uint32_t label() const { return bits & 0x800000ffu; }  // a value unit never equals a byte
  uint32_t offset() const { return (bits >> 10) << ((bits & (1u << 9)) >> 6); }
};

// sentencepiece's Normalizer keeps at most this many prefix matches per position (normalizer.h,
// kMaxTrieResultsSize) and reads past its stack array when a trie yields more; its builder never does.
constexpr int kMaxPrefixMatches = 32;
// 23x sentencepiece's own nmt_nfkc table (44,800 units); the walk reads 256 units per reachable node, so a
// hostile trie of this size that is all reachable takes about a second to check.
constexpr uint32_t kMaxTrieUnits = uint32_t{1} << 20;

class TrieCheck {
 public:
  TrieCheck(std::vector<Unit> units, std::string_view normalized)
      : units_(std::move(units)), normalized_(normalized), state_(units_.size(), kUnseen),
        matches_below_(units_.size(), 0) {
    const size_t nul = normalized_.rfind('\0');
    if (nul != std::string_view::npos) last_nul_ = nul;
  }

  // commonPrefixSearch from the root: at node p it reads units[base ^ c] for the next input byte c
  // (base = p ^ offset(p)), a child when that unit's label is c, and for a child with a leaf the value at
  // units[base], an offset into the normalized strings read up to a NUL. A depth-first walk over every
  // node reachable that way checks all of those reads; a cycle (a real trie is acyclic) is refused, which
  // also bounds the number of matches along any input.
  std::string problem() {
    struct Frame {
      uint32_t node;
      uint32_t next_byte;
    };
    std::vector<Frame> stack;
    if (auto p = enter(0)) return *p;
    stack.push_back({0, 0});
    while (!stack.empty()) {
      Frame& top = stack.back();
      if (top.next_byte > 0xff) {  // every child walked: its count joins its parent's
        const uint32_t done = top.node;
        state_[done] = kDone;
        stack.pop_back();
        if (!stack.empty())
          if (auto p = note_child(stack.back().node, done)) return *p;
        continue;
      }
      const uint32_t c = top.next_byte++;
      const uint32_t child = base(top.node) ^ c;
      if (units_[child].label() != c) continue;
      if (state_[child] == kOnPath) return "the trie has a cycle through unit " + std::to_string(child);
      if (state_[child] == kUnseen) {
        if (auto p = enter(child)) return *p;
        stack.push_back({child, 0});
        continue;
      }
      // A finished child (a shared suffix of the DAWG darts-clone builds): its count is final.
      if (auto p = note_child(top.node, child)) return *p;
    }
    return "";
  }

 private:
  enum : uint8_t { kUnseen, kOnPath, kDone };

  uint32_t base(uint32_t node) const { return node ^ units_[node].offset(); }
  int own_match(uint32_t node) const { return node != 0 && units_[node].has_leaf() ? 1 : 0; }

  // A node's reads: the 256 units of its children's block, and its leaf's normalized string.
  std::optional<std::string> enter(uint32_t node) {
    state_[node] = kOnPath;
    const uint64_t block_end = uint64_t{base(node)} | 0xff;
    if (block_end >= units_.size())
      return "trie unit " + std::to_string(node) + " points at units " + std::to_string(base(node) & ~0xffu) + ".." +
             std::to_string(block_end) + ", past the " + std::to_string(units_.size()) + " units of the trie";
    if (own_match(node)) {
      const uint32_t value = units_[base(node)].value();
      if (value >= normalized_.size())
        return "trie unit " + std::to_string(node) + " maps to byte " + std::to_string(value) +
               " of the normalized strings, which have " + std::to_string(normalized_.size()) + " bytes";
      if (!last_nul_ || value > *last_nul_)  // a NUL after every string start, found once (no rescans)
        return "the normalized string at byte " + std::to_string(value) + " has no terminating NUL";
    }
    matches_below_[node] = static_cast<uint8_t>(own_match(node));
    return std::nullopt;
  }

  std::optional<std::string> note_child(uint32_t parent, uint32_t child) {
    const int through = own_match(parent) + matches_below_[child];
    if (through > kMaxPrefixMatches)
      return "an input can match more than " + std::to_string(kMaxPrefixMatches) +
             " prefixes of the trie (sentencepiece keeps " + std::to_string(kMaxPrefixMatches) + ")";
    if (through > matches_below_[parent]) matches_below_[parent] = static_cast<uint8_t>(through);
    return std::nullopt;
  }

  std::vector<Unit> units_;
  std::string_view normalized_;
  std::optional<size_t> last_nul_;
  std::vector<uint8_t> state_;
  std::vector<uint8_t> matches_below_;  // most leaf nodes on a path from here (this node included)
};

void check_charsmap(std::string_view blob, const std::string& where, const char* spec) {
  const std::string problem = precompiled_charsmap_problem(blob);
  if (!problem.empty()) fail(where, std::string(spec) + ".precompiled_charsmap: " + problem);
}

}  // namespace

std::string precompiled_charsmap_problem(std::string_view blob) {
  if (blob.empty()) return "";
  if (blob.size() <= 4) return std::to_string(blob.size()) + " bytes, too short for its 4-byte trie size";
  const auto* p = reinterpret_cast<const uint8_t*>(blob.data());
  const uint32_t trie_bytes = p[0] | (p[1] << 8) | (p[2] << 16) | (uint32_t{p[3]} << 24);
  if (trie_bytes > blob.size() - 4)
    return "trie size " + std::to_string(trie_bytes) + " is more than the " + std::to_string(blob.size() - 4) +
           " bytes after it";
  if (trie_bytes == 0 || trie_bytes % 4 != 0)
    return "trie size " + std::to_string(trie_bytes) + " is not a positive multiple of 4 bytes";
  if (trie_bytes / 4 > kMaxTrieUnits)
    return "trie of " + std::to_string(trie_bytes / 4) + " units is over the limit of " + std::to_string(kMaxTrieUnits);
  std::vector<Unit> units(trie_bytes / 4);
  for (size_t i = 0; i < units.size(); ++i) {
    const uint8_t* u = p + 4 + 4 * i;
    units[i].bits = u[0] | (u[1] << 8) | (u[2] << 16) | (uint32_t{u[3]} << 24);
  }
  return TrieCheck(std::move(units), blob.substr(4 + trie_bytes)).problem();
}

void check_sentencepiece_proto(const std::string& proto, const std::string& where) {
  std::optional<std::string_view> charsmap[2];  // normalizer_spec, denormalizer_spec: the last one wins
  WireReader model(proto);
  Field field;
  while (model.next(field)) {
    if (field.wire_type != kLengthDelimited || (field.number != kNormalizerSpec && field.number != kDenormalizerSpec))
      continue;
    WireReader spec(field.payload);
    Field inner;
    while (spec.next(inner))
      if (inner.number == kPrecompiledCharsmap && inner.wire_type == kLengthDelimited)
        charsmap[field.number == kDenormalizerSpec] = inner.payload;
    if (!spec.ok())
      fail(where, std::string("not a sentencepiece model: ") +
                      (field.number == kNormalizerSpec ? "normalizer_spec" : "denormalizer_spec") +
                      " is malformed protobuf");
  }
  if (!model.ok())
    fail(where, "not a sentencepiece model: malformed protobuf at byte " + std::to_string(model.position()));
  if (charsmap[0]) check_charsmap(*charsmap[0], where, "normalizer_spec");
  if (charsmap[1]) check_charsmap(*charsmap[1], where, "denormalizer_spec");
}

}  // namespace llava::data
