#include "checkpoint/async_writer.h"

#include <exception>

#include "io/error.h"

namespace llava::checkpoint {

AsyncWriter::~AsyncWriter() {
  cancel();
  join();
}

void AsyncWriter::start(Job job) {
  if (started_) throw Error("internal: a background write started while another was in flight");
  started_ = true;
  finished_ = false;
  cancelled_ = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    error_.clear();
  }
  thread_ = std::thread([this, job = std::move(job)] {
    std::string error;
    try {
      job(cancelled_);
    } catch (const std::exception& e) {
      error = e.what();
      if (error.empty()) error = "background write failed";
    } catch (...) {
      error = "background write failed (unknown exception)";
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      error_ = std::move(error);
    }
    finished_ = true;
  });
}

std::string AsyncWriter::error() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return error_;
}

void AsyncWriter::join() {
  if (thread_.joinable()) thread_.join();
  started_ = false;
}

}  // namespace llava::checkpoint
