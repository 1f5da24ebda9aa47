#include "data/dataset.h"

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string_view>

#include "io/error.h"
#include "io/json_input.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace llava::data {
namespace {

int64_t count_words(const std::string& s) {  // Python's len(s.split())
  std::istringstream in(s);
  std::string w;
  int64_t n = 0;
  while (in >> w) ++n;
  return n;
}

Record parse_record(const json& j, const std::string& where) {
  if (!j.is_object()) fail(where, "expected an object {id, image, conversations}");
  Record r;
  r.where = where;
  if (j.contains("id")) r.id = j["id"].is_string() ? j["id"].get<std::string>() : j["id"].dump();
  if (j.contains("image") && !j["image"].is_null()) {
    if (!j["image"].is_string()) fail(where, "\"image\": expected a relative path string");
    r.image = j["image"].get<std::string>();
  }
  if (!j.contains("conversations") || !j["conversations"].is_array() || j["conversations"].empty())
    fail(where, "\"conversations\": expected a non-empty list of {from, value}");
  size_t t = 0;
  for (const auto& turn : j["conversations"]) {
    if (!turn.is_object() || !turn.contains("from") || !turn.contains("value") || !turn["from"].is_string() ||
        !turn["value"].is_string())
      fail(where, "conversations[" + std::to_string(t) + "]: expected {\"from\": str, \"value\": str}");
    const std::string from = turn["from"].get<std::string>();
    if (from != "human" && from != "gpt" && from != "user" && from != "assistant")  // LLaVA's roles (+ HF's)
      fail(where, "conversations[" + std::to_string(t) + "]: \"from\": '" + from + "' is not human or gpt");
    r.turns.push_back({turn["from"].get<std::string>(), turn["value"].get<std::string>()});
    r.modality_length += count_words(r.turns.back().value);
    ++t;
  }
  if (r.image.empty()) r.modality_length = -r.modality_length;
  return r;
}

}  // namespace

std::vector<Record> load_records(const std::vector<std::string>& paths) {
  std::vector<Record> records;
  for (const auto& path : paths) {
    const size_t before = records.size();
    const std::string text = io::read_input_file(path, io::InputKind::kDataset);
    const size_t first = text.find_first_not_of(" \t\r\n");
    if (first != std::string::npos && text[first] == '[') {
      io::JsonParseOptions options;
      options.item_name = "record";  // a record nested too deep is named like every other bad record
      const json list = io::parse_json(text, path, options);
      for (size_t i = 0; i < list.size(); ++i)
        records.push_back(parse_record(list[i], path + ": record " + std::to_string(i)));
    } else {  // JSONL: lines are views into `text`, each parsed on its own
      size_t n = 0;
      for (size_t start = 0; start < text.size();) {
        size_t end = text.find('\n', start);
        if (end == std::string::npos) end = text.size();
        const std::string_view line(text.data() + start, end - start);
        start = end + 1;
        ++n;
        if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
        const std::string where = path + ": line " + std::to_string(n);
        records.push_back(parse_record(io::parse_json(line, where), where));
      }
    }
    if (records.size() == before) fail(path, "no records (expected a JSON list of records, or one JSON record per line)");
  }
  return records;
}

uint64_t max_record_text_bytes(int64_t model_max_length) {
  return std::max<uint64_t>(uint64_t{1} << 20, 64 * static_cast<uint64_t>(std::max<int64_t>(model_max_length, 0)));
}

LlavaDataset::LlavaDataset(std::vector<Record> records, Tokenizer tokenizer, DatasetSettings settings)
    : records_(std::move(records)), tokenizer_(std::move(tokenizer)), settings_(std::move(settings)) {
  const uint64_t limit = max_record_text_bytes(settings_.model_max_length);
  for (const auto& r : records_) {
    if (!r.image.empty() && settings_.model_max_length <= settings_.image_tokens.count)
      fail(r.where, "has an image, but model_max_length " + std::to_string(settings_.model_max_length) +
                        " leaves no room for it: the model's image takes " + std::to_string(settings_.image_tokens.count) +
                        " tokens; raise model_max_length");
    uint64_t bytes = 0;
    for (const auto& turn : r.turns) bytes += turn.value.size();
    if (bytes > limit)
      fail(r.where, "its conversation holds " + std::to_string(bytes) + " bytes of text, more than the " +
                        std::to_string(limit) + " a record may hold (64 bytes per token of model_max_length " +
                        std::to_string(settings_.model_max_length) + ", at least 1 MiB): shorten or split it");
  }
}

std::vector<int64_t> LlavaDataset::modality_lengths() const {
  std::vector<int64_t> lengths;
  for (const auto& r : records_) lengths.push_back(r.modality_length);
  return lengths;
}

std::optional<Example> LlavaDataset::get(size_t i) const {
  const Record& r = records_.at(i);
  Example ex;
  if (!r.image.empty()) {
    const std::string path = (fs::path(settings_.image_folder) / r.image).string();
    try {
      ex.pixel_values = load_clip_pixels(path, settings_.image);  // bounded: kMaxImagePixels, image_budget()
    } catch (const Error& e) {
      if (settings_.skip_missing_images) return std::nullopt;
      throw Error(r.where + ": " + e.what());
    }
  }
  try {
    auto s = tokenize_conversation(settings_.conversation, r.turns, !r.image.empty(), tokenizer_,
                                   settings_.image_tokens, settings_.model_max_length);
    ex.input_ids = std::move(s.input_ids);
    ex.labels = std::move(s.labels);
    ex.mismatch = s.mismatch;
  } catch (const Error& e) {
    throw Error(r.where + ": " + e.what());
  }
  return ex;
}

std::optional<TokenizationMismatch> LlavaDataset::check_tokenization(size_t i) const {
  const Record& r = records_.at(i);
  try {
    return tokenize_conversation(settings_.conversation, r.turns, !r.image.empty(), tokenizer_,
                                 settings_.image_tokens, settings_.model_max_length)
        .mismatch;
  } catch (const Error& e) {
    throw Error(r.where + ": " + e.what());
  }
}

}  // namespace llava::data
