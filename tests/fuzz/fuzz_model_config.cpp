// A model dir's config.json (HF LlavaConfig or the original LLaVA dialect), and the sizes derived from it.
#include "fuzz/fuzz_input.h"
#include "model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string dir = llava::fuzz::scratch_dir() + "/model";
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/config.json", std::ios::binary | std::ios::trunc).write(reinterpret_cast<const char*>(data), size);
  return llava::fuzz::expect_ok_or_error([&] {
    auto config = llava::model::load_config(dir);
    (void)config.image_seq_length();
    (void)config.projector_in_features();
  });
}
