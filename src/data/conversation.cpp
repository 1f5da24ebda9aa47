#include "data/conversation.h"

#include <algorithm>

#include "io/error.h"

namespace llava::data {
namespace {

const std::string kVicunaSystem =
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.";

// Python's str.strip() for the whitespace that occurs in these datasets.
std::string strip(const std::string& s) {
  const char* ws = " \t\n\r\v\f";
  size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

std::vector<std::string> split(const std::string& s, const std::string& sep) {
  std::vector<std::string> parts;
  size_t start = 0, pos;
  while ((pos = s.find(sep, start)) != std::string::npos) {
    parts.push_back(s.substr(start, pos - start));
    start = pos + sep.size();
  }
  parts.push_back(s.substr(start));
  return parts;
}

bool is_human(const std::string& from) { return from == "human" || from == "user"; }
bool is_gpt(const std::string& from) { return from == "gpt" || from == "assistant"; }

// LLaVA's tokenizer_image_token: each "<image>"-separated chunk tokenized on its own (own BOS and dummy
// prefix), BOS kept once, one placeholder per image.
std::vector<int64_t> tokenize_with_placeholders(const std::string& prompt, const Tokenizer& tok) {
  std::vector<int64_t> ids;
  auto chunks = split(prompt, kImageToken);
  for (size_t i = 0; i < chunks.size(); ++i) {
    auto chunk_ids = tok.encode(chunks[i]);
    const bool has_bos = tok.add_bos() && !chunk_ids.empty();
    if (i == 0 && has_bos) ids.push_back(chunk_ids[0]);
    if (i > 0) ids.push_back(kImagePlaceholder);
    ids.insert(ids.end(), chunk_ids.begin() + (has_bos ? 1 : 0), chunk_ids.end());
  }
  return ids;
}

// Vicuna turns after LLaVA's cleanup: leading non-human turns dropped, then strict alternation.
std::vector<Turn> alternating_turns(const std::vector<Turn>& turns) {
  size_t first = 0;
  while (first < turns.size() && !is_human(turns[first].from)) ++first;
  std::vector<Turn> out(turns.begin() + first, turns.end());
  for (size_t j = 0; j < out.size(); ++j) {
    bool ok = (j % 2 == 0) ? is_human(out[j].from) : is_gpt(out[j].from);
    if (!ok)
      throw Error("conversations[" + std::to_string(j + first) + "]: expected a " +
                  (j % 2 == 0 ? "human" : "gpt") + " turn, got '" + out[j].from + "'");
  }
  return out;
}

TokenizedSample plain_sample(const std::vector<Turn>& turns, const Tokenizer& tok) {
  if (turns.size() != 2) throw Error("template plain needs exactly 2 turns, got " + std::to_string(turns.size()));
  if (turns[0].value.find(kImageToken) == std::string::npos)
    throw Error("template plain needs <image> in the first turn");
  // Stage 1 drops the instruction: the prompt is the image alone, only the caption is trained.
  const std::string prompt = kImageToken + turns[1].value + "\n";
  TokenizedSample s;
  s.input_ids = tokenize_with_placeholders(prompt, tok);
  s.labels = s.input_ids;
  const size_t masked = std::min(s.labels.size(), tokenize_with_placeholders(kImageToken, tok).size());
  std::fill(s.labels.begin(), s.labels.begin() + masked, kIgnoreIndex);
  return s;
}

// LLaVA's preprocess_v1 masking: the prompt is cut at "</s>" into rounds, each round's instruction part is
// masked using the lengths of the separately tokenized pieces.
TokenizedSample vicuna_sample(const std::vector<Turn>& turns, bool has_image, const Tokenizer& tok,
                              int64_t max_len) {
  const std::string prompt = render_prompt(Template::vicuna_v1, turns);
  auto tokenize = [&](const std::string& text) {
    return has_image ? tokenize_with_placeholders(text, tok) : tok.encode(text);
  };
  TokenizedSample s;
  s.input_ids = tokenize(prompt);
  if (!has_image && static_cast<int64_t>(s.input_ids.size()) > max_len) s.input_ids.resize(max_len);
  s.labels = s.input_ids;
  const int64_t total_len = std::count_if(s.input_ids.begin(), s.input_ids.end(),
                                          [&](int64_t id) { return id != tok.pad_id(); });
  auto mask = [&](int64_t from, int64_t to) {
    for (int64_t i = std::max<int64_t>(from, 0); i < std::min<int64_t>(to, s.labels.size()); ++i)
      s.labels[i] = kIgnoreIndex;
  };
  int64_t cur = 1;
  mask(0, 1);  // BOS
  auto rounds = split(prompt, "</s>");
  for (size_t i = 0; i < rounds.size(); ++i) {
    if (rounds[i].empty()) break;
    auto parts = split(rounds[i], " ASSISTANT: ");
    if (parts.size() != 2) break;
    parts[0] += " ASSISTANT: ";
    int64_t round_len = tokenize(rounds[i]).size();     // its BOS stands in for the round's "</s>"
    int64_t instr_len = tokenize(parts[0]).size() - 2;  // minus BOS and the trailing "▁" of "ASSISTANT: "
    if (i != 0 && !tok.legacy()) {  // non-legacy: no "▁" after "</s>" in context, one token less
      --round_len;
      --instr_len;
    }
    mask(cur, cur + instr_len);
    cur += round_len;
  }
  mask(cur, s.labels.size());
  if (cur < max_len && cur != total_len) {  // LLaVA: "tokenization mismatch"
    mask(0, s.labels.size());
    s.mismatch = TokenizationMismatch{cur, total_len};
  }
  return s;
}

// llava-hf: "USER: <image>\nQ ASSISTANT: A USER: ..."; the answer text of every assistant turn is trained
// (tokens overlapping its bytes), everything else masked. No system prompt, no "</s>".
TokenizedSample llava_hf_sample(const std::vector<Turn>& turns, const Tokenizer& tok) {
  std::string prompt;
  std::vector<std::pair<size_t, size_t>> answers;  // byte ranges of assistant text
  for (const auto& t : alternating_turns(turns)) {
    prompt += is_human(t.from) ? "USER: " : "ASSISTANT: ";
    if (is_gpt(t.from)) answers.push_back({prompt.size(), prompt.size() + t.value.size()});
    prompt += t.value + " ";
  }
  TokenizedSample s;
  for (const auto& span : tok.encode_with_spans(prompt)) {
    bool trained = false;
    for (auto [b, e] : answers) trained = trained || (span.begin < e && span.end > b);
    s.input_ids.push_back(span.id);
    s.labels.push_back(trained ? span.id : kIgnoreIndex);
  }
  return s;
}

// Replaces each image id by `image.count` copies (labels -100 there).
void expand_images(TokenizedSample& s, int64_t found_id, const ImageTokens& image) {
  if (found_id == image.id && image.count == 1) return;
  TokenizedSample out;
  for (size_t i = 0; i < s.input_ids.size(); ++i) {
    if (s.input_ids[i] == found_id) {
      out.input_ids.insert(out.input_ids.end(), image.count, image.id);
      out.labels.insert(out.labels.end(), image.count, kIgnoreIndex);
    } else {
      out.input_ids.push_back(s.input_ids[i]);
      out.labels.push_back(s.labels[i]);
    }
  }
  out.mismatch = s.mismatch;
  s = std::move(out);
}

}  // namespace

Template parse_template(const std::string& name) {
  if (name == "plain") return Template::plain;
  if (name == "v1" || name == "vicuna_v1") return Template::vicuna_v1;
  if (name == "llava_hf" || name == "llava-hf") return Template::llava_hf;
  throw Error("unknown conversation template '" + name + "' (expected plain, v1/vicuna_v1 or llava_hf)");
}

std::string template_name(Template t) {
  switch (t) {
    case Template::plain: return "plain";
    case Template::vicuna_v1: return "vicuna_v1";
    case Template::llava_hf: return "llava_hf";
  }
  return "?";
}

std::vector<Turn> move_image_to_front(std::vector<Turn> turns) {
  for (auto& t : turns) {
    if (t.value.find(kImageToken) == std::string::npos) continue;
    std::string text;
    for (const auto& piece : split(t.value, kImageToken)) text += piece;
    t.value = strip(kImageToken + "\n" + strip(text));
  }
  return turns;
}

std::string render_prompt(Template t, const std::vector<Turn>& turns) {
  std::string prompt;
  if (t == Template::plain) return kImageToken + (turns.size() > 1 ? turns[1].value : "") + "\n";
  if (t == Template::llava_hf) {
    for (const auto& turn : alternating_turns(turns))
      prompt += (is_human(turn.from) ? "USER: " : "ASSISTANT: ") + turn.value + " ";
    return prompt;
  }
  prompt = kVicunaSystem + " ";
  for (const auto& turn : alternating_turns(turns))
    prompt += is_human(turn.from) ? "USER: " + turn.value + " " : "ASSISTANT: " + turn.value + "</s>";
  return prompt;
}

TokenizedSample tokenize_conversation(Template t, const std::vector<Turn>& raw_turns, bool has_image,
                                      const Tokenizer& tok, const ImageTokens& image, int64_t max_len) {
  const auto turns = has_image ? move_image_to_front(raw_turns) : raw_turns;
  TokenizedSample s;
  int64_t found_id = kImagePlaceholder;
  switch (t) {
    case Template::plain: s = plain_sample(turns, tok); break;
    case Template::vicuna_v1: s = vicuna_sample(turns, has_image, tok, max_len); break;
    case Template::llava_hf:
      found_id = tok.token_id(kImageToken);
      if (has_image && found_id < 0) throw Error(tok.dir() + ": template llava_hf needs <image> as an added token");
      s = llava_hf_sample(turns, tok);
      break;
  }
  // One image per record: one <image> (LLaVA moves each turn's to its front, so only turns count).
  const auto images = std::count_if(s.input_ids.begin(), s.input_ids.end(),
                                    [&](int64_t id) { return id == found_id || id == image.id; });
  if (has_image && images == 0) throw Error("the record has an image but no <image> in its conversation");
  if (images > (has_image ? 1 : 0))
    throw Error(std::to_string(images) + " <image> tokens in the conversation but " + (has_image ? "one image" : "no image"));
  if (has_image) {
    expand_images(s, found_id, image);
    // Truncation must not cut the image: its tokens would no longer match its features (HF's model refuses
    // that batch; LLaVA would silently drop the image). Said here, naming the record, not mid-run in the model.
    const auto last = std::find(s.input_ids.rbegin(), s.input_ids.rend(), image.id);
    const int64_t end = static_cast<int64_t>(s.input_ids.rend() - last);  // one past the last image token
    if (end > max_len)
      throw Error("its image tokens end at position " + std::to_string(end) + ", past model_max_length " +
                  std::to_string(max_len) + ": truncation would cut the image off (raise model_max_length, or put "
                  "<image> in an earlier turn)");
  }
  if (static_cast<int64_t>(s.input_ids.size()) > max_len) {
    s.input_ids.resize(max_len);
    s.labels.resize(max_len);
  }
  return s;
}

std::vector<int64_t> generation_prompt_ids(Template t, const std::string& user_text, bool has_image,
                                           const Tokenizer& tok, const ImageTokens& image) {
  // As LLaVA's run_llava: a prompt that says where the image goes keeps it there; otherwise it leads.
  const bool placed = user_text.find(kImageToken) != std::string::npos;
  const std::string text = has_image && !placed ? kImageToken + "\n" + user_text : user_text;
  TokenizedSample s;
  int64_t found_id = kImagePlaceholder;
  switch (t) {
    case Template::plain:  // a stage-1 model continues the image with its caption
      s.input_ids = tokenize_with_placeholders(has_image ? kImageToken : user_text, tok);
      break;
    case Template::vicuna_v1:  // conv_vicuna_v1.get_prompt() with the assistant's message None
      s.input_ids = tokenize_with_placeholders(kVicunaSystem + " USER: " + text + " ASSISTANT:", tok);
      break;
    case Template::llava_hf:  // the chat template with add_generation_prompt
      found_id = tok.token_id(kImageToken);
      if (has_image && found_id < 0) throw Error(tok.dir() + ": template llava_hf needs <image> as an added token");
      s.input_ids = tok.encode("USER: " + text + " ASSISTANT:");
      break;
  }
  s.labels = s.input_ids;
  if (has_image) expand_images(s, found_id, image);
  return s.input_ids;
}

}  // namespace llava::data
