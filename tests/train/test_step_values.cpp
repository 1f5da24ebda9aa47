// StepValues: the per-step loss and grad_norm kept on the device and read back in one transfer; the log
// line's loss sum against HF Trainer's arithmetic, its logging_nan_inf_filter included, written out here.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>

#include "train/step_values.h"

using namespace llava::train;

namespace {

torch::Tensor loss_of(double v) { return torch::full({1}, v, torch::kFloat64); }
torch::Tensor norm_of(double v) { return torch::full({}, v, torch::kFloat32); }

}  // namespace

TEST_CASE("add_and_read sums the line's losses and a NaN step adds the mean so far, as HF Trainer") {
  HostReads reads;
  StepValues values(torch::kCPU, /*loss_since_log=*/0.0, reads);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  auto m = [](int64_t step) { return StepMetrics{step, 0, 0, 1e-3, 0}; };
  // HF: tr_loss += loss, or for a NaN/Inf loss tr_loss += tr_loss / (1 + global_step - last_logged).
  double hf = 0;
  const double losses[] = {1.5, nan, 3.25, std::numeric_limits<double>::infinity(), 0.5};
  for (int64_t i = 0; i < 5; ++i) {
    const auto known = values.add_and_read(m(i + 1), loss_of(losses[i]), norm_of(2.0), /*steps_since_log=*/i);
    hf = std::isfinite(losses[i]) ? hf + losses[i] : hf + hf / static_cast<double>(1 + i);
    CHECK(values.loss_since_log() == hf);
    CHECK(known.grad_norm == 2.0);
    CHECK((std::isfinite(known.loss) ? known.loss == losses[i] : !std::isfinite(losses[i])));
  }
  CHECK(hf == Approx(1.5 + 0.75 + 3.25 + 5.5 / 4 + 0.5));
  // The device sum is the host's: a read_back (nothing pending but the sum) gives the same number.
  values.add(m(6), loss_of(1.0), norm_of(1.0));
  const auto bad = values.read_back(6);
  REQUIRE(bad.has_value());
  CHECK(bad->step == 2);  // the first non-finite step in the history
  CHECK(values.loss_since_log() == hf + 1.0);
  REQUIRE(values.history().size() == 6);
  CHECK(values.history()[5].loss == 1.0);
  CHECK(reads.per_step().size() == 6);  // one read per step with add_and_read, one at the read back
}
