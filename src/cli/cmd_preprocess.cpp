// `llava preprocess CONFIG.yaml --out OUT.safetensors [--limit N]`: the first N batches exactly as the
// trainer sees them. Entries per batch i: batch<i>.input_ids [B,T], batch<i>.labels [B,T],
// batch<i>.attention_mask [B,T], batch<i>.pixel_values [I,3,H,W] (one per sample with an image),
// batch<i>.indices [B] (dataset indices, in the order of all data files concatenated).
// Samples LLaVA's tokenization-mismatch rule masks whole are named on stdout ("warning: ..."), counted in
// a last line, and a data set mostly made of them is an error before OUT is written (data/masked_samples.h).
#include <cxxopts.hpp>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli/command.h"
#include "data/config.h"
#include "data/masked_samples.h"
#include "io/error.h"
#include "io/file_util.h"
#include "io/safetensors.h"

namespace {

namespace fs = std::filesystem;

// The model decides how <image> appears in input_ids: llava-hf configs (image_token_index) get that id
// repeated once per vision feature; original LLaVA checkpoints (or no config.json) get one -200.
llava::data::ImageTokens image_tokens_from_model(const std::string& model_dir) {
  const fs::path path = fs::path(model_dir) / "config.json";
  llava::data::ImageTokens tokens;
  if (model_dir.empty() || !fs::exists(path)) return tokens;
  nlohmann::json cfg;
  try {
    cfg = nlohmann::json::parse(llava::io::read_file(path.string()));
  } catch (const nlohmann::json::exception& e) {
    llava::fail(path.string(), std::string("invalid JSON: ") + e.what());
  }
  const char* id_key = cfg.contains("image_token_index") ? "image_token_index" : "image_token_id";
  if (!cfg.contains(id_key)) return tokens;
  tokens.id = cfg[id_key].get<int64_t>();
  if (cfg.contains("image_seq_length")) {
    tokens.count = cfg["image_seq_length"].get<int64_t>();
  } else {
    const auto vision = cfg.value("vision_config", nlohmann::json::object());
    const int64_t side = vision.value("image_size", 224) / vision.value("patch_size", 32);  // CLIP defaults
    tokens.count = side * side + (cfg.value("vision_feature_select_strategy", "default") == "full" ? 1 : 0);
  }
  return tokens;
}

int run_preprocess(int argc, char** argv) {
  cxxopts::Options options(argv[0], "Write the first N batches of a data config as the trainer sees them");
  options.add_options()("config", "YAML config with the data keys", cxxopts::value<std::string>())(
      "out", "output .safetensors", cxxopts::value<std::string>())(
      "limit", "number of batches", cxxopts::value<int64_t>()->default_value("1"))(
      "epoch", "epoch whose order is used", cxxopts::value<int64_t>()->default_value("0"))(
      "position", "start at this many samples into the epoch's global order", cxxopts::value<int64_t>()->default_value("0"))(
      "rank", "this rank", cxxopts::value<int>()->default_value("0"))(
      "world", "number of ranks", cxxopts::value<int>()->default_value("1"))("h,help", "show help");
  options.parse_positional({"config"});
  options.positional_help("CONFIG.yaml");
  auto args = options.parse(argc, argv);
  if (args.count("help") || !args.count("config") || !args.count("out")) {
    std::cout << options.help();
    return args.count("help") ? 0 : 2;
  }
  const auto cfg = llava::data::load_data_config(args["config"].as<std::string>());
  const auto dataset = llava::data::make_dataset(cfg, image_tokens_from_model(cfg.model_name_or_path));
  // Before anything is written: a data set mostly masked by LLaVA's tokenization-mismatch rule is an error.
  llava::data::MaskedSampleReport masked(dataset);
  for (auto& line : masked.scan()) std::cout << line << "\n";
  llava::data::DistributedSampler sampler(llava::data::sampler_config_for(cfg), dataset.modality_lengths(),
                                          args["rank"].as<int>(), args["world"].as<int>());
  llava::data::DataLoader loader(dataset, sampler, {args["epoch"].as<int64_t>(), args["position"].as<int64_t>()},
                                 cfg.dataloader_num_workers);
  llava::io::NamedTensors out;
  int64_t n = 0, drawn = 0;
  for (; n < args["limit"].as<int64_t>(); ++n) {
    auto batch = loader.next();
    if (!batch) break;
    for (auto& line : masked.note(*batch)) std::cout << line << "\n";
    drawn += batch->input_ids.size(0);
    const std::string p = "batch" + std::to_string(n) + ".";
    out.push_back({p + "input_ids", batch->input_ids});
    out.push_back({p + "labels", batch->labels});
    out.push_back({p + "attention_mask", batch->attention_mask});
    out.push_back({p + "pixel_values", batch->pixel_values});
    out.push_back({p + "indices", torch::tensor(batch->indices, torch::kInt64)});
  }
  llava::io::save_safetensors(args["out"].as<std::string>(), out,
                              {{"format", "pt"}, {"batches", std::to_string(n)},
                               {"skipped_images", std::to_string(loader.skipped_images())}});
  std::cout << "wrote " << n << " batches to " << args["out"].as<std::string>() << "\n";
  if (auto summary = masked.summary(masked.masked_drawn(), drawn); !summary.empty()) std::cout << summary << "\n";
  return 0;
}

}  // namespace

LLAVA_COMMAND("preprocess", "write the first N training batches of a data config to safetensors", run_preprocess);
