// Shared by the libFuzzer targets: the parsers under test read files by path, so each input is written to
// a scratch directory first. A target's contract: for any bytes, the parser returns or throws
// llava::Error. Anything else (another exception, a crash, a sanitizer report, a hang) is a finding.
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "io/error.h"

namespace llava::fuzz {

// $FUZZ_TMP (scripts/fuzz.sh points it at build-fuzz/) or /tmp; one folder per process.
inline const std::string& scratch_dir() {
  static const std::string dir = [] {
    const char* root = std::getenv("FUZZ_TMP");
    auto d = std::filesystem::path(root ? root : "/tmp") / ("llava-fuzz-" + std::to_string(::getpid()));
    std::filesystem::create_directories(d);
    return d.string();
  }();
  return dir;
}

inline std::string write_input(const std::string& name, const uint8_t* data, size_t size) {
  const std::string path = scratch_dir() + "/" + name;
  std::ofstream(path, std::ios::binary | std::ios::trunc).write(reinterpret_cast<const char*>(data), size);
  return path;
}

// Runs `body`; llava::Error is the expected way to refuse bad input, everything else escapes to libFuzzer.
template <class F>
int expect_ok_or_error(F&& body) {
  try {
    body();
  } catch (const llava::Error&) {
  }
  return 0;
}

}  // namespace llava::fuzz
