#include "train/device.h"

#include <ATen/detail/CUDAHooksInterface.h>
#include <torch/cuda.h>
#ifdef LLAVA_HAS_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <string>

#include "io/error.h"
#include "model/llava.h"

namespace llava::train {

namespace {

int cuda_devices() { return torch::cuda::is_available() ? static_cast<int>(torch::cuda::device_count()) : 0; }

// cuda:N -> N (N of at most 4 digits), else -1.
int cuda_index(const std::string& text) {
  const std::string digits = text.rfind("cuda:", 0) == 0 ? text.substr(5) : "";
  if (digits.empty() || digits.size() > 4 || digits.find_first_not_of("0123456789") != std::string::npos) return -1;
  return std::stoi(digits);
}

}  // namespace

torch::Device resolve_device(const std::string& text, int local_rank, const std::string& where,
                             const std::string& setting) {
  auto refuse = [&](const std::string& why) {
    fail(where, text + " " + why + "; use " + setting + "cpu (or auto, which picks the CPU then)");
  };
  if (text == "cpu") return torch::kCPU;
  if (text != "auto" && text != "cuda" && cuda_index(text) < 0)
    fail(where, "expected auto, cpu, cuda or cuda:N (N a device index), got '" + text + "'");
  const int available = cuda_devices();
  if (text == "auto") return available > 0 ? torch::Device(torch::kCUDA, local_rank % available) : torch::kCPU;
  if (!at::detail::getCUDAHooks().isBuilt()) refuse("needs CUDA, but this build of llava has none (its libtorch is CPU-only)");
  if (available == 0) refuse("needs a CUDA GPU, but none is visible (driver, CUDA_VISIBLE_DEVICES)");
  const int index = text == "cuda" ? local_rank : cuda_index(text);
  if (index >= available)
    refuse("names CUDA device " + std::to_string(index) + (text == "cuda" ? " (LOCAL_RANK)" : "") + ", but only " +
           std::to_string(available) + " are visible");
  return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index));
}

torch::Device training_device(const TrainConfig& c, int local_rank) {
  if (c.use_cpu) return torch::kCPU;
  return resolve_device(c.device, local_rank, c.source + ": key 'device'", "device: ");
}

void apply_tf32(const TrainConfig& c, const torch::Device& device) {
  if (!c.tf32 || !device.is_cuda()) return;
  at::globalContext().setAllowTF32CuBLAS(*c.tf32);
  at::globalContext().setAllowTF32CuDNN(*c.tf32);
}

bool pin_batches(const TrainConfig& c, const torch::Device& device) {
  return device.is_cuda() && c.data.dataloader_pin_memory;
}

bool async_save_enabled(const TrainConfig& c, const torch::Device& device) {
  return c.async_save.value_or(device.is_cuda());
}

data::Batch batch_on_device(data::Batch batch, const torch::Device& device) {
  if (device.is_cpu()) return batch;
  auto move = [&](torch::Tensor& t) {  // the loader pinned them already (dataloader_pin_memory), or here
    if (t.defined()) t = model::to_device_without_waiting(t, device);
  };
  for (auto* t : {&batch.input_ids, &batch.labels, &batch.attention_mask, &batch.pixel_values, &batch.has_image}) move(*t);
  return batch;
}

#ifdef LLAVA_HAS_CUDA
DeviceSyncWarnings::DeviceSyncWarnings(bool on, const torch::Device& device) : active_(on && device.is_cuda()) {
  if (active_) c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_WARN);
}
DeviceSyncWarnings::~DeviceSyncWarnings() {
  if (active_) c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED);
}
#else
DeviceSyncWarnings::DeviceSyncWarnings(bool, const torch::Device&) {}
DeviceSyncWarnings::~DeviceSyncWarnings() = default;
#endif

void allreduce_sum(dist::Communicator& comm, torch::Tensor& t) {
  if (comm.world_size() == 1) return;
  auto buffer = t.to(comm.device());
  comm.allreduce(buffer, dist::Reduce::Sum);
  t = buffer.to(t.device());
}

}  // namespace llava::train
