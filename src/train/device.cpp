#include "train/device.h"

#include <ATen/detail/CUDAHooksInterface.h>
#include <torch/cuda.h>

#include <string>

#include "io/error.h"

namespace llava::train {

namespace {

[[noreturn]] void no_such_device(const TrainConfig& c, const std::string& why) {
  fail(c.source, "key 'device': " + c.device + " " + why + "; use device: cpu (or auto, which picks the CPU then)");
}

int cuda_devices() { return torch::cuda::is_available() ? static_cast<int>(torch::cuda::device_count()) : 0; }

}  // namespace

torch::Device training_device(const TrainConfig& c, int local_rank) {
  if (c.use_cpu || c.device == "cpu") return torch::kCPU;
  const int available = cuda_devices();
  if (c.device == "auto") return available > 0 ? torch::Device(torch::kCUDA, local_rank % available) : torch::kCPU;
  if (!at::detail::getCUDAHooks().isBuilt())
    no_such_device(c, "needs CUDA, but this build of llava has none (its libtorch is CPU-only)");
  if (available == 0) no_such_device(c, "needs a CUDA GPU, but none is visible (driver, CUDA_VISIBLE_DEVICES)");
  const int index = c.device == "cuda" ? local_rank : std::stoi(c.device.substr(5));
  if (index >= available)
    no_such_device(c, "names CUDA device " + std::to_string(index) + (c.device == "cuda" ? " (LOCAL_RANK)" : "") +
                          ", but only " + std::to_string(available) + " are visible");
  return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index));
}

bool async_save_enabled(const TrainConfig& c, const torch::Device& device) {
  return c.async_save.value_or(device.is_cuda());
}

data::Batch batch_on_device(data::Batch batch, const torch::Device& device) {
  if (device.is_cpu()) return batch;
  auto move = [&](torch::Tensor& t) {
    if (t.defined()) t = t.pin_memory().to(device, /*non_blocking=*/true);
  };
  for (auto* t : {&batch.input_ids, &batch.labels, &batch.attention_mask, &batch.pixel_values, &batch.has_image}) move(*t);
  return batch;
}

void allreduce_sum(dist::Communicator& comm, torch::Tensor& t) {
  if (comm.world_size() == 1) return;
  auto buffer = t.to(comm.device());
  comm.allreduce(buffer, dist::Reduce::Sum);
  t = buffer.to(t.device());
}

}  // namespace llava::train
