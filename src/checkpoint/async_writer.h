// One background write at a time (asynchronous checkpoint saves): the caller stages what is to be written
// into memory nothing else changes, hands the writing to start(), and keeps training; it learns at its next
// poll whether the write failed. Knows nothing of training or of what is written.
#pragma once
#include <atomic>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

namespace llava::checkpoint {

class AsyncWriter {
 public:
  // The job runs on the background thread; a long wait inside it (e.g. for files other processes write)
  // should return once `cancelled` is true. An exception it throws becomes error().
  using Job = std::function<void(const std::atomic<bool>& cancelled)>;

  AsyncWriter() = default;
  ~AsyncWriter();  // cancels the job in flight and waits for it to return
  AsyncWriter(const AsyncWriter&) = delete;
  AsyncWriter& operator=(const AsyncWriter&) = delete;

  // Starts `job`; the previous one must have finished (join() first). Returns at once.
  void start(Job job);
  bool running() const { return started_ && !finished_; }
  bool finished() const { return started_ && finished_; }  // done or failed, not yet joined
  // The finished job's error ("" when it worked); only meaningful once finished().
  std::string error() const;
  // Waits for the job in flight (if any) to return; after it no job is in flight.
  void join();
  void cancel() { cancelled_ = true; }

 private:
  std::thread thread_;
  bool started_ = false;
  std::atomic<bool> finished_{false}, cancelled_{false};
  mutable std::mutex mutex_;
  std::string error_;
};

}  // namespace llava::checkpoint
