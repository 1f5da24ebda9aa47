// A sentencepiece model behind libllava_spm.so (see spm/CMakeLists.txt for why it is dlopened).
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace llava::data {

struct Piece {
  int64_t id;
  size_t begin, end;  // byte span of the input
};

class SentencePieceModel {
 public:
  // `proto`: the bytes of tokenizer.model; `where` names it in errors.
  SentencePieceModel(const std::string& proto, bool dummy_prefix, const std::string& where);
  ~SentencePieceModel();
  SentencePieceModel(const SentencePieceModel&) = delete;
  SentencePieceModel& operator=(const SentencePieceModel&) = delete;

  std::vector<Piece> encode(const std::string& text) const;  // thread-safe
  std::string decode(const std::vector<int>& ids) const;
  int piece_size() const;
  std::string id_to_piece(int id) const;
  int piece_to_id(const std::string& piece) const;

 private:
  void* handle_ = nullptr;
  std::string where_;
};

// Trains a model with SentencePieceTrainer on `sentences`; `options` are its flags ({"model_type", "bpe"},
// {"vocab_size", "300"}, ...). Returns the bytes of a tokenizer.model. Error names `where` and the reason.
std::string train_sentencepiece(const std::vector<std::string>& sentences,
                                const std::vector<std::pair<std::string, std::string>>& options,
                                const std::string& where);

}  // namespace llava::data
