// The disk-full injection (LLAVA_FAULT_WRITE_AFTER_BYTES, read once per process) in the one place every
// writer goes through: a write past the budget fails with ENOSPC, names the file, leaves no temp file and
// never touches the file it would have replaced. One test case: the budget is per process.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <filesystem>

#include "io/error.h"
#include "io/file_util.h"
#include "io/safetensors.h"
#include "io/torch_archive.h"
#include "io/test_helpers.h"

namespace fs = std::filesystem;
using namespace llava;

TEST_CASE("writes past LLAVA_FAULT_WRITE_AFTER_BYTES fail like a full disk and leave old files intact") {
  ::setenv("LLAVA_FAULT_WRITE_AFTER_BYTES", "4096", 1);  // before this process's first write
  const std::string dir = test::temp_dir("write-fault");
  const std::string st = dir + "/small.safetensors", pt = dir + "/state.pt", text = dir + "/notes.txt";

  io::save_safetensors(st, {{"w", torch::ones({4, 4})}});  // 64 data bytes + header: within the budget
  io::write_file_atomic(text, std::string(1000, 'x'));
  const auto st_size = fs::file_size(st);

  // 8 KB of tensor data cannot fit in the ~2.9 KB left: each writer reports the file and ENOSPC.
  auto big = torch::arange(2048, torch::kFloat32);
  CHECK_THROWS_WITH(io::save_pt(pt, c10::IValue(big)), Catch::Contains(pt) && Catch::Contains("No space left on device"));
  CHECK_THROWS_WITH(io::save_safetensors(st, {{"w", big}}), Catch::Contains(st) && Catch::Contains("No space left on device"));
  CHECK_THROWS_WITH(io::write_file_atomic(text, std::string(5000, 'y')),
                    Catch::Contains(text) && Catch::Contains("No space left on device"));

  // The files written before are what they were; nothing else is in the folder (no temp files).
  CHECK(fs::file_size(st) == st_size);
  CHECK(io::SafetensorsFile::open(st).get("w").equal(torch::ones({4, 4})));
  CHECK(io::read_file(text) == std::string(1000, 'x'));
  size_t entries = 0;
  for (auto& e : fs::directory_iterator(dir)) entries += (void(e), 1);
  CHECK(entries == 2);
}
