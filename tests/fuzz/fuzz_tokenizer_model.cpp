// tokenizer.model's blobs that libsentencepiece trusts (data/sentencepiece_check.h). The bytes are read
// twice: as a serialized ModelProto (the wire reader and both charsmap checks), and as one
// precompiled_charsmap. When the check accepts the charsmap, walks it the way sentencepiece's
// commonPrefixSearch does, with every read bounds-checked and the next byte chosen among the real
// children by the input's bytes: an accepted blob that would make sentencepiece read outside it, or yield
// more than its 32 prefix matches, is a finding (trap). sentencepiece itself cannot run here: ASan refuses
// the RTLD_DEEPBIND its shim is loaded with.
#include <cstring>
#include <string_view>
#include <vector>

#include "data/sentencepiece_check.h"
#include "fuzz/fuzz_input.h"

namespace {

uint32_t read_u32(std::string_view bytes, size_t at) {
  if (at + 4 > bytes.size()) __builtin_trap();
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data() + at);
  return p[0] | (p[1] << 8) | (p[2] << 16) | (uint32_t{p[3]} << 24);
}

// One input, its bytes picking children: sentencepiece reads units[base ^ c] for whatever byte c comes
// next, so all 256 of them must be inside the trie at every node the walk reaches.
void walk(std::string_view blob, std::string_view choices) {
  const uint32_t trie_bytes = read_u32(blob, 0);
  const std::string_view trie = blob.substr(4, trie_bytes), normalized = blob.substr(4 + trie_bytes);
  auto unit = [&](size_t i) { return read_u32(trie, 4 * i); };
  auto offset = [](uint32_t u) { return (u >> 10) << ((u & (1u << 9)) >> 6); };
  size_t base = 0 ^ offset(unit(0));
  int matches = 0;
  for (size_t step = 0; step < 4096; ++step) {
    std::vector<uint32_t> children;
    for (uint32_t c = 0; c < 256; ++c)
      if ((unit(base ^ c) & 0x800000ffu) == c) children.push_back(c);
    if (children.empty()) return;
    const uint8_t pick = step < choices.size() ? static_cast<uint8_t>(choices[step]) : 0;
    const size_t node = base ^ children[pick % children.size()];
    const uint32_t u = unit(node);
    base = node ^ offset(u);
    if ((u >> 8) & 1) {
      if (++matches > 32) __builtin_trap();
      const uint32_t value = unit(base) & 0x7fffffffu;
      if (value >= normalized.size() || normalized.find('\0', value) == std::string_view::npos) __builtin_trap();
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  llava::fuzz::expect_ok_or_error([&] { llava::data::check_sentencepiece_proto(bytes, "tokenizer.model"); });
  if (size > 4 && llava::data::precompiled_charsmap_problem(bytes).empty()) {
    const std::string_view tail = std::string_view(bytes).substr(size / 2);
    walk(bytes, "");
    walk(bytes, tail);
    walk(bytes, std::string_view(bytes).substr(4));
  }
  return 0;
}
