// safetensors header + offsets: SafetensorsFile::open validates, then every tensor view is read in full.
#include <torch/torch.h>

#include "fuzz/fuzz_input.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = llava::fuzz::write_input("fuzz.safetensors", data, size);
  return llava::fuzz::expect_ok_or_error([&] {
    auto file = llava::io::SafetensorsFile::open(path);
    uint64_t checksum = 0;
    for (auto& info : file.tensors()) {
      auto bytes = file.get(info.name).contiguous().reshape({-1}).view(torch::kUInt8);  // [nbytes]
      const uint8_t* p = bytes.data_ptr<uint8_t>();
      for (int64_t i = 0; i < bytes.numel(); ++i) checksum += p[i];  // every byte the header claims
    }
    for (auto& [key, value] : file.metadata()) checksum += key.size() + value.size();
    (void)checksum;
  });
}
