// Hang detection for the training loop (`step_timeout`). The loop tells the watchdog which phase it is
// in; when no step completes within the timeout (a stuck data worker, a stuck file system, a peer that
// never reaches a collective), a thread prints where this rank is and ends the process with exit status
// kHangExitStatus, so that llava-run (or torchrun) restarts the group from the newest checkpoint.
// Collectives also fail on their own after ddp_timeout; this covers everything else.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>

namespace llava::train {

enum class Phase { data, forward, backward, collective, save };
const char* phase_name(Phase phase);

// Not a signal: the launcher reports "exited with status 3", not a crash.
constexpr int kHangExitStatus = 3;

class Watchdog {
 public:
  // timeout_seconds 0: off (no thread). `step` is the number of steps done when the loop starts.
  Watchdog(double timeout_seconds, int rank, int64_t step);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // Entering Phase::forward starts the step's next micro-batch (counted from 1).
  void enter(Phase phase);
  // A step finished: the clock starts again for the next one.
  void step_done(int64_t step);
  // Where the loop is: "step N, micro-batch M, phase P" (or "phase save (checkpoint-N)"), for error lines.
  std::string where() const;

 private:
  void watch();
  [[noreturn]] void report_and_exit() const;

  double timeout_seconds_;
  int rank_;
  std::atomic<int64_t> step_;         // steps done
  std::atomic<int64_t> micro_batch_{0};
  std::atomic<int> phase_{static_cast<int>(Phase::data)};
  std::mutex mutex_;
  std::condition_variable wake_;
  std::chrono::steady_clock::time_point deadline_;
  bool stop_ = false;
  std::thread thread_;
};

// Test hook: env LLAVA_TEST_HANG_AT_STEP=N (and optionally LLAVA_TEST_HANG_RANK=R) makes the data phase
// of step N sleep for good on that rank, in a launcher's first round only (TORCHELASTIC_RESTART_COUNT
// unset or 0), so that a restarted group runs through.
void hang_here_if_testing(int64_t step, int rank);

}  // namespace llava::train
