// Drives the optimizer pieces for the oracle tests:
//   schedule TYPE BASE_LR WARMUP_STEPS WARMUP_RATIO TOTAL [MIN_LR_RATE]  -> one lr per line, steps 0..TOTAL
//   adapter-copy MODEL_DIR ADAPTER_IN ADAPTER_OUT  -> reads a PEFT adapter over the model and writes it
//     again with our writer, in the model checkpoint's key layout
//   projector-copy MODEL_DIR IN.bin OUT.bin [--peft]  -> loads projector weights, writes them as LLaVA does
//   adamw IN.safetensors OUT.safetensors LR WEIGHT_DECAY STEPS MAX_NORM
//     IN: p<i> (initial params), g<k>.<i> (gradient of param i at step k). OUT: p<i>, exp_avg<i>,
//     exp_avg_sq<i> after STEPS updates, norm<k> (pre-clip grad norm of step k). Params 0,2,.. decay,
//     1,3,.. do not (two groups, like HF Trainer's). Options after MAX_NORM: --load OPT.pt (start from that
//     optimizer state), --save DIR (write DIR/optimizer.pt and DIR/scheduler.pt after the steps).
#include <cstdio>
#include <iostream>

#include "io/safetensors.h"
#include "io/torch_archive.h"
#include "checkpoint/hf_state.h"
#include "checkpoint/pretrained_parts.h"
#include "model/weights.h"
#include "train/adamw.h"
#include "train/lora.h"
#include "train/schedule.h"

using namespace llava;

static int run_schedule(int argc, char** argv) {
  train::Schedule s;
  s.type = train::schedule_from_name(argv[2]);
  const double base_lr = std::stod(argv[3]);
  s.total_steps = std::stol(argv[6]);
  s.warmup_steps = train::warmup_steps_for(std::stod(argv[4]), std::stod(argv[5]), s.total_steps);
  if (argc > 7) s.min_lr_rate = std::stod(argv[7]);
  for (long step = 0; step <= s.total_steps; ++step) std::printf("%.17g\n", base_lr * s.factor(step));
  return 0;
}

static int run_adamw(int argc, char** argv) {
  auto in = io::SafetensorsFile::open(argv[2]);
  const double lr = std::stod(argv[4]), wd = std::stod(argv[5]), max_norm = std::stod(argv[7]);
  const int steps = std::stoi(argv[6]);
  train::ParamGroup decay{"decay", {}, {}, lr, lr, wd}, no_decay{"no_decay", {}, {}, lr, lr, 0.0};
  std::vector<torch::Tensor> all;
  for (int i = 0; in.contains("p" + std::to_string(i)); ++i) {
    auto p = in.get("p" + std::to_string(i)).clone().requires_grad_(true);
    (i % 2 == 0 ? decay : no_decay).params.push_back(p);
    all.push_back(p);
  }
  train::AdamW opt({decay, no_decay}, {});
  std::string save_dir;
  for (int a = 8; a + 1 < argc; a += 2) {
    if (std::string(argv[a]) == "--load") checkpoint::load_adamw_state_dict(opt.data(), io::load_pt(argv[a + 1]), argv[a + 1]);
    if (std::string(argv[a]) == "--save") save_dir = argv[a + 1];
  }
  io::NamedTensors out;
  for (int k = 0; k < steps; ++k) {
    for (size_t i = 0; i < all.size(); ++i)
      all[i].mutable_grad() = in.get("g" + std::to_string(k) + "." + std::to_string(i)).clone();
    double norm = train::clip_grad_norm(all, max_norm);
    out.emplace_back("norm" + std::to_string(k), torch::tensor(norm, torch::kFloat64));
    opt.step();
    opt.zero_grad();
  }
  for (size_t g = 0; g < 2; ++g)
    for (size_t j = 0; j < opt.groups()[g].params.size(); ++j) {
      const auto i = std::to_string(2 * j + g);
      out.emplace_back("p" + i, opt.groups()[g].params[j].detach());
      out.emplace_back("exp_avg" + i, opt.state()[g][j].exp_avg);
      out.emplace_back("exp_avg_sq" + i, opt.state()[g][j].exp_avg_sq);
    }
  io::save_safetensors(argv[3], out);
  if (!save_dir.empty()) {
    io::save_pt(save_dir + "/optimizer.pt", checkpoint::adamw_state_dict(opt.data()));
    io::save_pt(save_dir + "/scheduler.pt", checkpoint::lambda_lr_state_dict(opt.groups(), steps));
  }
  return 0;
}

static int run_adapter_copy(char** argv) {
  auto loaded = model::load_model(argv[2], torch::kFloat32);
  auto modules = train::load_lora_adapter(loaded.model, argv[3]);
  auto config = train::LoraConfig();
  config.r = modules.at(0).adapter->lora_A.size(0);
  config.alpha = modules.at(0).adapter->scaling * config.r;
  checkpoint::save_lora_adapter(argv[4], train::lora_weights(modules), train::peft_lora_settings(config), loaded.layout,
                                argv[2]);
  return 0;
}

static int run_projector_copy(int argc, char** argv) {
  auto loaded = model::load_model(argv[2], torch::kFloat32);
  checkpoint::load_projector_weights(loaded.model, argv[3]);
  checkpoint::save_projector_weights(argv[4], loaded.model, loaded.layout, argc > 5 && std::string(argv[5]) == "--peft");
  return 0;
}

int main(int argc, char** argv) {
  try {
    const std::string cmd = argc > 1 ? argv[1] : "";
    if (cmd == "schedule" && argc >= 7) return run_schedule(argc, argv);
    if (cmd == "adamw" && argc >= 8) return run_adamw(argc, argv);
    if (cmd == "adapter-copy" && argc == 5) return run_adapter_copy(argv);
    if (cmd == "projector-copy" && argc >= 5) return run_projector_copy(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  std::cerr << "usage: see the comment at the top of tests/train/train_tool.cpp\n";
  return 2;
}
