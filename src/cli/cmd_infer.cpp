// `llava infer`: generate a reply with a KV cache, streaming it to stdout as it is produced.
// The prompt comes as text + image (--prompt, --image: tokenized and preprocessed like training data) or
// as ids + pixels (--input-ids, --pixels: what tests and tools use).
#include <cxxopts.hpp>
#include <filesystem>
#include <iostream>
#include <optional>
#include <sstream>

#include "cli/command.h"
#include "io/command_line.h"
#include "data/conversation.h"
#include "data/image.h"
#include "data/tokenizer.h"
#include "io/error.h"
#include "io/safetensors.h"
#include "model/generate.h"
#include "model/weights.h"
#include "checkpoint/pretrained_parts.h"
#include "train/lora.h"
#include "train/trainer.h"

namespace {

struct Prompt {
  torch::Tensor input_ids;     // [1,T] int64
  torch::Tensor pixel_values;  // [N,3,H,W] or undefined
};

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    try {
      size_t used = 0;
      ids.push_back(std::stoll(item, &used));
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      llava::fail("--input-ids", "'" + item + "' is not an integer (expected e.g. 1,2,3)");
    }
  }
  if (ids.empty()) llava::fail("--input-ids", "no ids given");
  return ids;
}

Prompt prompt_from_ids(const cxxopts::ParseResult& args) {
  if (!args.count("input-ids")) llava::fail("infer", "give --prompt (and --image), or --input-ids (and --pixels)");
  Prompt prompt;
  prompt.input_ids = torch::tensor(parse_ids(args["input-ids"].as<std::string>())).unsqueeze(0);
  if (args.count("pixels")) {
    const std::string path = args["pixels"].as<std::string>();
    auto file = llava::io::SafetensorsFile::open(path);
    if (!file.contains("pixel_values")) llava::fail(path, "no pixel_values tensor");
    prompt.pixel_values = file.get("pixel_values");
  }
  return prompt;
}

// The template a model was trained with: llava-hf's chat format for HF checkpoints, vicuna_v1 for the
// original LLaVA-1.5 ones (what its eval scripts use), unless --template says otherwise.
llava::data::Template template_for(const cxxopts::ParseResult& args, const llava::model::LlavaConfig& config) {
  if (args.count("template")) return llava::data::parse_template(args["template"].as<std::string>());
  return config.dialect == llava::model::ConfigDialect::kHfLlava ? llava::data::Template::llava_hf
                                                                 : llava::data::Template::vicuna_v1;
}

llava::data::ClipImageConfig image_config_for(const std::string& model_dir, const llava::model::LlavaConfig& config) {
  const auto file = std::filesystem::path(model_dir) / "preprocessor_config.json";
  llava::data::ClipImageConfig image;
  if (std::filesystem::exists(file)) {
    image = llava::data::read_clip_image_config(file.string());
  } else {  // CLIP preprocessing at the tower's resolution
    image.shortest_edge = image.crop_height = image.crop_width = static_cast<int>(config.vision.image_size);
  }
  image.pad_to_square = config.image_aspect_ratio == "pad";
  return image;
}

Prompt prompt_from_text(const cxxopts::ParseResult& args, const std::string& model_dir,
                        const llava::model::LlavaConfig& config, const llava::data::Tokenizer& tokenizer) {
  Prompt prompt;
  const bool has_image = args.count("image") > 0;
  auto ids = llava::data::generation_prompt_ids(template_for(args, config), args["prompt"].as<std::string>(),
                                                has_image, tokenizer, llava::train::image_tokens_for(config));
  prompt.input_ids = torch::tensor(ids).unsqueeze(0);
  if (has_image) {
    prompt.pixel_values =
        llava::data::load_clip_pixels(args["image"].as<std::string>(), image_config_for(model_dir, config)).unsqueeze(0);
  }
  return prompt;
}

int run_infer(int argc, char** argv) {
  cxxopts::Options options(argv[0], "Generate token ids for a prompt (greedy unless --temperature > 0)");
  options.add_options()
      ("model", "model dir", cxxopts::value<std::string>())
      ("adapter", "PEFT LoRA adapter dir (adapter_config.json + adapter_model.safetensors)", cxxopts::value<std::string>())
      ("projector", "projector weights: LLaVA's mm_projector.bin / non_lora_trainables.bin", cxxopts::value<std::string>())
      ("image", "image file", cxxopts::value<std::string>())
      ("prompt", "prompt text", cxxopts::value<std::string>())
      ("input-ids", "prompt token ids, comma-separated", cxxopts::value<std::string>())
      ("pixels", "safetensors with pixel_values [N,3,H,W]", cxxopts::value<std::string>())
      ("max-new-tokens", "at most this many new tokens", cxxopts::value<int64_t>()->default_value("128"))
      ("temperature", "sampling temperature (0: greedy)", cxxopts::value<double>()->default_value("0"))
      ("top-p", "nucleus sampling threshold", cxxopts::value<double>()->default_value("1"))
      ("seed", "sampling seed", cxxopts::value<uint64_t>()->default_value("0"))
      ("dtype", "fp32 or bf16", cxxopts::value<std::string>()->default_value("fp32"))
      ("vision-tower", "CLIP dir for an original-LLaVA model", cxxopts::value<std::string>()->default_value(""))
      ("template", "conversation template for --prompt: llava_hf, vicuna_v1 or plain", cxxopts::value<std::string>())
      ("ids", "print token ids instead of text (always so with --input-ids)")
      ("h,help", "show help");
  auto args = llava::io::parse_command_line(options, argc, argv, argv[0]);
  if (args.count("help")) {
    std::cout << options.help();
    return 0;
  }
  if (!args.count("model")) llava::fail("infer", "--model is required");
  if (args.count("image") && !args.count("prompt")) llava::fail("--image", "needs --prompt");
  const std::string model_dir = args["model"].as<std::string>();
  auto loaded = llava::model::load_model(model_dir, llava::model::parse_dtype(args["dtype"].as<std::string>()),
                                         args["vision-tower"].as<std::string>());
  if (args.count("projector")) llava::checkpoint::load_projector_weights(loaded.model, args["projector"].as<std::string>());
  if (args.count("adapter")) llava::train::load_lora_adapter(loaded.model, args["adapter"].as<std::string>());
  std::optional<llava::data::Tokenizer> tokenizer;
  Prompt prompt;
  if (args.count("prompt")) {
    tokenizer = llava::data::Tokenizer::load(model_dir);
    tokenizer->check_ids_fit(loaded.config.text.vocab_size, llava::model::config_json_path(model_dir));
    prompt = prompt_from_text(args, model_dir, loaded.config, *tokenizer);
  } else {
    prompt = prompt_from_ids(args);
    for (int64_t id : std::vector<int64_t>(prompt.input_ids.data_ptr<int64_t>(), prompt.input_ids.data_ptr<int64_t>() + prompt.input_ids.numel()))
      if (id != loaded.config.image_token_index && (id < 0 || id >= loaded.config.text.vocab_size))
        llava::fail("--input-ids", "id " + std::to_string(id) + " is outside the vocabulary [0, " +
                                       std::to_string(loaded.config.text.vocab_size) + ")");
  }
  const bool print_text = tokenizer && !args.count("ids");

  llava::model::GenerationOptions gen;
  gen.max_new_tokens = llava::io::option_in_range<int64_t>(args, "max-new-tokens", 1, 1 << 20, argv[0]);
  gen.temperature = llava::io::option_in_range<double>(args, "temperature", 0, 100, argv[0]);
  // Below 1e-4 the logits / temperature overflow to inf: sampling would see NaN probabilities. 0 is greedy.
  if (gen.temperature > 0 && gen.temperature < 1e-4)
    llava::fail("--temperature", "expected 0 (greedy) or from 1e-4 to 100, got " + c10::str(gen.temperature));
  gen.top_p = llava::io::option_in_range<double>(args, "top-p", 0, 1, argv[0]);
  gen.seed = args["seed"].as<uint64_t>();
  gen.eos_token_ids = loaded.config.text.eos_token_ids;
  gen.pad_token_id = loaded.config.text.pad_token_id.value_or(gen.eos_token_ids.empty() ? 0 : gen.eos_token_ids[0]);
  // Refused before the prefill, whose attention grows with the square of the prompt length.
  gen.max_new_tokens = llava::model::new_tokens_within_context(prompt.input_ids.size(1), gen.max_new_tokens,
                                                               loaded.config.text.max_position_embeddings,
                                                               args.count("prompt") ? "--prompt" : "--input-ids");

  // Text is decoded from all ids so far, so pieces that only make sense together (bytes of one
  // character, a leading space) come out right; a trailing U+FFFD may be an unfinished character, so it
  // waits for the next token or the end.
  std::vector<int64_t> generated;
  std::string printed;
  auto print_text_up_to = [&](std::string text, bool final) {
    static const std::string kReplacement = "\xEF\xBF\xBD";
    while (!final && text.size() >= 3 && text.compare(text.size() - 3, 3, kReplacement) == 0) text.resize(text.size() - 3);
    if (text.size() > printed.size() && text.compare(0, printed.size(), printed) == 0) {
      std::cout << text.substr(printed.size()) << std::flush;
      printed = text;
    }
  };
  llava::model::generate(loaded.model, prompt.input_ids, {}, prompt.pixel_values, gen, [&](const torch::Tensor& t) {
    generated.push_back(t[0].item<int64_t>());
    if (print_text) print_text_up_to(tokenizer->decode(generated, /*skip_special=*/true), false);
    else std::cout << (generated.size() == 1 ? "" : " ") << generated.back() << std::flush;
  });
  if (print_text) print_text_up_to(tokenizer->decode(generated, /*skip_special=*/true), true);
  std::cout << "\n";
  return 0;
}

}  // namespace

LLAVA_COMMAND("infer", "generate token ids from a prompt and an image (KV cache, greedy or sampled)", run_infer);
