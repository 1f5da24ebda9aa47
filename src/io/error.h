// The one error type of the project: its message names the file/key/record and the fault.
#pragma once
#include <stdexcept>
#include <string>

namespace llava {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Throws Error("<where>: <what>").
[[noreturn]] inline void fail(const std::string& where, const std::string& what) {
  throw Error(where + ": " + what);
}

}  // namespace llava
