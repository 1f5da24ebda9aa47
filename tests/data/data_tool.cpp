// llava_data_tool: drives the C++ data pieces for the oracle tests and the loader benchmark.
//   tokenize DIR            stdin: JSON list of strings; stdout: {"ids", "decoded", "decoded_skip_special"}
//   image OUT.safetensors [--pad] [--config preprocessor_config.json] IMG...   -> image<i> [3,H,W]
//   resize OUT.safetensors W H IMG     -> "resized" [H,W,3] uint8 (PIL-bicubic port alone)
//   bench CONFIG.yaml WORKERS BATCHES  -> prints samples/s of the loader
#include <chrono>
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "data/config.h"
#include "io/error.h"
#include "io/safetensors.h"

using namespace llava;

namespace {

int tokenize(const std::string& dir) {
  const auto tok = data::Tokenizer::load(dir);
  const auto texts = nlohmann::json::parse(std::string(std::istreambuf_iterator<char>(std::cin), {}));
  nlohmann::json out = {{"ids", nlohmann::json::array()}, {"decoded", nlohmann::json::array()},
                        {"decoded_skip_special", nlohmann::json::array()},
                        {"bos", tok.bos_id()}, {"eos", tok.eos_id()}, {"pad", tok.pad_id()}, {"unk", tok.unk_id()},
                        {"legacy", tok.legacy()}, {"vocab_size", tok.vocab_size()}};
  for (const auto& text : texts) {
    auto ids = tok.encode(text.get<std::string>());
    out["ids"].push_back(ids);
    out["decoded"].push_back(tok.decode(ids));
    out["decoded_skip_special"].push_back(tok.decode(ids, true));
  }
  std::cout << out.dump() << "\n";
  return 0;
}

int image(int argc, char** argv) {
  data::ClipImageConfig cfg;
  bool pad = false;
  std::vector<std::string> paths;
  for (int i = 3; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--pad") {
      pad = true;
    } else if (a == "--config" && i + 1 < argc) {
      cfg = data::read_clip_image_config(argv[++i]);
    } else {
      paths.push_back(a);
    }
  }
  cfg.pad_to_square = pad;
  io::NamedTensors out;
  for (size_t i = 0; i < paths.size(); ++i)
    out.push_back({"image" + std::to_string(i), data::clip_preprocess(data::load_image(paths[i]), cfg)});
  io::save_safetensors(argv[2], out);
  return 0;
}

int resize(char** argv) {
  auto img = data::resize_bicubic(data::load_image(argv[5]), std::stoi(argv[3]), std::stoi(argv[4]));
  auto t = torch::from_blob(img.rgb.data(), {img.height, img.width, 3}, torch::kUInt8).clone();
  io::save_safetensors(argv[2], {{"resized", t}});
  return 0;
}

int bench(const std::string& config, int workers, int64_t batches) {
  auto cfg = data::load_data_config(config);
  auto dataset = data::make_dataset(cfg, {});
  data::DistributedSampler sampler(data::sampler_config_for(cfg), dataset.modality_lengths(), 0, 1);
  data::DataLoader loader(dataset, sampler, {}, workers);
  const auto start = std::chrono::steady_clock::now();
  int64_t samples = 0;
  for (int64_t b = 0; b < batches; ++b) {
    auto batch = loader.next();
    if (!batch) break;
    samples += batch->input_ids.size(0);
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cout << "workers=" << workers << " samples=" << samples << " seconds=" << s
            << " samples/s=" << samples / s << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string cmd = argc > 1 ? argv[1] : "";
    if (cmd == "tokenize" && argc == 3) return tokenize(argv[2]);
    if (cmd == "image" && argc >= 4) return image(argc, argv);
    if (cmd == "resize" && argc == 6) return resize(argv);
    if (cmd == "bench" && argc == 5) return bench(argv[2], std::stoi(argv[3]), std::stoll(argv[4]));
    std::cerr << "usage: llava_data_tool tokenize DIR | image OUT [--pad] [--config F] IMG... | "
                 "resize OUT W H IMG | bench CONFIG WORKERS BATCHES\n";
    return 2;
  } catch (const Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
