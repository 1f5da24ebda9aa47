#include "train/watchdog.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

namespace llava::train {

const char* phase_name(Phase phase) {
  switch (phase) {
    case Phase::data: return "data";
    case Phase::forward: return "forward";
    case Phase::backward: return "backward";
    case Phase::collective: return "collective";
    case Phase::save: return "save";
  }
  return "?";
}

namespace {

std::chrono::steady_clock::duration seconds(double s) {
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(s));
}

}  // namespace

Watchdog::Watchdog(double timeout_seconds, int rank, int64_t step)
    : timeout_seconds_(timeout_seconds), rank_(rank), step_(step) {
  if (timeout_seconds_ <= 0) return;
  deadline_ = std::chrono::steady_clock::now() + seconds(timeout_seconds_);
  thread_ = std::thread([this] { watch(); });
}

Watchdog::~Watchdog() {
  if (!thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

void Watchdog::enter(Phase phase) {
  if (phase == Phase::forward) ++micro_batch_;
  phase_ = static_cast<int>(phase);
}

void Watchdog::step_done(int64_t step) {
  step_ = step;
  micro_batch_ = 0;
  phase_ = static_cast<int>(Phase::data);
  if (!thread_.joinable()) return;
  std::lock_guard<std::mutex> lock(mutex_);
  deadline_ = std::chrono::steady_clock::now() + seconds(timeout_seconds_);
}

void Watchdog::watch() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stop_) {
    if (std::chrono::steady_clock::now() >= deadline_) report_and_exit();
    wake_.wait_until(lock, deadline_);
  }
}

namespace {

void format_where(char* out, size_t size, Phase phase, long long done, long long micro_batch) {
  if (phase == Phase::save)  // saves follow a finished step
    std::snprintf(out, size, "phase save (checkpoint-%lld)", done);
  else
    std::snprintf(out, size, "step %lld, micro-batch %lld, phase %s", done + 1, micro_batch, phase_name(phase));
}

}  // namespace

std::string Watchdog::where() const {
  char text[128];
  format_where(text, sizeof text, static_cast<Phase>(phase_.load()), step_.load(), micro_batch_.load());
  return text;
}

// One line on stderr, then _exit: no destructor or atexit handler may block on what is stuck.
void Watchdog::report_and_exit() const {
  char where[128];
  format_where(where, sizeof where, static_cast<Phase>(phase_.load()), step_.load(), micro_batch_.load());
  char line[512];
  const int length = std::snprintf(line, sizeof line,
                                   "error: step_timeout: no step finished within %gs on rank %d: stuck in %s; "
                                   "exiting with status %d so that the launcher restarts the group\n",
                                   timeout_seconds_, rank_, where, kHangExitStatus);
  [[maybe_unused]] auto written = write(2, line, static_cast<size_t>(std::min<int>(length, sizeof line - 1)));
  _exit(kHangExitStatus);
}

void hang_here_if_testing(int64_t step, int rank) {
  static const char* at_step = std::getenv("LLAVA_TEST_HANG_AT_STEP");
  if (at_step == nullptr || std::atoll(at_step) != step) return;
  const char* only_rank = std::getenv("LLAVA_TEST_HANG_RANK");
  if (only_rank != nullptr && std::atoi(only_rank) != rank) return;
  const char* round = std::getenv("TORCHELASTIC_RESTART_COUNT");
  if (round != nullptr && std::atoi(round) != 0) return;
  for (;;) sleep(60);
}

}  // namespace llava::train
