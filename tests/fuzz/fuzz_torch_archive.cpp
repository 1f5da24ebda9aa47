// A whole torch.save file (zip + data.pkl + storages) through load_pt and the `llava inspect` listing.
#include <sstream>

#include "fuzz/fuzz_input.h"
#include "io/inspect.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = llava::fuzz::write_input("fuzz.pt", data, size);
  return llava::fuzz::expect_ok_or_error([&] {
    std::ostringstream listing;
    llava::io::inspect_path(path, listing);
  });
}
