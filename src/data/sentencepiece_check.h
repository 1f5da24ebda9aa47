// Checks of the parts of a tokenizer.model that libsentencepiece uses without checking them, run before
// sentencepiece sees the bytes: a hostile file must be an error, never a crash.
//
// libsentencepiece checks the protobuf and the pieces, but the Normalizer (normalizer_spec, and
// denormalizer_spec for decoding) reads its precompiled_charsmap as a raw Darts-clone double-array trie
// and walks it unchecked: a garbage trie makes it read far outside the blob (SIGSEGV). Every other table
// it searches (pieces, user-defined symbols) it builds itself from checked fields.
#pragma once
#include <string>
#include <string_view>

namespace llava::data {

// Throws Error("<where>: <field>: <what is wrong>") when `proto` (a serialized sentencepiece ModelProto)
// is not well-formed protobuf, or when the precompiled_charsmap that sentencepiece would use (the last one
// of each spec, as protobuf merges repeated messages) could make any input read outside it.
void check_sentencepiece_proto(const std::string& proto, const std::string& where);

// "" when every traversal sentencepiece's Normalizer can make of `blob` (uint32 trie size, trie units,
// NUL-terminated normalized strings) stays inside it; otherwise what is wrong. An empty blob (no
// normalization) is fine.
std::string precompiled_charsmap_problem(std::string_view blob);

}  // namespace llava::data
