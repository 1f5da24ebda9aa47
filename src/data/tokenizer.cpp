#include "data/tokenizer.h"

#include <algorithm>
#include <charconv>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "io/error.h"
#include "io/json_input.h"
#include "io/yaml_config.h"  // printable

namespace fs = std::filesystem;
using nlohmann::json;

namespace llava::data {
namespace {

json read_json(const std::string& path) { return io::read_json_file(path); }

// Token ids from files: far above any real vocabulary (Llama 3: 128k), low enough that vocab_size() (the
// largest id + 1) never sizes an absurd embedding.
constexpr int64_t kMaxTokenId = (int64_t(1) << 24) - 1;

bool flag_of(const json& entry, const char* key, bool fallback, const std::string& where) {
  if (!entry.is_object() || !entry.contains(key) || entry[key].is_null()) return fallback;
  if (!entry[key].is_boolean()) fail(where, std::string(key) + ": expected true or false");
  return entry[key].get<bool>();
}

// HF writes a special token either as "<s>" or as {"content": "<s>", ...}; null means "not set".
std::string token_content(const json& value, const std::string& where) {
  if (value.is_null()) return "";
  if (value.is_string()) return value.get<std::string>();
  if (value.is_object() && value.contains("content") && value["content"].is_string())
    return value["content"].get<std::string>();
  fail(where, "expected a token string or {\"content\": ...}, got " + value.dump());
}

// content -> id, remembering which file said so, so that disagreements name both files.
struct AddedRegistry {
  std::map<std::string, std::pair<int64_t, std::string>> ids;
  std::map<std::string, bool> special;

  void add(const std::string& content, int64_t id, bool is_special, const std::string& file) {
    auto it = ids.find(content);
    if (it != ids.end() && it->second.first != id)
      fail(file, "token '" + content + "' has id " + std::to_string(id) + " but " + it->second.second +
                     " gives " + std::to_string(it->second.first));
    ids[content] = {id, file};
    special[content] = special[content] || is_special;
  }
};

}  // namespace

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

Tokenizer Tokenizer::load(const std::string& dir) {
  Tokenizer tok;
  tok.dir_ = dir;
  const std::string model_path = (fs::path(dir) / "tokenizer.model").string();
  if (!fs::exists(model_path)) fail(model_path, "missing (a sentencepiece tokenizer.model is required)");
  const std::string proto = io::read_input_file(model_path, io::InputKind::kTokenizerModel);
  tok.sp_ = std::make_unique<SentencePieceModel>(proto, true, model_path);
  tok.sp_no_prefix_ = std::make_unique<SentencePieceModel>(proto, false, model_path);
  const int64_t sp_size = tok.sp_->piece_size();

  AddedRegistry reg;
  std::map<std::string, std::string> named;  // "bos_token" -> content
  auto read_named = [&](const json& j, const std::string& file) {
    for (const char* key : {"bos_token", "eos_token", "unk_token", "pad_token"})
      if (j.contains(key)) {
        std::string content = token_content(j[key], file + ": " + key);
        if (named.count(key) && !content.empty() && named[key] != content)
          fail(file, std::string(key) + " is '" + content + "' but another file says '" + named[key] + "'");
        if (!content.empty()) named[key] = content;
      }
  };

  const std::string cfg_path = (fs::path(dir) / "tokenizer_config.json").string();
  if (fs::exists(cfg_path)) {
    json cfg = read_json(cfg_path);
    if (!cfg.is_object()) fail(cfg_path, "expected a JSON object");
    auto flag = [&](const char* key, bool fallback) {
      if (!cfg.contains(key) || cfg[key].is_null()) return fallback;
      if (!cfg[key].is_boolean()) fail(cfg_path, std::string(key) + ": expected true or false");
      return cfg[key].get<bool>();
    };
    tok.legacy_ = flag("legacy", true);  // transformers 4.x default when unset
    tok.add_bos_ = flag("add_bos_token", true);
    tok.add_eos_ = flag("add_eos_token", false);
    read_named(cfg, cfg_path);
    if (cfg.contains("added_tokens_decoder")) {
      for (auto& [id_text, entry] : cfg["added_tokens_decoder"].items()) {
        int64_t id = -1;
        const auto [end, ec] = std::from_chars(id_text.data(), id_text.data() + id_text.size(), id);
        if (ec != std::errc() || end != id_text.data() + id_text.size() || id < 0 || id > kMaxTokenId)
          fail(cfg_path, "added_tokens_decoder: key '" + id_text + "' is not a token id (0 to " +
                             std::to_string(kMaxTokenId) + ")");
        const std::string where = cfg_path + ": added_tokens_decoder." + id_text;
        reg.add(token_content(entry, where), id, flag_of(entry, "special", true, where), cfg_path);
      }
    }
  }
  const std::string map_path = (fs::path(dir) / "special_tokens_map.json").string();
  if (fs::exists(map_path)) read_named(read_json(map_path), map_path);
  const std::string added_path = (fs::path(dir) / "added_tokens.json").string();
  if (fs::exists(added_path)) {
    json added = read_json(added_path);
    if (!added.is_object()) fail(added_path, "expected {\"token\": id, ...}");
    for (auto& [content, id] : added.items()) {
      if (!id.is_number_integer()) fail(added_path, "'" + content + "': expected an integer id");
      reg.add(content, io::json_integer(id, added_path + ": '" + content + "'", 0, kMaxTokenId), false, added_path);
    }
  }
  const std::string fast_path = (fs::path(dir) / "tokenizer.json").string();
  if (fs::exists(fast_path)) {
    json fast = read_json(fast_path);
    if (fast.contains("added_tokens")) {
      size_t i = 0;
      for (const json& entry : fast["added_tokens"]) {
        const std::string where = fast_path + ": added_tokens[" + std::to_string(i) + "]";
        if (!entry.is_object() || !entry.contains("id") || !entry.contains("content") || !entry["content"].is_string())
          fail(where, "expected {id, content}");
        reg.add(entry["content"].get<std::string>(), io::json_integer(entry["id"], where + ": id", 0, kMaxTokenId),
                flag_of(entry, "special", false, where), fast_path);
        ++i;
      }
    }
  }

  // Added tokens inside the sentencepiece range must be that very piece (e.g. <unk>=0, <s>=1, </s>=2).
  for (auto& [content, id_file] : reg.ids) {
    auto [id, file] = id_file;
    if (id < 0) fail(file, "token '" + content + "' has negative id " + std::to_string(id));
    if (id < sp_size && tok.sp_->id_to_piece(static_cast<int>(id)) != content)
      fail(file, "token '" + content + "' has id " + std::to_string(id) + ", which is the sentencepiece piece '" +
                     tok.sp_->id_to_piece(static_cast<int>(id)) + "'");
  }
  auto resolve = [&](const std::string& key, const std::string& fallback) -> int64_t {
    std::string content = named.count(key) ? named[key] : fallback;
    if (content.empty()) return -1;
    if (reg.ids.count(content)) return reg.ids[content].first;
    int id = tok.sp_->piece_to_id(content);
    if (tok.sp_->id_to_piece(id) != content)
      fail(dir, key + " '" + content + "' is neither a sentencepiece piece nor an added token");
    reg.add(content, id, true, model_path);
    return id;
  };
  tok.unk_id_ = resolve("unk_token", "<unk>");
  tok.bos_id_ = resolve("bos_token", "<s>");
  tok.eos_id_ = resolve("eos_token", "</s>");
  const int64_t pad = resolve("pad_token", "");
  tok.pad_id_ = pad >= 0 ? pad : tok.unk_id_;  // LLaVA v1: pad_token = unk_token

  for (auto& [content, id_file] : reg.ids) {
    if (content.empty()) fail(id_file.second, "an added token is empty");
    tok.added_.push_back({content, id_file.first, reg.special[content], id_file.second});
  }
  std::stable_sort(tok.added_.begin(), tok.added_.end(),
                   [](const AddedToken& a, const AddedToken& b) { return a.content.size() > b.content.size(); });
  return tok;
}

int64_t Tokenizer::vocab_size() const {
  int64_t n = sp_->piece_size();
  for (const auto& t : added_) n = std::max(n, t.id + 1);
  return n;
}

void Tokenizer::check_ids_fit(int64_t vocab_size, const std::string& vocab_where) const {
  const std::string model_path = (fs::path(dir_) / "tokenizer.model").string();
  const std::string limit = ", outside the model's vocabulary of " + std::to_string(vocab_size) + " ids (" + vocab_where + ")";
  const int64_t pieces = sp_->piece_size();
  if (pieces > vocab_size)
    fail(model_path, "sentencepiece piece '" + io::printable(sp_->id_to_piece(static_cast<int>(vocab_size))) + "' has id " +
                         std::to_string(vocab_size) + " (of " + std::to_string(pieces) + " pieces)" + limit);
  for (const auto& t : added_)
    if (t.id >= vocab_size)
      fail(t.file, "token '" + io::printable(t.content) + "' has id " + std::to_string(t.id) + limit);
  for (int64_t id : {bos_id_, eos_id_, unk_id_, pad_id_})  // each is a piece or an added token: checked above
    if (id >= vocab_size) fail(dir_, "special token id " + std::to_string(id) + limit);
}

int64_t Tokenizer::token_id(const std::string& content) const {
  for (const auto& t : added_)
    if (t.content == content) return t.id;
  return -1;
}

const AddedToken* Tokenizer::added_by_id(int64_t id) const {
  for (const auto& t : added_)
    if (t.id == id) return &t;
  return nullptr;
}

void Tokenizer::encode_segment(const std::string& text, size_t offset, bool dummy_prefix,
                               std::vector<TokenSpan>& out) const {
  if (text.empty()) return;
  const auto& sp = dummy_prefix ? *sp_ : *sp_no_prefix_;
  for (const auto& p : sp.encode(text)) out.push_back({p.id, offset + p.begin, offset + p.end});
}

std::vector<TokenSpan> Tokenizer::encode_with_spans(const std::string& text, bool add_special) const {
  std::vector<TokenSpan> out;
  if (add_special && add_bos_) out.push_back({bos_id_, 0, 0});
  size_t segment_start = 0, pos = 0;
  auto flush = [&](size_t end) {
    const bool first = segment_start == 0;
    encode_segment(text.substr(segment_start, end - segment_start), segment_start, legacy_ || first, out);
  };
  while (pos < text.size()) {
    const AddedToken* match = nullptr;
    for (const auto& t : added_)  // longest first
      if (text.compare(pos, t.content.size(), t.content) == 0) {
        match = &t;
        break;
      }
    if (!match) {
      ++pos;
      continue;
    }
    flush(pos);
    out.push_back({match->id, pos, pos + match->content.size()});
    pos += match->content.size();
    segment_start = pos;
  }
  flush(text.size());
  if (add_special && add_eos_) out.push_back({eos_id_, text.size(), text.size()});
  return out;
}

std::vector<int64_t> Tokenizer::encode(const std::string& text, bool add_special) const {
  std::vector<int64_t> ids;
  for (const auto& t : encode_with_spans(text, add_special)) ids.push_back(t.id);
  return ids;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids, bool skip_special) const {
  std::string out;
  std::vector<int> run;
  bool first_run = true;  // mirrors encode: only the text's first segment carried a dummy prefix
  auto flush = [&] {
    if (run.empty()) return;
    out += ((legacy_ || first_run) ? *sp_ : *sp_no_prefix_).decode(run);
    run.clear();
    first_run = false;
  };
  const int64_t sp_size = sp_->piece_size();
  for (size_t i = 0; i < ids.size(); ++i) {
    const int64_t id = ids[i];
    if (const AddedToken* t = added_by_id(id)) {
      flush();
      if (!(i == 0 && id == bos_id_)) first_run = false;
      if (!(skip_special && t->special)) out += t->content;
      continue;
    }
    if (id < 0 || id >= sp_size) fail(dir_, "decode: id " + std::to_string(id) + " is outside the vocabulary");
    run.push_back(static_cast<int>(id));
  }
  flush();
  return out;
}

}  // namespace llava::data
