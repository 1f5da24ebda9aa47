// A Llama sentencepiece tokenizer with HF's added tokens, matching the slow LlamaTokenizer that LLaVA
// trained with: added/special tokens split the text first, each remaining segment goes to sentencepiece.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "data/sentencepiece_model.h"

namespace llava::data {

struct AddedToken {
  std::string content;
  int64_t id = -1;
  bool special = true;
  std::string file;  // the file that gave its id, for errors
};

// One encoded piece and the bytes of the input it came from, for masking by character span.
struct TokenSpan {
  int64_t id;
  size_t begin, end;  // byte offsets into the encoded text
};

class Tokenizer {
 public:
  // `dir` holds tokenizer.model plus any of tokenizer_config.json, special_tokens_map.json,
  // added_tokens.json, tokenizer.json (only its "added_tokens" are read). Error names the file when
  // one is missing, unreadable or disagrees with another about a token's id.
  static Tokenizer load(const std::string& dir);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // [BOS] + pieces (+ [EOS] when add_eos_token). Legacy: every segment between added tokens gets
  // sentencepiece's dummy "▁" prefix; non-legacy: only the first segment of the text does.
  std::vector<int64_t> encode(const std::string& text, bool add_special = true) const;
  std::vector<TokenSpan> encode_with_spans(const std::string& text, bool add_special = true) const;
  std::string decode(const std::vector<int64_t>& ids, bool skip_special = false) const;

  int64_t bos_id() const { return bos_id_; }
  int64_t eos_id() const { return eos_id_; }
  int64_t unk_id() const { return unk_id_; }
  int64_t pad_id() const { return pad_id_; }  // unk when no pad token is configured (LLaVA v1's choice)
  bool legacy() const { return legacy_; }
  bool add_bos() const { return add_bos_; }
  int64_t vocab_size() const;                      // sentencepiece pieces + added tokens
  int64_t token_id(const std::string& content) const;  // an added token's id, or -1
  const std::string& dir() const { return dir_; }

  // Every id encode() can produce (sentencepiece pieces, added and special tokens) must index a model
  // vocabulary of `vocab_size` ids, else libtorch's embedding fails on the first batch that holds it
  // (possibly hours into training). Error names the tokenizer file, the token, its id and `vocab_size`;
  // `vocab_where` says where that number came from (the model's config.json).
  void check_ids_fit(int64_t vocab_size, const std::string& vocab_where) const;

 private:
  Tokenizer();
  void encode_segment(const std::string& text, size_t offset, bool dummy_prefix,
                      std::vector<TokenSpan>& out) const;
  const AddedToken* added_by_id(int64_t id) const;

  std::string dir_;
  std::unique_ptr<SentencePieceModel> sp_;            // model as trained
  std::unique_ptr<SentencePieceModel> sp_no_prefix_;  // add_dummy_prefix off
  std::vector<AddedToken> added_;  // longest content first, the order text is split in
  int64_t bos_id_ = 1, eos_id_ = 2, unk_id_ = 0, pad_id_ = 0;
  bool legacy_ = true, add_bos_ = true, add_eos_ = false;
};

}  // namespace llava::data
