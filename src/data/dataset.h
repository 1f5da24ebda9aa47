// LLaVA-format datasets: records from JSON lists / JSONL files, turned into tokenized, masked samples
// with preprocessed images.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "data/conversation.h"
#include "data/image.h"
#include "data/tokenizer.h"

namespace llava::data {

struct Record {
  std::string id;
  std::string image;  // relative to image_folder; empty for text-only samples
  std::vector<Turn> turns;
  std::string where;  // "file: record N", for error messages
  int64_t modality_length = 0;  // LLaVA: words over all turns, negative for text-only samples
};

// Reads every file (a JSON list of records, or JSONL: one record per line) in order. A malformed record:
// Error naming the file and the record index (JSON lists) or line (JSONL).
std::vector<Record> load_records(const std::vector<std::string>& paths);

struct Example {
  std::vector<int64_t> input_ids, labels;  // [T]
  std::optional<torch::Tensor> pixel_values;  // [3,H,W], absent for text-only samples
  std::optional<TokenizationMismatch> mismatch;  // every label masked by LLaVA's rule (see conversation.h)
};

struct DatasetSettings {
  std::string image_folder;
  Template conversation = Template::vicuna_v1;
  int64_t model_max_length = 2048;
  ImageTokens image_tokens;
  ClipImageConfig image;
  bool skip_missing_images = false;
};

// The most text (bytes of every turn's value) one record may hold: 64 bytes for each token of
// model_max_length, at least 1 MiB. A sentencepiece piece is at most 16 bytes, so past this nothing more of
// the record could ever be trained on, while tokenizing it costs ~300 bytes of memory per byte of text.
uint64_t max_record_text_bytes(int64_t model_max_length);

class LlavaDataset {
 public:
  // Refuses (Error naming the record) a record with more text than max_record_text_bytes(): checked for
  // every record here, before any is tokenized.
  LlavaDataset(std::vector<Record> records, Tokenizer tokenizer, DatasetSettings settings);

  size_t size() const { return records_.size(); }
  std::vector<int64_t> modality_lengths() const;
  const Record& record(size_t i) const { return records_.at(i); }
  const Tokenizer& tokenizer() const { return tokenizer_; }
  const DatasetSettings& settings() const { return settings_; }

  // Tokenized, masked sample with its image. nullopt when the image cannot be read and
  // skip_missing_images is on; otherwise that is an Error naming the record and the file. Thread-safe.
  std::optional<Example> get(size_t i) const;

  // Record i's conversation tokenized as get() does it, without its image: whether LLaVA's
  // tokenization-mismatch rule masks it whole. Errors (a conversation the template refuses) name the record.
  std::optional<TokenizationMismatch> check_tokenization(size_t i) const;

 private:
  std::vector<Record> records_;
  Tokenizer tokenizer_;
  DatasetSettings settings_;
};

}  // namespace llava::data
