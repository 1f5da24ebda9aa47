// `llava merge --model BASE --adapter DIR --out DIR`: fold a LoRA adapter (and optionally LLaVA's projector
// file) into the base weights and write a full model that transformers loads directly: sharded
// safetensors in the base checkpoint's key layout + index, config.json, tokenizer and processor files.
#include <cxxopts.hpp>
#include <filesystem>
#include <iostream>

#include "checkpoint/pretrained_parts.h"
#include "cli/command.h"
#include "io/command_line.h"
#include "io/error.h"
#include "io/file_util.h"
#include "io/safetensors.h"
#include "model/weights.h"
#include "train/lora.h"

namespace fs = std::filesystem;

namespace {

// Everything beside the weights that makes the output dir a usable model.
const char* kCompanionFiles[] = {"config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
                                 "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                                 "preprocessor_config.json", "processor_config.json", "chat_template.json",
                                 "chat_template.jinja"};

int run_merge(int argc, char** argv) {
  cxxopts::Options options(argv[0], "Merge a LoRA adapter into its base model and write the full model");
  options.add_options()
      ("model", "base model dir", cxxopts::value<std::string>())
      ("adapter", "PEFT LoRA adapter dir (e.g. a checkpoint-N)", cxxopts::value<std::string>())
      ("projector", "projector weights to put in too (non_lora_trainables.bin / mm_projector.bin)", cxxopts::value<std::string>())
      ("out", "output dir", cxxopts::value<std::string>())
      ("dtype", "fp32 or bf16 (weights written in this dtype)", cxxopts::value<std::string>()->default_value("fp32"))
      ("max-shard-size", "largest shard, e.g. 5GB", cxxopts::value<std::string>()->default_value("5GB"))
      ("vision-tower", "CLIP dir for an original-LLaVA model", cxxopts::value<std::string>()->default_value(""))
      ("h,help", "show help");
  auto args = llava::io::parse_command_line(options, argc, argv, argv[0]);
  if (args.count("help")) {
    std::cout << options.help();
    return 0;
  }
  for (const char* required : {"model", "adapter", "out"})
    if (!args.count(required)) llava::fail("merge", std::string("--") + required + " is required");
  const std::string base = args["model"].as<std::string>(), out = args["out"].as<std::string>();
  llava::io::check_output_dir(out, "merge --out");
  if (fs::exists(out) && !fs::is_empty(out)) llava::fail(out, "output dir exists and is not empty; nothing was written");

  auto loaded = llava::model::load_model(base, llava::model::parse_dtype(args["dtype"].as<std::string>()),
                                         args["vision-tower"].as<std::string>());
  if (args.count("projector")) llava::checkpoint::load_projector_weights(loaded.model, args["projector"].as<std::string>());
  auto lora = llava::train::load_lora_adapter(loaded.model, args["adapter"].as<std::string>());
  for (auto& module : lora) llava::train::merge(module);

  fs::create_directories(out);
  auto written = llava::checkpoint::save_full_model(out, loaded.model, loaded.layout,
                                               llava::io::parse_size(args["max-shard-size"].as<std::string>()));
  for (const char* name : kCompanionFiles)
    if (fs::exists(fs::path(base) / name)) fs::copy_file(fs::path(base) / name, fs::path(out) / name);
  std::cout << "merged " << lora.size() << " LoRA modules; wrote "
            << written.size() << " weight file(s) to " << out << "\n";
  return 0;
}

}  // namespace

LLAVA_COMMAND("merge", "fold a LoRA adapter into its base model and write the full model", run_merge);
