// `llava make-demo --out DIR [--seed S]`: everything the demo trains on, made from nothing: a synthetic
// shapes data set (PNGs drawn here, LLaVA JSON), a sentencepiece tokenizer trained on its text, and a tiny
// llava-hf LLaVA with random weights that our loader and transformers both read.
//   DIR/model/  config.json, model.safetensors, tokenizer.model, tokenizer_config.json,
//               special_tokens_map.json, preprocessor_config.json
//   DIR/data/   images/*.png, captions.json (stage 1), questions.json (stage 2),
//               test.json + test.tsv (held-out images: image, kind, question, answer)
// torch's generator, seeded once, draws the images, the texts and the weights: same seed, same files.
#include <cxxopts.hpp>
#include <cmath>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "cli/command.h"
#include "io/command_line.h"
#include "data/conversation.h"
#include "data/sentencepiece_model.h"
#include "data/shapes.h"
#include "io/error.h"
#include "io/file_util.h"
#include "model/config.h"
#include "model/llava.h"
#include "checkpoint/pretrained_parts.h"
#include "train/lora.h"

namespace {

namespace fs = std::filesystem;
namespace shapes = llava::data::shapes;
using json = nlohmann::json;

struct DemoSizes {
  int image_size = 32, patch_size = 8;  // 16 image tokens
  int vision_hidden = 64, vision_layers = 2, vision_heads = 4;
  int text_hidden = 64, text_intermediate = 172, text_layers = 2, text_heads = 4;
  int vocab_pieces = 480;  // sentencepiece: 3 specials + 256 byte pieces + characters and merges
};

void write_json(const fs::path& path, const json& value) { llava::io::write_file_atomic(path.string(), value.dump(1) + "\n"); }

// ---- data ----

struct Split {
  json captions = json::array(), questions = json::array();  // LLaVA records
  std::string tsv;                 // image \t kind \t question \t answer, a line per question
  std::vector<std::string> texts;  // every caption and stage-2 prompt: the tokenizer's training text
};

// Draws `n` scenes as images/<name>_NNNN.png with a caption and three questions each.
Split make_split(const fs::path& data_dir, const std::string& name, int n, int image_size) {
  Split split;
  for (int i = 0; i < n; ++i) {
    std::ostringstream id;
    id << name << "_" << std::setw(4) << std::setfill('0') << i;
    const std::string image = "images/" + id.str() + ".png";
    const auto scene = shapes::random_scene(image_size);
    shapes::write_png((data_dir / image).string(), shapes::draw(scene, image_size));
    const auto caption = shapes::random_caption(scene);
    split.captions.push_back(shapes::caption_record(id.str(), image, caption));
    split.texts.push_back(caption);
    for (const auto& q : shapes::random_questions(scene)) {
      split.questions.push_back(shapes::question_record(id.str() + "_" + q.kind, image, q));
      split.tsv += image + "\t" + q.kind + "\t" + q.text + "\t" + q.answer + "\n";
      // The stage-2 prompt as vicuna_v1 renders it, without the "</s>" sentencepiece never sees as text.
      const std::string prompt =
          llava::data::render_prompt(llava::data::Template::vicuna_v1, {{"human", q.text}, {"gpt", q.answer}});
      split.texts.push_back(prompt.substr(0, prompt.rfind("</s>")));
    }
  }
  return split;
}

// Writes data/ and returns the tokenizer's training text.
std::vector<std::string> make_data(const fs::path& dir, int train_images, int test_images, const DemoSizes& sizes) {
  const fs::path data_dir = dir / "data";
  fs::create_directories(data_dir / "images");
  auto train = make_split(data_dir, "train", train_images, sizes.image_size);
  const auto test = make_split(data_dir, "test", test_images, sizes.image_size);
  write_json(data_dir / "captions.json", train.captions);
  write_json(data_dir / "questions.json", train.questions);
  write_json(data_dir / "test.json", test.questions);
  llava::io::write_file_atomic((data_dir / "test.tsv").string(), test.tsv);
  train.texts.insert(train.texts.end(), test.texts.begin(), test.texts.end());
  return train.texts;
}

// ---- tokenizer ----

// A Llama-style BPE model (byte fallback, digits split, identity normalization, <unk>=0 <s>=1 </s>=2) plus
// llava-hf's added tokens <image> and <pad> after the sentencepiece pieces. Returns the vocabulary size.
int64_t make_tokenizer(const fs::path& model_dir, const std::vector<std::string>& corpus, const DemoSizes& sizes) {
  const std::string proto = llava::data::train_sentencepiece(
      corpus,
      {{"model_type", "bpe"}, {"vocab_size", std::to_string(sizes.vocab_pieces)}, {"byte_fallback", "true"},
       {"split_digits", "true"}, {"normalization_rule_name", "identity"}, {"remove_extra_whitespaces", "false"},
       {"allow_whitespace_only_pieces", "true"}, {"character_coverage", "1.0"}, {"hard_vocab_limit", "false"},
       {"unk_id", "0"}, {"bos_id", "1"}, {"eos_id", "2"}, {"pad_id", "-1"}, {"num_threads", "1"},
       {"minloglevel", "2"}},
      "make-demo: tokenizer");
  llava::io::write_file_atomic((model_dir / "tokenizer.model").string(), proto);
  const int64_t pieces = llava::data::SentencePieceModel(proto, true, "tokenizer.model").piece_size();
  auto token = [](const std::string& content) {
    return json{{"content", content}, {"lstrip", false}, {"rstrip", false}, {"normalized", false},
                {"single_word", false}, {"special", true}};
  };
  json added = {{"0", token("<unk>")}, {"1", token("<s>")}, {"2", token("</s>")},
                {std::to_string(pieces), token("<image>")}, {std::to_string(pieces + 1), token("<pad>")}};
  const json special = {{"bos_token", "<s>"}, {"eos_token", "</s>"}, {"unk_token", "<unk>"}, {"pad_token", "<pad>"}};
  json config = special;
  config.update({{"tokenizer_class", "LlamaTokenizer"}, {"legacy", false}, {"add_bos_token", true},
                 {"add_eos_token", false}, {"model_max_length", 256}, {"padding_side", "right"},
                 {"added_tokens_decoder", added}});
  write_json(model_dir / "tokenizer_config.json", config);
  write_json(model_dir / "special_tokens_map.json", special);
  return pieces + 2;
}

// ---- model ----

json model_config(const DemoSizes& s, int64_t vocab) {
  const int64_t image_token = vocab - 2, pad_token = vocab - 1;  // see make_tokenizer
  return {{"architectures", {"LlavaForConditionalGeneration"}},
          {"model_type", "llava"},
          {"image_token_index", image_token},
          {"image_seq_length", (s.image_size / s.patch_size) * (s.image_size / s.patch_size)},
          {"vision_feature_layer", -2},
          {"vision_feature_select_strategy", "default"},
          {"projector_hidden_act", "gelu"},
          {"multimodal_projector_bias", true},
          {"tie_word_embeddings", false},
          {"pad_token_id", pad_token},
          {"dtype", "float32"},
          {"text_config",
           {{"model_type", "llama"}, {"vocab_size", vocab}, {"hidden_size", s.text_hidden},
            {"intermediate_size", s.text_intermediate}, {"num_hidden_layers", s.text_layers},
            {"num_attention_heads", s.text_heads}, {"num_key_value_heads", s.text_heads},
            {"head_dim", s.text_hidden / s.text_heads}, {"hidden_act", "silu"}, {"rms_norm_eps", 1e-5},
            {"max_position_embeddings", 256}, {"rope_theta", 10000.0},
            {"rope_parameters", {{"rope_type", "default"}, {"rope_theta", 10000.0}}}, {"attention_bias", false},
            {"mlp_bias", false}, {"tie_word_embeddings", false}, {"pad_token_id", pad_token}, {"bos_token_id", 1},
            {"eos_token_id", 2}}},
          {"vision_config",
           {{"model_type", "clip_vision_model"}, {"hidden_size", s.vision_hidden},
            {"intermediate_size", 4 * s.vision_hidden}, {"num_hidden_layers", s.vision_layers},
            {"num_attention_heads", s.vision_heads}, {"image_size", s.image_size}, {"patch_size", s.patch_size},
            {"projection_dim", s.vision_hidden}, {"hidden_act", "quick_gelu"}, {"layer_norm_eps", 1e-5}}}};
}

// CLIP's preprocessing at the demo's resolution (the images are drawn at that size, so resizing is a no-op).
json preprocessor_config(const DemoSizes& s) {
  return {{"image_processor_type", "CLIPImageProcessor"}, {"do_resize", true},
          {"size", {{"shortest_edge", s.image_size}}}, {"resample", 3}, {"do_center_crop", true},
          {"crop_size", {{"height", s.image_size}, {"width", s.image_size}}}, {"do_rescale", true},
          {"rescale_factor", 1.0 / 255}, {"do_normalize", true},
          {"image_mean", {0.48145466, 0.4578275, 0.40821073}}, {"image_std", {0.26862954, 0.26130258, 0.27577711}},
          {"do_convert_rgb", true}};
}

// O(1) activations everywhere: weights N(0, 1/fan_in), token embeddings N(0, 1), norms 1, biases 0.
// lm_head rows are longer (norm ~4): LoRA never trains lm_head or the final norm, and a 64-wide hidden state
// of RMS 1 against rows of norm 1 caps an answer's logit margin near 5 nats, which kept stage 2 from learning
// colors and shapes at all (HF's 0.02 init is worse still).
void init_weights(llava::model::LlavaForConditionalGeneration& model) {
  torch::NoGradGuard no_grad;
  auto ends_with = [](const std::string& s, const std::string& tail) {
    return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
  };
  for (auto& p : model->named_parameters()) {
    const std::string& name = p.key();
    auto& t = p.value();
    if (ends_with(name, ".bias")) t.zero_();
    else if (name.find("norm") != std::string::npos) t.fill_(1.0);  // LayerNorm / RMSNorm (and pre_layrnorm)
    else if (name.find("embed_tokens") != std::string::npos) t.normal_(0, 1);
    else if (name.find("position_embedding") != std::string::npos || ends_with(name, "class_embedding"))
      t.normal_(0, 0.1);  // small next to the patch contents, so a patch's features say mostly what it shows
    else if (name == "lm_head.weight") t.normal_(0, 4 / std::sqrt(static_cast<double>(t.size(1))));
    else t.normal_(0, 1 / std::sqrt(static_cast<double>(t.numel() / t.size(0))));
  }
}

void make_model(const fs::path& model_dir, int64_t vocab, const DemoSizes& sizes) {
  write_json(model_dir / "config.json", model_config(sizes, vocab));
  write_json(model_dir / "preprocessor_config.json", preprocessor_config(sizes));
  const auto config = llava::model::load_config(model_dir.string());
  llava::model::LlavaForConditionalGeneration model(config, torch::TensorOptions().dtype(torch::kFloat32));
  init_weights(model);
  llava::model::WeightLayout layout;  // transformers >= 4.52 names, as save_pretrained writes them
  layout.vision_model_level = false;
  llava::checkpoint::save_full_model(model_dir.string(), model, layout, /*max_shard_bytes=*/UINT64_MAX);
}

int run_make_demo(int argc, char** argv) {
  cxxopts::Options options(argv[0], "Make the demo's data set, tokenizer and random tiny LLaVA");
  options.add_options()
      ("out", "output dir", cxxopts::value<std::string>())
      ("seed", "seed of torch's generator (images, texts, weights)", cxxopts::value<uint64_t>()->default_value("0"))
      ("train-images", "training images", cxxopts::value<int>()->default_value("400"))
      ("test-images", "held-out images", cxxopts::value<int>()->default_value("20"))
      ("h,help", "show help");
  auto args = llava::io::parse_command_line(options, argc, argv, argv[0]);
  if (args.count("help")) {
    std::cout << options.help();
    return 0;
  }
  if (!args.count("out")) llava::fail("make-demo", "--out is required");
  const fs::path out = args["out"].as<std::string>();
  llava::io::check_output_dir(out.string(), "make-demo --out");
  const int train_images = llava::io::option_in_range(args, "train-images", 1, 100000, argv[0]);
  const int test_images = llava::io::option_in_range(args, "test-images", 0, 100000, argv[0]);
  const DemoSizes sizes;
  torch::manual_seed(args["seed"].as<uint64_t>());
  const auto texts = make_data(out, train_images, test_images, sizes);
  fs::create_directories(out / "model");
  const int64_t vocab = make_tokenizer(out / "model", texts, sizes);
  make_model(out / "model", vocab, sizes);
  std::cout << "wrote " << train_images << " training and " << test_images << " held-out images to "
            << (out / "data").string() << ", a " << vocab << "-token tokenizer and a random tiny LLaVA to "
            << (out / "model").string() << "\n";
  return 0;
}

}  // namespace

LLAVA_COMMAND("make-demo", "make the demo's synthetic shapes data, tokenizer and random tiny LLaVA", run_make_demo);
