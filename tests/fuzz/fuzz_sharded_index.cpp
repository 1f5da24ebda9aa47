// model.safetensors.index.json next to two valid shards: the index may name any file, tensor or shape.
#include <torch/torch.h>

#include "fuzz/fuzz_input.h"
#include "io/safetensors.h"

namespace {

// The shards an index could point at, written once per process.
const std::string& checkpoint_dir() {
  static const std::string dir = [] {
    const std::string d = llava::fuzz::scratch_dir() + "/sharded";
    std::filesystem::create_directories(d);
    llava::io::save_safetensors(d + "/model-00001-of-00002.safetensors",
                                {{"a", torch::arange(6, torch::kFloat32).view({2, 3})}, {"b", torch::ones({4}, torch::kInt64)}});
    llava::io::save_safetensors(d + "/model-00002-of-00002.safetensors", {{"c", torch::zeros({3}, torch::kBFloat16)}});
    return d;
  }();
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string index = checkpoint_dir() + "/model.safetensors.index.json";
  std::ofstream(index, std::ios::binary | std::ios::trunc).write(reinterpret_cast<const char*>(data), size);
  return llava::fuzz::expect_ok_or_error([&] {
    auto model = llava::io::ShardedSafetensors::open(checkpoint_dir());
    for (auto& name : model.names()) {
      auto t = model.get(name);
      if (t.numel() != static_cast<int64_t>(model.info(name).end - model.info(name).begin) / t.element_size())
        __builtin_trap();  // a view that disagrees with its header entry
    }
  });
}
