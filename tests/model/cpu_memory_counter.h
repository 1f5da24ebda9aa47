// Bytes of live CPU tensors and their peak, exactly: every CPU tensor's storage comes from c10's CPU
// allocator, which this wraps. Unlike the process RSS it does not depend on what malloc keeps cached.
#pragma once
#include <atomic>
#include <cstdint>
#include <mutex>
#include <unordered_map>

#include <c10/core/CPUAllocator.h>

namespace llava::test {

class CpuMemoryCounter : public c10::Allocator {
 public:
  // Installs the counter in front of the current CPU allocator (once per process; it stays installed).
  static CpuMemoryCounter& install() {
    static CpuMemoryCounter* counter = [] {
      auto* c = new CpuMemoryCounter(c10::GetCPUAllocator());
      c10::SetCPUAllocator(c, /*priority=*/1);  // above the default allocator's 0
      return c;
    }();
    return *counter;
  }

  int64_t live_bytes() const { return live_.load(); }
  int64_t peak_bytes() const { return peak_.load(); }
  void reset_peak() { peak_.store(live_.load()); }

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr inner = inner_->allocate(n);
    void* data = inner.get();
    if (!data) return inner;  // empty storage
    {
      std::lock_guard<std::mutex> lock(mutex_);
      allocations_.emplace(data, Allocation{std::move(inner), static_cast<int64_t>(n)});
    }
    const int64_t live = live_.fetch_add(static_cast<int64_t>(n)) + static_cast<int64_t>(n);
    int64_t peak = peak_.load();
    while (live > peak && !peak_.compare_exchange_weak(peak, live)) {
    }
    // Context == data, as libtorch's raw_allocate() requires; the wrapped allocation is found by address.
    return {data, data, &release, c10::Device(c10::kCPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

 private:
  struct Allocation {
    c10::DataPtr inner;  // the wrapped allocator's; freeing it frees the memory
    int64_t bytes;
  };

  explicit CpuMemoryCounter(c10::Allocator* inner) : inner_(inner) {}

  static void release(void* data) {
    if (!data) return;  // raw_deallocate() of an empty allocation
    auto& self = install();
    Allocation allocation;
    {
      std::lock_guard<std::mutex> lock(self.mutex_);
      auto it = self.allocations_.find(data);
      allocation = std::move(it->second);
      self.allocations_.erase(it);
    }
    self.live_.fetch_sub(allocation.bytes);
  }  // allocation.inner frees the memory here

  c10::Allocator* inner_;
  std::mutex mutex_;
  std::unordered_map<void*, Allocation> allocations_;
  std::atomic<int64_t> live_{0}, peak_{0};
};

}  // namespace llava::test
