// Rank 0's view of training: on a terminal a one-line tqdm-style bar redrawn in place, with HF's log
// lines printed above it; elsewhere (a file, a pipe, CI) just the log lines.
//
//  45%|████▌     | 45/100 [01:23<01:42,  1.86s/it, loss=1.23, lr=2e-5, grad_norm=0.523, 4.31 samples/s]
//
// Times and rates are tqdm's: elapsed<remaining as [h:]mm:ss, the rate as it/s, or s/it below 1 it/s,
// averaged over the steps this process ran (a resumed run does not count the restored steps).
#pragma once
#include <cstdint>
#include <functional>
#include <iosfwd>
#include <optional>
#include <string>

namespace llava::train {

// One finished optimizer step, as the bar shows it.
struct StepProgress {
  int64_t step = 0;         // 1-based index of the step just done
  int64_t total_steps = 0;  // max_steps
  std::optional<double> loss;  // the last logged line's: the trainer reads the loss back only to log it
  double learning_rate = 0;
  std::optional<double> grad_norm;  // the last logged line's; unknown (before the first line): "?"

  int64_t samples = 0;      // samples this step consumed, summed over ranks
};

class Progress {
 public:
  using Clock = std::function<double()>;  // seconds since any fixed origin

  // `is_tty`: draw the bar (see is_terminal). `columns` > 0: the bar line is cut to columns - 1 cells so
  // that it never wraps (a wrapped line cannot be redrawn with '\r'). Timing starts now.
  Progress(std::ostream& out, bool is_tty, Clock clock = steady_seconds, int columns = 0);
  ~Progress();  // ends the bar's line, so what follows (e.g. an error) starts on its own line
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  void update(const StepProgress& s);    // once per optimizer step
  void log(const std::string& line);     // an HF log line (or any message), above the bar
  void finish();                         // ends the bar's line; later calls to update() start a new one

  // The bar text for `s` at `now` (no '\r', not cut to the width).
  std::string bar(const StepProgress& s, double now) const;

  static double steady_seconds();

 private:
  void draw(const std::string& text);

  std::ostream& out_;
  bool is_tty_;
  Clock clock_;
  int columns_;
  double start_time_;
  int64_t first_step_ = -1;   // steps already done when this process started (set by the first update)
  int64_t samples_seen_ = 0;  // since this process started
  StepProgress last_;
  size_t drawn_width_ = 0;    // cells of the bar on screen; 0 = none drawn
};

// Whether `out` is std::cout / std::cerr / std::clog and that stream's fd is a terminal.
bool is_terminal(const std::ostream& out);
// The terminal's width in cells for that stream, 0 when unknown.
int terminal_columns(const std::ostream& out);

// tqdm's helpers: [h:]mm:ss, and a number in 3 significant digits without exponent zero padding.
std::string format_interval(double seconds);
std::string format_number(double x);

}  // namespace llava::train
