// Conversation templates and label masking, as LLaVA's preprocess_plain / preprocess_v1 and the
// llava-hf chat template produce them. Labels are -100 everywhere but the assistant answers.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace llava::data {

constexpr int64_t kIgnoreIndex = -100;
constexpr int64_t kImagePlaceholder = -200;  // original LLaVA: one id per image, replaced by features
inline const std::string kImageToken = "<image>";

enum class Template { plain, vicuna_v1, llava_hf };
Template parse_template(const std::string& name);  // "plain", "v1"/"vicuna_v1", "llava_hf"
std::string template_name(Template t);

struct Turn {
  std::string from;  // "human" | "gpt" (also "user"/"assistant")
  std::string value;
};

// How an image shows up in input_ids: `count` copies of `id`. {-200, 1} is original LLaVA's placeholder;
// {image_token_index, 576} is llava-hf's expanded form.
struct ImageTokens {
  int64_t id = kImagePlaceholder;
  int64_t count = 1;
};

// LLaVA's "tokenization mismatch" (preprocess_v1): the rounds, tokenized one by one, do not add up to the
// tokenized conversation, so LLaVA masks the whole sample (it trains nothing) and prints a warning.
struct TokenizationMismatch {
  int64_t rounds_length = 0;  // tokens the template's rounds account for (LLaVA's cur_len)
  int64_t total_length = 0;   // tokens of the conversation (LLaVA's total_len)
};

struct TokenizedSample {
  std::vector<int64_t> input_ids, labels;  // [T], truncated to model_max_length
  std::optional<TokenizationMismatch> mismatch;  // set when the rule masked every label
};

// LLaVA's preprocess_multimodal: move every <image> to the start of its turn as "<image>\n" + text.
std::vector<Turn> move_image_to_front(std::vector<Turn> turns);

// The rendered prompt of a conversation (after move_image_to_front when has_image).
std::string render_prompt(Template t, const std::vector<Turn>& turns);

// Tokenizes and masks one conversation. Errors (wrong turn count/roles for the template) say what the
// template expected; the caller prefixes the record. A sample whose tokenization does not line up with
// its rounds is fully masked, as LLaVA does ("tokenization mismatch"), and says so in `mismatch`; the
// caller reports it (the dataset's scan, the loader's batches).
TokenizedSample tokenize_conversation(Template t, const std::vector<Turn>& turns, bool has_image,
                                      const Tokenizer& tok, const ImageTokens& image, int64_t model_max_length);

// The ids a chat model continues from: one user turn (with "<image>\n" in front when has_image, unless the
// text places <image> itself, as LLaVA's run_llava) and the
// assistant's cue, tokenized as in training ("SYS USER: <image>\nQ ASSISTANT:" for vicuna_v1,
// "USER: <image>\nQ ASSISTANT:" for llava_hf, the image alone for plain), images expanded like `image`.
std::vector<int64_t> generation_prompt_ids(Template t, const std::string& user_text, bool has_image,
                                           const Tokenizer& tok, const ImageTokens& image);

}  // namespace llava::data
