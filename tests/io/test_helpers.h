// Temp files and error capture for tests.
#pragma once
#include <catch2/catch.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <unistd.h>

#include "io/error.h"

namespace llava::test {

// A fresh directory under $LLAVA_TEST_TMP (or /tmp) for one test case.
inline std::string temp_dir(const std::string& name) {
  const char* root = std::getenv("LLAVA_TEST_TMP");
  auto dir = std::filesystem::path(root ? root : "/tmp") / ("llava-" + name + "-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
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
