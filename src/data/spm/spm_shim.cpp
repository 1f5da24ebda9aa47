#include "spm_shim.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <unordered_map>
#include <vector>

using sentencepiece::SentencePieceProcessor;

namespace {

long copy_out(const std::string& s, char* out, size_t cap) {
  std::memcpy(out, s.data(), std::min(cap, s.size()));
  return static_cast<long>(s.size());
}

void write_error(const std::string& msg, char* err, size_t err_cap) {
  if (err_cap == 0) return;
  const size_t n = std::min(msg.size(), err_cap - 1);
  std::memcpy(err, msg.data(), n);
  err[n] = '\0';
}

// The trainer pulls sentences from memory rather than from an input file.
class Sentences : public sentencepiece::SentenceIterator {
 public:
  explicit Sentences(std::vector<std::string> lines) : lines_(std::move(lines)) {}
  bool done() const override { return next_ >= lines_.size(); }
  void Next() override { ++next_; }
  const std::string& value() const override { return lines_[next_]; }
  sentencepiece::util::Status status() const override { return sentencepiece::util::Status(); }

 private:
  std::vector<std::string> lines_;
  size_t next_ = 0;
};

}  // namespace

extern "C" {

void* llava_spm_load(const char* bytes, size_t size, int no_dummy_prefix, char* err, size_t err_cap) {
  std::string proto(bytes, size);
  // A second normalizer_spec {add_dummy_prefix: false} appended: protobuf merges repeated embedded
  // messages field by field, last value wins (HF's non-legacy Llama tokenizer does this via protobuf).
  if (no_dummy_prefix) proto += std::string("\x1a\x02\x18\x00", 4);
  auto* sp = new SentencePieceProcessor();
  auto status = sp->LoadFromSerializedProto(proto);
  if (!status.ok()) {
    std::string msg = status.ToString();
    if (err_cap > 0) {
      copy_out(msg.substr(0, err_cap - 1), err, err_cap);
      err[std::min(msg.size(), err_cap - 1)] = '\0';
    }
    delete sp;
    return nullptr;
  }
  return sp;
}

void llava_spm_free(void* model) { delete static_cast<SentencePieceProcessor*>(model); }

int llava_spm_piece_size(const void* model) {
  return static_cast<const SentencePieceProcessor*>(model)->GetPieceSize();
}

long llava_spm_encode(const void* model, const char* text, size_t size, int64_t* triples, long cap) {
  sentencepiece::ImmutableSentencePieceText pieces;
  auto sp = static_cast<const SentencePieceProcessor*>(model);
  if (!sp->Encode(std::string(text, size), pieces.mutable_proto()).ok()) return -1;
  const long n = static_cast<long>(pieces.pieces_size());
  for (long i = 0; i < n && i < cap; ++i) {
    auto p = pieces.pieces(static_cast<int>(i));
    triples[3 * i] = p.id();
    triples[3 * i + 1] = p.begin();
    triples[3 * i + 2] = p.end();
  }
  return n;
}

long llava_spm_decode(const void* model, const int* ids, size_t n, char* out, size_t cap) {
  std::string text;
  if (!static_cast<const SentencePieceProcessor*>(model)->Decode(std::vector<int>(ids, ids + n), &text).ok())
    return -1;
  return copy_out(text, out, cap);
}

long llava_spm_id_to_piece(const void* model, int id, char* out, size_t cap) {
  return copy_out(static_cast<const SentencePieceProcessor*>(model)->IdToPiece(id), out, cap);
}

int llava_spm_piece_to_id(const void* model, const char* piece, size_t size) {
  return static_cast<const SentencePieceProcessor*>(model)->PieceToId(std::string(piece, size));
}

int llava_spm_train(const char* const* sentences, const size_t* sizes, size_t n, const char* const* options,
                    size_t n_options, char** proto, size_t* proto_size, char* err, size_t err_cap) {
  std::string model;
  try {  // no C++ exception may cross the C boundary
    std::vector<std::string> lines;
    for (size_t i = 0; i < n; ++i) lines.emplace_back(sentences[i], sizes[i]);
    std::unordered_map<std::string, std::string> kwargs;
    for (size_t i = 0; i < n_options; ++i) kwargs[options[2 * i]] = options[2 * i + 1];
    Sentences iterator(std::move(lines));
    auto status = sentencepiece::SentencePieceTrainer::Train(kwargs, &iterator, &model);
    if (!status.ok()) {
      write_error(status.ToString(), err, err_cap);
      return -1;
    }
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_cap);
    return -1;
  }
  *proto = static_cast<char*>(std::malloc(model.size()));
  if (!*proto) {
    write_error("out of memory", err, err_cap);
    return -1;
  }
  std::memcpy(*proto, model.data(), model.size());
  *proto_size = model.size();
  return 0;
}

void llava_spm_free_bytes(char* bytes) { std::free(bytes); }
}
