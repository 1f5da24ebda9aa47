#include "train/schedule.h"

#include <algorithm>
#include <cmath>

#include "io/error.h"

namespace llava::train {

ScheduleType schedule_from_name(const std::string& name) {
  if (name == "linear") return ScheduleType::Linear;
  if (name == "cosine") return ScheduleType::Cosine;
  if (name == "constant") return ScheduleType::Constant;
  if (name == "constant_with_warmup") return ScheduleType::ConstantWithWarmup;
  if (name == "cosine_with_min_lr") return ScheduleType::CosineWithMinLr;
  throw Error("lr_scheduler_type: unknown schedule '" + name +
              "' (expected linear, cosine, constant, constant_with_warmup or cosine_with_min_lr)");
}

double Schedule::factor(long step) const {
  const double warmup = static_cast<double>(warmup_steps);
  if (type == ScheduleType::Constant) return 1.0;
  if (type == ScheduleType::ConstantWithWarmup) return step < warmup_steps ? step / std::max(1.0, warmup) : 1.0;
  if (step < warmup_steps) return step / static_cast<double>(std::max(1L, warmup_steps));
  const double remaining = static_cast<double>(std::max(1L, total_steps - warmup_steps));
  if (type == ScheduleType::Linear) return std::max(0.0, (total_steps - step) / remaining);
  const double progress = (step - warmup_steps) / remaining;
  double wave = 0.5 * (1.0 + std::cos(M_PI * num_cycles * 2.0 * progress));
  if (type == ScheduleType::CosineWithMinLr) wave = wave * (1 - min_lr_rate) + min_lr_rate;
  return std::max(0.0, wave);
}

long warmup_steps_for(double warmup_steps, double warmup_ratio, long total_steps) {
  if (warmup_steps >= 1) return static_cast<long>(warmup_steps);
  const double ratio = warmup_steps > 0 ? warmup_steps : warmup_ratio;  // transformers v5: steps < 1 is a ratio
  return static_cast<long>(std::ceil(total_steps * ratio));
}

}  // namespace llava::train
