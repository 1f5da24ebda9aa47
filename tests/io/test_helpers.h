// Temp files and error capture for tests.
#pragma once
#include <catch2/catch.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <unistd.h>
#include <vector>

#include "io/error.h"

namespace llava::test {

// The temp directories this test process made, removed when it exits: every test run used to leave its
// directories in /tmp (some of 80 MB), and repeated runs filled the disk.
class TempDirs {
 public:
  ~TempDirs() {
    std::error_code ignored;
    for (const auto& dir : dirs_) std::filesystem::remove_all(dir, ignored);
  }
  void add(const std::filesystem::path& dir) { dirs_.push_back(dir); }

 private:
  std::vector<std::filesystem::path> dirs_;
};

inline TempDirs& temp_dirs() {
  static TempDirs dirs;
  return dirs;
}

// A fresh directory under $LLAVA_TEST_TMP (or /tmp) for one test case, removed when the process exits.
inline std::string temp_dir(const std::string& name) {
  const char* root = std::getenv("LLAVA_TEST_TMP");
  auto dir = std::filesystem::path(root ? root : "/tmp") / ("llava-" + name + "-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  temp_dirs().add(dir);
  return dir.string();
}

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

// The message of the llava::Error that `body` throws; fails the test when it throws none.
inline std::string error_of(const std::function<void()>& body) {
  try {
    body();
  } catch (const Error& e) {
    return e.what();
  }
  FAIL("expected llava::Error");
  return "";
}

}  // namespace llava::test
