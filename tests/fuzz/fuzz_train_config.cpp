// The YAML training config: every key's type and range checks and the combination checks.
#include "fuzz/fuzz_input.h"
#include "train/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = llava::fuzz::write_input("train.yaml", data, size);
  return llava::fuzz::expect_ok_or_error([&] { llava::train::load_train_config(path); });
}
