// Test helper.
//   llava_model_tool params DIR: per parameter in registration order, "<canonical name> <name in the
//     loaded layout> <shape>", then "layout <name>".
//   llava_model_tool generate DIR BATCH.safetensors N: greedy generation for a (left-padded) batch of
//     input_ids / attention_mask / pixel_values; one line of new ids per sequence.
#include <iostream>

#include "io/error.h"
#include "io/safetensors.h"
#include "model/generate.h"
#include "model/weights.h"

static int generate(const std::string& dir, const std::string& batch_path, int64_t max_new_tokens) {
  auto loaded = llava::model::load_model(dir, torch::kFloat32);
  auto batch = llava::io::SafetensorsFile::open(batch_path);
  llava::model::GenerationOptions options;
  options.max_new_tokens = max_new_tokens;
  options.eos_token_ids = loaded.config.text.eos_token_ids;
  options.pad_token_id = loaded.config.text.pad_token_id.value_or(0);
  auto tokens = llava::model::generate(loaded.model, batch.get("input_ids"), batch.get("attention_mask"),
                                       batch.get("pixel_values"), options);
  for (int64_t b = 0; b < tokens.size(0); ++b) {
    for (int64_t t = 0; t < tokens.size(1); ++t) std::cout << (t ? " " : "") << tokens[b][t].item<int64_t>();
    std::cout << "\n";
  }
  return 0;
}

int main(int argc, char** argv) {
  bool params = argc == 3 && std::string(argv[1]) == "params";
  bool gen = argc == 5 && std::string(argv[1]) == "generate";
  if (!params && !gen) {
    std::cerr << "usage: llava_model_tool params DIR | generate DIR BATCH N\n";
    return 2;
  }
  try {
    if (gen) return generate(argv[2], argv[3], std::stoll(argv[4]));
    auto loaded = llava::model::load_model(argv[2], torch::kFloat32);
    for (const auto& p : loaded.model->named_parameters()) {
      std::cout << p.key() << " " << llava::model::checkpoint_name(p.key(), loaded.layout) << " [";
      for (int64_t i = 0; i < p.value().dim(); ++i) std::cout << (i ? "," : "") << p.value().size(i);
      std::cout << "]\n";
    }
    std::cout << "layout " << llava::model::to_string(loaded.layout.layout) << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
