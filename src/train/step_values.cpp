#include "train/step_values.h"

#include <cmath>

namespace llava::train {

torch::Tensor HostReads::read(const torch::Tensor& t, int64_t step) {
  ++per_step_[step];
  return t.to(torch::kCPU);
}

void HostReads::count(int64_t step, int64_t reads) {
  if (reads > 0) per_step_[step] += reads;
}

StepValues::StepValues(const torch::Device& device, double loss_since_log, HostReads& reads)
    : reads_(reads),
      loss_since_log_(torch::full({1}, loss_since_log, torch::TensorOptions().dtype(torch::kFloat64).device(device))),
      host_loss_since_log_(loss_since_log) {}

void StepValues::add(const StepMetrics& m, const torch::Tensor& loss, const torch::Tensor& grad_norm) {
  loss_since_log_ += loss;  // fp64 adds in step order: the same sum the host made when it read every step
  host_sum_current_ = false;
  pending_.push_back({m, loss, grad_norm});
}

StepMetrics StepValues::add_and_read(const StepMetrics& m, const torch::Tensor& loss, const torch::Tensor& grad_norm,
                                     int64_t steps_since_log) {
  const auto read = reads_.read(
      torch::cat({loss.reshape({1}), grad_norm.reshape({1}).to(torch::kFloat64), loss_since_log_.reshape({1})}), m.step);
  const double* v = read.data_ptr<double>();
  StepMetrics known = m;
  known.loss = v[0];
  known.grad_norm = v[1];
  if (std::isfinite(known.loss)) {
    loss_since_log_ += loss;  // fp64 on either side: the host's sum below is the same number
    host_loss_since_log_ = v[2] + known.loss;
  } else {
    host_loss_since_log_ = v[2] + v[2] / static_cast<double>(1 + steps_since_log);
    loss_since_log_.fill_(host_loss_since_log_);
  }
  host_sum_current_ = true;
  pending_.push_back({known, {}, {}});
  return known;
}

bool StepValues::all_known() const {
  if (!host_sum_current_) return false;
  for (auto& p : pending_)
    if (p.loss.defined()) return false;
  return true;
}

std::optional<NonFiniteStep> StepValues::read_back(int64_t step) {
  torch::Tensor values;
  if (!all_known()) {  // one transfer: [sum, loss_1, norm_1, loss_2, norm_2, ...] of the steps not known yet
    std::vector<torch::Tensor> parts = {loss_since_log_.reshape({1})};
    for (auto& p : pending_)
      if (p.loss.defined()) {
        parts.push_back(p.loss.reshape({1}).to(torch::kFloat64));
        parts.push_back(p.grad_norm.reshape({1}).to(torch::kFloat64));  // fp32 -> fp64 is exact
      }
    values = reads_.read(torch::cat(parts), step);
    host_loss_since_log_ = values[0].item<double>();
    host_sum_current_ = true;
  }
  size_t at = 1;
  const double* v = values.defined() ? values.data_ptr<double>() : nullptr;
  std::optional<NonFiniteStep> first_bad;
  for (auto& p : pending_) {
    StepMetrics m = p.metrics;
    if (p.loss.defined()) m.loss = v[at++], m.grad_norm = v[at++];
    if (!first_bad && !(std::isfinite(m.loss) && std::isfinite(m.grad_norm)))
      first_bad = NonFiniteStep{m.step, m.loss, m.grad_norm};
    history_.push_back(m);
  }
  pending_.clear();
  return first_bad;
}

void StepValues::start_log_line() {
  loss_since_log_.zero_();
  host_loss_since_log_ = 0;
}

}  // namespace llava::train
