// Where training runs: the `device` config key resolved against this machine and build, and the moves
// that put batches there. Every path compiles in a CPU-only libtorch too: CUDA is asked for at run time
// (torch::cuda::is_available()), so a CPU build refuses `device: cuda` with a clear error instead of
// lacking the code. On the CPU every helper here is the identity (no copy, no pinning).
#pragma once
#include <torch/torch.h>

#include "data/loader.h"
#include "distributed/communicator.h"
#include "train/config.h"

namespace llava::train {

// device: auto -> cuda:LOCAL_RANK when CUDA is available, else cpu; cpu (or use_cpu: true); cuda ->
// cuda:LOCAL_RANK; cuda:N. A CUDA device this build or machine does not have: one llava::Error naming
// the config file and the key (called before anything is written).
torch::Device training_device(const TrainConfig& c, int local_rank);

// The same for any tool: `text` is auto | cpu | cuda | cuda:N; `where` starts every error line (e.g.
// "eval-logits --device"), which names the text and why it cannot be had here, and suggests
// `setting` + "cpu" (e.g. "--device cpu").
torch::Device resolve_device(const std::string& text, int local_rank, const std::string& where,
                             const std::string& setting);

// HF's tf32 on a CUDA device: allow (or forbid) TF32 in cuBLAS fp32 matmuls and in cuDNN, as
// TrainingArguments(tf32=...) sets torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32.
// Unset, or on the CPU: nothing changes.
void apply_tf32(const TrainConfig& c, const torch::Device& device);

// Whether the loader puts batches in page-locked memory (HF's dataloader_pin_memory, default true): only for
// a CUDA device, which is the only one that copies from it without waiting.
bool pin_batches(const TrainConfig& c, const torch::Device& device);

// async_save as set, else on for CUDA and off for the CPU.
bool async_save_enabled(const TrainConfig& c, const torch::Device& device);

// The batch's tensors on `device`: through page-locked host memory, copied without waiting (the copy
// overlaps whatever the device still runs), when the device is CUDA; the batch itself on the CPU.
data::Batch batch_on_device(data::Batch batch, const torch::Device& device);

// While it lives (and `on`, and the device is CUDA), every CUDA operation that makes the host wait for the
// device prints a warning "called a synchronizing CUDA operation": c10's sync debug mode, Python's
// torch.cuda.set_sync_debug_mode("warn"). `llava train --warn-device-syncs` puts it around each
// micro-batch's forward and backward, where nothing should wait (scripts/gpu-check.sh counts the lines).
// Nothing on the CPU, nor in a build without CUDA (which cannot have a CUDA device).
class DeviceSyncWarnings {
 public:
  DeviceSyncWarnings(bool on, const torch::Device& device);
  ~DeviceSyncWarnings();
  DeviceSyncWarnings(const DeviceSyncWarnings&) = delete;
  DeviceSyncWarnings& operator=(const DeviceSyncWarnings&) = delete;

 private:
  bool active_ = false;
};

// Sums `t` over the ranks. The backend takes its buffers on the communicator's device (NCCL: the CUDA
// device only), so a host tensor makes the trip there and back; on the CPU this is the plain all-reduce.
void allreduce_sum(dist::Communicator& comm, torch::Tensor& t);

}  // namespace llava::train
