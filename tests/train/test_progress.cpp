// The progress bar's exact text with a fake clock: tqdm's layout, rate, ETA and in-place redraws on a
// terminal; only the log lines elsewhere. (The bars up to ']' are what tqdm.format_meter(n, total,
// elapsed[, initial]) returns for the same numbers.)
#include <catch2/catch.hpp>
#include <sstream>

#include "train/progress.h"

using namespace llava::train;

namespace {

struct FakeClock {
  double now = 100;
  Progress::Clock clock() {
    return [this] { return now; };
  }
};

StepProgress step(int64_t n, int64_t total, double loss, double lr, double grad_norm, int64_t samples) {
  return {n, total, loss, lr, grad_norm, samples};
}

}  // namespace

TEST_CASE("tqdm's time and number formats") {
  CHECK(format_interval(0) == "00:00");
  CHECK(format_interval(83.9) == "01:23");
  CHECK(format_interval(3725) == "1:02:05");
  CHECK(format_interval(36000) == "10:00:00");
  CHECK(format_number(2.5) == "2.5");
  CHECK(format_number(1.23456) == "1.23");
  CHECK(format_number(2e-5) == "2e-5");
  CHECK(format_number(1e-4) == "0.0001");
  CHECK(format_number(0.52345) == "0.523");
}

TEST_CASE("on a terminal the bar is redrawn in place and log lines go above it") {
  std::ostringstream out;
  FakeClock fake;
  {
    Progress progress(out, /*is_tty=*/true, fake.clock());  // starts at t=100
    fake.now = 102.5;  // 1 step in 2.5 s: 0.4 it/s shows as s/it; 3 steps left = 7.5 s
    progress.update(step(1, 4, 2.5, 1e-4, 1.25, 8));
    const std::string bar1 = " 25%|██▌       | 1/4 [00:02<00:07,  2.50s/it, loss=2.5, lr=0.0001, grad_norm=1.25, "
                             "3.20 samples/s]";
    CHECK(out.str() == "\r" + bar1);

    fake.now = 103.2;  // 2 steps in 3.2 s: 1.6 s/it, 2 left = 3.2 s, 16 samples / 3.2 s
    progress.update(step(2, 4, 2.0, 8e-5, 0.75, 8));
    const std::string bar2 = " 50%|█████     | 2/4 [00:03<00:03,  1.60s/it, loss=2, lr=8e-5, grad_norm=0.75, "
                             "5.00 samples/s]";
    CHECK(out.str() == "\r" + bar1 + "\r" + bar2 + std::string(4, ' '));  // 4 blanks: bar1 was 4 cells longer

    out.str("");
    fake.now = 103.5;  // the redrawn bar shows the new time: 1.75 s/it, 16 samples / 3.5 s
    progress.log("{'loss': 2.25, 'grad_norm': 1.0, 'learning_rate': 9e-05, 'epoch': 0.5}");
    const std::string bar2_later = " 50%|█████     | 2/4 [00:03<00:03,  1.75s/it, loss=2, lr=8e-5, grad_norm=0.75, "
                                   "4.57 samples/s]";
    CHECK(out.str() == "\r" + std::string(98, ' ')  /* bar1's 98 cells */ + "\r" +
                           "{'loss': 2.25, 'grad_norm': 1.0, 'learning_rate': 9e-05, 'epoch': 0.5}\n\r" + bar2_later);

    out.str("");
    fake.now = 104;  // 3 steps in 4 s: 0.75 it/s -> 1.33 s/it; 1 step left = 1.33 s
    progress.update(step(3, 4, 1.5, 6e-5, 0.5, 4));
    CHECK(out.str() == "\r 75%|███████▌  | 3/4 [00:04<00:01,  1.33s/it, loss=1.5, lr=6e-5, grad_norm=0.5, "
                       "5.00 samples/s]");
    out.str("");
  }  // the destructor ends the bar's line
  CHECK(out.str() == "\n");
}

TEST_CASE("not on a terminal only the log lines are printed") {
  std::ostringstream out;
  FakeClock fake;
  Progress progress(out, /*is_tty=*/false, fake.clock());
  fake.now = 101;
  progress.update(step(1, 2, 2.5, 1e-4, 1.25, 8));
  progress.log("{'loss': 2.5, 'grad_norm': 1.25, 'learning_rate': 0.0001, 'epoch': 0.5}");
  fake.now = 102;
  progress.update(step(2, 2, 2.0, 5e-5, 1.0, 8));
  progress.log("{'loss': 2.0, 'grad_norm': 1.0, 'learning_rate': 5e-05, 'epoch': 1.0}");
  progress.finish();
  CHECK(out.str() ==
        "{'loss': 2.5, 'grad_norm': 1.25, 'learning_rate': 0.0001, 'epoch': 0.5}\n"
        "{'loss': 2.0, 'grad_norm': 1.0, 'learning_rate': 5e-05, 'epoch': 1.0}\n");
}

TEST_CASE("fast steps show it/s, a resumed run times only its own steps, narrow terminals cut the line") {
  FakeClock fake;
  std::ostringstream fast_out;
  Progress fast(fast_out, true, fake.clock());
  fake.now = 100.25;  // 4 it/s, 9 steps left = 2.25 s
  fast.update(step(1, 10, 1.0, 1e-3, 2.0, 2));
  CHECK(fast_out.str() == "\r 10%|█         | 1/10 [00:00<00:02,  4.00it/s, loss=1, lr=0.001, grad_norm=2, "
                          "8.00 samples/s]");

  std::ostringstream resumed_out;
  fake.now = 0;
  Progress resumed(resumed_out, true, fake.clock());
  fake.now = 10;  // resumed at step 100: one step in 10 s, 299 left
  resumed.update(step(101, 400, 1.0, 1e-3, 2.0, 2));
  CHECK(resumed_out.str() == "\r 25%|██▌       | 101/400 [00:10<49:50, 10.00s/it, loss=1, lr=0.001, grad_norm=2, "
                             "0.20 samples/s]");

  std::ostringstream narrow_out;
  Progress narrow(narrow_out, true, fake.clock(), /*columns=*/20);
  fake.now = 11;
  narrow.update(step(1, 4, 1.0, 1e-3, 2.0, 2));
  CHECK(narrow_out.str() == "\r 25%|██▌       | 1/");  // 19 cells: the line never wraps
}

TEST_CASE("before the first log line the loss and grad_norm are not known: '?'") {
  // The trainer reads the loss back only for log lines, so the bar shows the last line's values.
  FakeClock fake;
  std::ostringstream out;
  Progress progress(out, true, fake.clock());
  fake.now = 101;
  progress.update({1, 4, std::nullopt, 1e-3, std::nullopt, 2});
  CHECK(out.str() == "\r 25%|██▌       | 1/4 [00:01<00:03,  1.00it/s, loss=?, lr=0.001, grad_norm=?, 2.00 samples/s]");
}
