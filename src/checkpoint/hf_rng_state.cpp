#include "checkpoint/hf_rng_state.h"

#include <filesystem>
#include <mutex>

#include <ATen/CPUGeneratorImpl.h>

#include "io/error.h"
#include "io/torch_archive.h"

namespace llava::checkpoint {

std::optional<torch::Tensor> read_hf_cpu_rng_state(const std::string& dir, int rank) {
  namespace fs = std::filesystem;
  std::string path;
  for (const std::string name : {"rng_state_" + std::to_string(rank) + ".pth", std::string("rng_state.pth"),
                                 std::string("rng_state_0.pth")})
    if (path.empty() && fs::is_regular_file(fs::path(dir) / name)) path = (fs::path(dir) / name).string();
  if (path.empty()) return std::nullopt;
  const auto value = io::load_pt(path, io::pickle::Globals::kDeepSpeed);  // NumPy's state needs its globals
  if (!value.isGenericDict()) fail(path, "expected a dict {python, numpy, cpu, ...}");
  auto dict = value.toGenericDict();
  auto it = dict.find("cpu");
  if (it == dict.end()) fail(path, "no 'cpu' (torch.get_rng_state()) entry");
  if (!it->value().isTensor() || it->value().toTensor().scalar_type() != torch::kUInt8 || it->value().toTensor().dim() != 1)
    fail(path, "'cpu' must be a 1-D uint8 tensor (torch.get_rng_state())");
  const auto state = it->value().toTensor().contiguous();
  auto generator = at::detail::getDefaultCPUGenerator();
  int64_t expected = 0;
  {
    std::lock_guard<std::mutex> lock(generator.mutex());
    expected = generator.get_state().numel();
  }
  if (state.numel() != expected)
    fail(path, "'cpu' holds " + std::to_string(state.numel()) + " bytes, torch.get_rng_state() has " +
                   std::to_string(expected));
  return state.clone();
}

}  // namespace llava::checkpoint
