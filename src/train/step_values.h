// The per-step loss and grad_norm of a run, kept where they are computed (the training device) so that a
// step never waits for the device: the host reads them back in one transfer only when a log line, a save
// or the end of the run needs them (or `kMaxPending` steps are waiting), as HF Trainer keeps tr_loss a
// device tensor and reads it in _maybe_log_save_evaluate.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "train/trainer.h"

namespace llava::train {

// Every read of a device value by the host during training, counted by the step it happened in
// (--metrics-out "host_reads"); on a GPU each one waits for the device to finish the work queued so far.
class HostReads {
 public:
  torch::Tensor read(const torch::Tensor& t, int64_t step);  // t on the host
  void count(int64_t step, int64_t reads);                    // reads made elsewhere (the optimizer's)
  const std::map<int64_t, int64_t>& per_step() const { return per_step_; }

 private:
  std::map<int64_t, int64_t> per_step_;
};

// A step whose loss or grad_norm is non-finite (what stops a run without skip_nonfinite_steps).
struct NonFiniteStep {
  int64_t step;
  double loss, grad_norm;
};

class StepValues {
 public:
  static constexpr size_t kMaxPending = 1000;  // bounds the device memory of values not read yet

  // `loss_since_log`: the loss sum carried over from a resumed checkpoint's line in progress.
  StepValues(const torch::Device& device, double loss_since_log, HostReads& reads);

  // A finished step: `loss` ([1] fp64, summed over ranks) and `grad_norm` (0-d fp32) stay on the device;
  // the other fields of `m` are known on the host. The loss joins the sum of the log line in progress.
  void add(const StepMetrics& m, const torch::Tensor& loss, const torch::Tensor& grad_norm);
  // The same, read back at once (skip_nonfinite_steps decides on every step): returns `m` with its loss and
  // grad_norm; the loss sum comes back in the same transfer, so a log line needs no other read. A NaN/Inf
  // loss adds the mean of the line so far instead, as HF Trainer's logging_nan_inf_filter does
  // (tr_loss += tr_loss / (1 + steps since the last line, this one not counted)).
  StepMetrics add_and_read(const StepMetrics& m, const torch::Tensor& loss, const torch::Tensor& grad_norm,
                           int64_t steps_since_log);
  bool pending_full() const { return pending_.size() >= kMaxPending; }

  // Reads every pending step and the loss sum since the last log line back (one transfer, counted at
  // `step`; none when nothing is unknown on the host) into history(). Returns the first pending step
  // whose loss or grad_norm is NaN/Inf, if any.
  std::optional<NonFiniteStep> read_back(int64_t step);
  // The loss sum since the last log line as of the last read_back(), and zeroing it (a line was logged).
  double loss_since_log() const { return host_loss_since_log_; }
  void start_log_line();

  const std::vector<StepMetrics>& history() const { return history_; }
  std::vector<StepMetrics>& history() { return history_; }

 private:
  struct Pending {
    StepMetrics metrics;
    torch::Tensor loss, grad_norm;  // undefined: already known on the host
  };
  bool all_known() const;
  HostReads& reads_;
  torch::Tensor loss_since_log_;  // [1] fp64 on the device
  double host_loss_since_log_;
  bool host_sum_current_ = true;
  std::vector<Pending> pending_;
  std::vector<StepMetrics> history_;
};

}  // namespace llava::train
