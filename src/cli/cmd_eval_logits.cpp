// `llava eval-logits`: logits (and loss) of one batch, for tests and tools that compare with transformers.
//   IN.safetensors:  input_ids int64 [B,T], attention_mask [B,T], pixel_values float [N,3,H,W] (optional),
//                    labels int64 [B,T] (optional)
//   OUT.safetensors: logits float32 [B,T,V], loss float32 0-d (only with labels)
#include <cxxopts.hpp>
#include <iostream>

#include "checkpoint/pretrained_parts.h"
#include "cli/command.h"
#include "io/command_line.h"
#include "io/error.h"
#include "io/file_util.h"
#include "io/safetensors.h"
#include "model/weights.h"
#include "train/device.h"
#include "train/lora.h"

namespace {

torch::Tensor optional_tensor(const llava::io::SafetensorsFile& file, const std::string& name) {
  return file.contains(name) ? file.get(name) : torch::Tensor();
}

int run_eval_logits(int argc, char** argv) {
  cxxopts::Options options(argv[0], "Compute the logits (and loss, with labels) of one batch");
  options.add_options()
      ("model", "model dir (config.json + weights)", cxxopts::value<std::string>())
      ("adapter", "PEFT LoRA adapter dir (adapter_config.json + adapter_model.safetensors)", cxxopts::value<std::string>())
      ("projector", "projector weights: LLaVA's mm_projector.bin / non_lora_trainables.bin", cxxopts::value<std::string>())
      ("batch", "input safetensors (input_ids, attention_mask, pixel_values, labels)", cxxopts::value<std::string>())
      ("out", "output safetensors (logits, loss)", cxxopts::value<std::string>())
      ("dtype", "fp32 or bf16 (weights and compute)", cxxopts::value<std::string>()->default_value("fp32"))
      ("device", "cpu, cuda, cuda:N or auto", cxxopts::value<std::string>()->default_value("cpu"))
      ("vision-tower", "CLIP dir for an original-LLaVA model (overrides mm_vision_tower)",
       cxxopts::value<std::string>()->default_value(""))
      ("h,help", "show help");
  auto args = llava::io::parse_command_line(options, argc, argv, argv[0]);
  if (args.count("help")) {
    std::cout << options.help();
    return 0;
  }
  for (const char* required : {"model", "batch", "out"})
    if (!args.count(required)) llava::fail("eval-logits", std::string("--") + required + " is required");
  llava::io::check_output_file(args["out"].as<std::string>(), "eval-logits --out");

  auto dtype = llava::model::parse_dtype(args["dtype"].as<std::string>());
  const auto device = llava::train::resolve_device(args["device"].as<std::string>(), 0, "eval-logits --device", "--device ");
  auto loaded =
      llava::model::load_model(args["model"].as<std::string>(), dtype, args["vision-tower"].as<std::string>(), device);
  if (args.count("projector")) llava::checkpoint::load_projector_weights(loaded.model, args["projector"].as<std::string>());
  if (args.count("adapter")) llava::train::load_lora_adapter(loaded.model, args["adapter"].as<std::string>());

  const std::string batch_path = args["batch"].as<std::string>();
  auto batch = llava::io::SafetensorsFile::open(batch_path);
  if (!batch.contains("input_ids")) llava::fail(batch_path, "no input_ids tensor");
  auto raw_ids = batch.get("input_ids");
  if (c10::isFloatingType(raw_ids.scalar_type()) || raw_ids.dim() != 2)
    llava::fail(batch_path, "input_ids must be an integer tensor [B,T], got " + std::string(c10::toString(raw_ids.scalar_type())) +
                                " " + c10::str(raw_ids.sizes()));
  auto input_ids = raw_ids.to(torch::kInt64);
  // Ids outside the vocabulary would index past the embedding table; the image token may be -200.
  const auto& config = loaded.config;
  auto text_ids = input_ids.masked_select(input_ids != config.image_token_index);
  if (text_ids.numel() && (text_ids.min().item<int64_t>() < 0 || text_ids.max().item<int64_t>() >= config.text.vocab_size))
    llava::fail(batch_path, "input_ids holds ids outside the vocabulary [0, " + std::to_string(config.text.vocab_size) + ")");
  auto attention_mask = optional_tensor(batch, "attention_mask");
  auto pixel_values = optional_tensor(batch, "pixel_values");
  auto labels = optional_tensor(batch, "labels");
  // Labels are ids to score or -100 (ignored): anything else would reach the loss as an index.
  if (labels.defined()) {
    if (c10::isFloatingType(labels.scalar_type()) || labels.sizes() != input_ids.sizes())
      llava::fail(batch_path, "labels must be an integer tensor shaped like input_ids " + c10::str(input_ids.sizes()) +
                                  ", got " + std::string(c10::toString(labels.scalar_type())) + " " + c10::str(labels.sizes()));
    labels = labels.to(torch::kInt64);
    auto scored = labels.masked_select(labels != -100);
    if (scored.numel() && (scored.min().item<int64_t>() < 0 || scored.max().item<int64_t>() >= config.text.vocab_size))
      llava::fail(batch_path, "labels holds ids outside the vocabulary [0, " + std::to_string(config.text.vocab_size) +
                                  ") other than -100 (ignored)");
  }

  torch::NoGradGuard no_grad;
  auto on_device = [&](const torch::Tensor& t) { return t.defined() ? t.to(device) : t; };
  auto logits = loaded.model->forward(on_device(input_ids), on_device(attention_mask), on_device(pixel_values));
  llava::io::NamedTensors out = {{"logits", logits.to(torch::kCPU, torch::kFloat32)}};
  if (labels.defined()) out.emplace_back("loss", llava::model::causal_lm_loss(logits, on_device(labels)).cpu());
  llava::io::save_safetensors(args["out"].as<std::string>(), out);
  return 0;
}

}  // namespace

LLAVA_COMMAND("eval-logits", "logits and loss of one batch (input/output: safetensors)", run_eval_logits);
