// Learning-rate schedules with transformers' formulas (optimization.py): lr = base_lr * factor(step).
#pragma once
#include <string>

namespace llava::train {

enum class ScheduleType { Linear, Cosine, Constant, ConstantWithWarmup, CosineWithMinLr };

// "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"; Error otherwise.
ScheduleType schedule_from_name(const std::string& name);

struct Schedule {
  ScheduleType type = ScheduleType::Linear;
  long warmup_steps = 0;
  long total_steps = 1;
  double num_cycles = 0.5;   // cosine: half a wave by default
  double min_lr_rate = 0.0;  // cosine_with_min_lr: floor as a fraction of the base lr

  // The LambdaLR factor after `step` optimizer steps (step 0 is the lr of the first update).
  double factor(long step) const;
};

// HF TrainingArguments.get_warmup_steps: an explicit count >= 1 wins, else ceil(total * ratio).
long warmup_steps_for(double warmup_steps, double warmup_ratio, long total_steps);

}  // namespace llava::train
