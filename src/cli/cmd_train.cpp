// `llava train CONFIG.yaml [--set key=value ...]`: training (stage 1, stage 2 LoRA or a full fine-tune, by
// the config), as one process or as every rank of llava-run / torchrun. Debugging / test outputs, not
// checkpoints:
//   --init-lora-from DIR      start LoRA A/B from a PEFT adapter dir (adapter_model.safetensors)
//   --metrics-out FILE.json   every optimizer step's loss, grad_norm, learning_rate, epoch; ZeRO state bytes
//   --save-trainables FILE    the trainable tensors after the last step, as safetensors
//   --stop-after-steps N, --stop-after-micro-batches N   stop there as if killed (no final save)
//   --warn-device-syncs       CUDA: a warning at every host-device wait inside a forward or backward pass
#include <cxxopts.hpp>
#include <iostream>

#include "cli/command.h"
#include "io/command_line.h"
#include "io/file_util.h"
#include "train/config.h"
#include "train/trainer.h"

namespace {

// `--set` values are taken out before cxxopts sees them: cxxopts would split a YAML list at its commas.
std::vector<std::string> take_overrides(int& argc, char** argv) {
  std::vector<std::string> overrides;
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--set") {
      if (i + 1 == argc) llava::fail("--set", "expected key=value after it, got nothing");
      overrides.push_back(argv[++i]);
    } else if (arg.rfind("--set=", 0) == 0) {
      overrides.push_back(arg.substr(6));
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  return overrides;
}

int run_train(int argc, char** argv) {
  const auto overrides = take_overrides(argc, argv);
  cxxopts::Options options(argv[0], "Train LLaVA as a YAML config says (--set key=value overrides any key)");
  options.add_options()("config", "YAML training config", cxxopts::value<std::string>())(
      "init-lora-from", "debug/test: PEFT adapter dir whose LoRA weights replace the random init",
      cxxopts::value<std::string>()->default_value(""))(
      "metrics-out", "debug/test: write per-step loss/grad_norm/learning_rate/epoch as JSON",
      cxxopts::value<std::string>()->default_value(""))(
      "save-trainables", "debug/test: write the trained tensors to this .safetensors (not a checkpoint)",
      cxxopts::value<std::string>()->default_value(""))(
      "stop-after-steps", "debug/test: stop after this optimizer step, as if killed (no final save)",
      cxxopts::value<int64_t>()->default_value("0"))(
      "stop-after-micro-batches", "debug/test: stop after this many backward passes, as if killed mid-window",
      cxxopts::value<int64_t>()->default_value("0"))(
      "warn-device-syncs", "debug: on CUDA, warn at each host-device wait inside a forward or backward pass")(
      "h,help", "show help");
  options.parse_positional({"config"});
  options.positional_help("CONFIG.yaml [--set key=value ...]");
  auto args = llava::io::parse_command_line(options, argc, argv, argv[0]);
  if (args.count("help") || !args.count("config")) {
    std::cout << options.help();
    return args.count("help") ? 0 : 2;
  }
  for (const char* option : {"stop-after-steps", "stop-after-micro-batches"})
    llava::io::option_in_range<int64_t>(args, option, 0, int64_t{1} << 53, argv[0]);
  const auto cfg = llava::train::load_train_config(args["config"].as<std::string>(), overrides);
  // Where the run writes, checked before it trains: a mistaken path fails now, not at the first save.
  llava::io::check_output_dir(cfg.output_dir, cfg.source + ": key 'output_dir'");
  for (const char* option : {"metrics-out", "save-trainables"})
    if (const auto path = args[option].as<std::string>(); !path.empty())
      llava::io::check_output_file(path, std::string("--") + option);
  llava::train::TrainDebugOptions debug{args["init-lora-from"].as<std::string>(), args["metrics-out"].as<std::string>(),
                                        args["save-trainables"].as<std::string>(),
                                        args["stop-after-steps"].as<int64_t>(),
                                        args["stop-after-micro-batches"].as<int64_t>(),
                                        args.count("warn-device-syncs") > 0};
  llava::train::train(cfg, debug, std::cout);
  if (const int signal_number = llava::train::stopped_by_signal()) return 128 + signal_number;
  return 0;
}

}  // namespace

LLAVA_COMMAND("train", "train LLaVA from a YAML config (stage 1, stage 2 LoRA, full fine-tune)", run_train);
