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
#include "io/command_line.h"
#include "io/error.h"
#include "io/file_util.h"
#include "io/json_input.h"
#include "io/safetensors.h"
#include "model/config.h"

namespace {

namespace fs = std::filesystem;

// The model decides how <image> appears in input_ids: llava-hf configs (image_token_index) get that id
// repeated once per vision feature; original LLaVA checkpoints (or no config.json) get one -200.
llava::data::ImageTokens image_tokens_from_model(const std::string& model_dir) {
  const fs::path path = fs::path(model_dir) / "config.json";
  llava::data::ImageTokens tokens;
  if (model_dir.empty() || !fs::exists(path)) return tokens;
  const nlohmann::json cfg = llava::io::read_json_file(path.string());
  if (!cfg.is_object()) llava::fail(path.string(), "expected a JSON object");
  const char* id_key = cfg.contains("image_token_index") ? "image_token_index" : "image_token_id";
  if (!cfg.contains(id_key)) return tokens;
  const std::string where = path.string();
  tokens.id = llava::io::json_integer(cfg[id_key], where + ": " + id_key);
  if (cfg.contains("image_seq_length")) {
    tokens.count = llava::io::json_integer(cfg["image_seq_length"], where + ": image_seq_length", 1, 1 << 20);
  } else {
    auto vision = cfg.value("vision_config", nlohmann::json::object());
    if (vision.is_null()) vision = nlohmann::json::object();
    const std::string vision_where = where + ": vision_config";
    const int64_t side = llava::io::json_integer_field(vision, "image_size", 224, vision_where, 1, 1 << 13) /
                         llava::io::json_integer_field(vision, "patch_size", 32, vision_where, 1, 1 << 13);  // CLIP defaults
    const auto strategy = cfg.value("vision_feature_select_strategy", nlohmann::json("default"));
    tokens.count = side * side + (strategy == "full" ? 1 : 0);
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
  auto args = llava::io::parse_command_line(options, argc, argv, argv[0]);
  if (args.count("help") || !args.count("config") || !args.count("out")) {
    std::cout << options.help();
    return args.count("help") ? 0 : 2;
  }
  llava::io::check_output_file(args["out"].as<std::string>(), "preprocess --out");
  using llava::io::option_in_range;
  const int world = option_in_range(args, "world", 1, 4096, argv[0]);
  const int rank = option_in_range(args, "rank", 0, world - 1, argv[0]);
  const int64_t limit = option_in_range<int64_t>(args, "limit", 0, 1'000'000, argv[0]);
  const int64_t epoch = option_in_range<int64_t>(args, "epoch", 0, 1'000'000, argv[0]);
  const int64_t position = option_in_range<int64_t>(args, "position", 0, int64_t{1} << 40, argv[0]);
  const auto cfg = llava::data::load_data_config(args["config"].as<std::string>());
  const auto dataset = llava::data::make_dataset(cfg, image_tokens_from_model(cfg.model_name_or_path));
  // The model's vocabulary, when the config names a model: a token past it fails only in training.
  if (!cfg.model_name_or_path.empty() && fs::exists(llava::model::config_json_path(cfg.model_name_or_path)))
    dataset.tokenizer().check_ids_fit(llava::model::load_text_vocab_size(cfg.model_name_or_path),
                                      llava::model::config_json_path(cfg.model_name_or_path));
  const int64_t samples = static_cast<int64_t>(dataset.size());  // the trainer's rule (train/config.h)
  if (cfg.per_device_train_batch_size * world > (cfg.dataloader_drop_last ? samples : 2 * samples))
    llava::fail(args["config"].as<std::string>(),
                "key 'per_device_train_batch_size': " + std::to_string(cfg.per_device_train_batch_size) + " x " +
                    std::to_string(world) + " rank(s) is more than the data set's " + std::to_string(samples) +
                    " samples can fill (twice, or once with dataloader_drop_last)");
  // Before anything is written: a data set mostly masked by LLaVA's tokenization-mismatch rule is an error.
  llava::data::MaskedSampleReport masked(dataset);
  for (auto& line : masked.scan()) std::cout << line << "\n";
  llava::data::DistributedSampler sampler(llava::data::sampler_config_for(cfg), dataset.modality_lengths(), rank, world);
  llava::data::DataLoader loader(dataset, sampler, {epoch, position}, cfg.dataloader_num_workers);
  llava::io::NamedTensors out;
  int64_t n = 0, drawn = 0;
  for (; n < limit; ++n) {
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
