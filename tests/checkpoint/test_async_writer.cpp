// The background writer of async checkpoint saves: one job at a time, its error kept for the caller's poll,
// a cancel that ends a job waiting on something that never comes, and a destructor that waits.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>

#include "checkpoint/async_writer.h"
#include "io/error.h"

using llava::checkpoint::AsyncWriter;

namespace {
void wait_until_finished(const AsyncWriter& w) {
  for (int i = 0; i < 5000 && !w.finished(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
}
}  // namespace

TEST_CASE("async writer: a job runs in the background, its error is kept, one job at a time") {
  AsyncWriter w;
  CHECK_FALSE(w.running());
  std::atomic<bool> release{false};
  std::atomic<int> ran{0};
  w.start([&](const std::atomic<bool>&) {
    while (!release) std::this_thread::yield();
    ++ran;
  });
  CHECK(w.running());  // start() returned while the job still waits
  CHECK_FALSE(w.finished());
  CHECK_THROWS_AS(w.start([](const std::atomic<bool>&) {}), llava::Error);  // at most one in flight
  release = true;
  wait_until_finished(w);
  REQUIRE(w.finished());
  CHECK(w.error().empty());
  w.join();
  CHECK(ran == 1);
  CHECK_FALSE(w.running());

  w.start([](const std::atomic<bool>&) { throw std::runtime_error("disk full: /x/optimizer.pt"); });
  wait_until_finished(w);
  REQUIRE(w.finished());
  CHECK(w.error() == "disk full: /x/optimizer.pt");
  w.join();
}

TEST_CASE("async writer: cancel ends a waiting job, and the destructor cancels and waits") {
  std::atomic<bool> returned{false};
  {
    AsyncWriter w;
    w.start([&](const std::atomic<bool>& cancelled) {
      while (!cancelled) std::this_thread::sleep_for(std::chrono::milliseconds(1));  // e.g. another rank's file
      returned = true;
      throw llava::Error("stopped waiting");
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    CHECK(w.running());
  }  // destructor: cancel + join
  CHECK(returned);
}
