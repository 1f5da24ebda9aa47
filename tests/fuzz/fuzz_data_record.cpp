// LLaVA data files: a JSON list of records or JSONL, each {id, image, conversations: [{from, value}]}.
#include "data/dataset.h"
#include "fuzz/fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = llava::fuzz::write_input("data.json", data, size);
  return llava::fuzz::expect_ok_or_error([&] {
    for (auto& record : llava::data::load_records({path}))
      if (record.turns.empty() || record.where.empty()) __builtin_trap();  // load_records promises both
  });
}
