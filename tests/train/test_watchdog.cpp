// The step_timeout watchdog, in a forked child: a stuck rank says where it is and exits with status 3.
#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <string>
#include <thread>

#include "train/watchdog.h"

using namespace llava::train;
using namespace std::chrono_literals;

namespace {

struct ChildResult {
  int status = 0;
  std::string err;  // what it wrote to stderr
  double seconds = 0;
};

// Runs `body` in a child process whose stderr is captured; the child exits 0 if `body` returns.
ChildResult run_in_child(const std::function<void()>& body) {
  int err_pipe[2];
  REQUIRE(pipe(err_pipe) == 0);
  auto start = std::chrono::steady_clock::now();
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    dup2(err_pipe[1], 2);
    close(err_pipe[0]);
    body();
    _exit(0);
  }
  close(err_pipe[1]);
  ChildResult result;
  char buffer[4096];
  ssize_t n;
  while ((n = read(err_pipe[0], buffer, sizeof buffer)) > 0) result.err.append(buffer, static_cast<size_t>(n));
  close(err_pipe[0]);
  waitpid(pid, &result.status, 0);
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

}  // namespace

TEST_CASE("watchdog: no step within step_timeout -> one line naming step, micro-batch, phase; exit 3", "[train][watchdog]") {
  auto stuck = run_in_child([] {
    Watchdog watchdog(0.3, /*rank=*/1, /*step=*/4);  // resumed at step 4
    watchdog.enter(Phase::data);
    watchdog.enter(Phase::forward);
    watchdog.enter(Phase::backward);
    watchdog.enter(Phase::forward);  // the window's second micro-batch
    std::this_thread::sleep_for(10s);
  });
  REQUIRE(WIFEXITED(stuck.status));
  CHECK(WEXITSTATUS(stuck.status) == kHangExitStatus);
  CHECK(stuck.seconds > 0.25);
  CHECK(stuck.seconds < 5);
  CHECK(stuck.err ==
        "error: step_timeout: no step finished within 0.3s on rank 1: stuck in step 5, micro-batch 2, phase forward; "
        "exiting with status 3 so that the launcher restarts the group\n");
}

TEST_CASE("watchdog: finished steps restart the clock; 0 is off", "[train][watchdog]") {
  auto healthy = run_in_child([] {
    Watchdog watchdog(0.4, 0, 0);
    for (int step = 1; step <= 8; ++step) {  // 8 x 0.1s: twice the timeout in all, but never per step
      watchdog.enter(Phase::collective);
      std::this_thread::sleep_for(100ms);
      watchdog.step_done(step);
    }
  });
  CHECK(WIFEXITED(healthy.status));
  CHECK(WEXITSTATUS(healthy.status) == 0);
  CHECK(healthy.err.empty());

  auto off = run_in_child([] {
    Watchdog watchdog(0, 0, 0);
    watchdog.enter(Phase::save);
    std::this_thread::sleep_for(500ms);
  });
  CHECK(WEXITSTATUS(off.status) == 0);
  CHECK(off.err.empty());

  auto after_steps = run_in_child([] {
    Watchdog watchdog(0.3, 0, 0);
    watchdog.step_done(1);
    watchdog.enter(Phase::save);  // the save after step 1 hangs
    std::this_thread::sleep_for(10s);
  });
  CHECK(WEXITSTATUS(after_steps.status) == kHangExitStatus);
  CHECK_THAT(after_steps.err, Catch::Contains("stuck in phase save (checkpoint-1)"));
}

TEST_CASE("the watchdog says where the loop is, also when step_timeout is off", "[train][watchdog]") {
  Watchdog off(0, 0, 4);
  CHECK(off.where() == "step 5, micro-batch 0, phase data");
  off.enter(Phase::forward);
  off.enter(Phase::backward);
  CHECK(off.where() == "step 5, micro-batch 1, phase backward");
  off.step_done(5);
  off.enter(Phase::save);
  CHECK(off.where() == "phase save (checkpoint-5)");
}
