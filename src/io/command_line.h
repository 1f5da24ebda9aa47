// Command-line options parsed with cxxopts, its errors in the project's words: every `llava` subcommand
// and llava-run parse through parse_command_line, so "Argument 'abc' failed to parse" reaches the user as
//   llava infer: option --max-new-tokens: expected an integer, got 'abc'
// Header-only: llava-run's launcher stays free of the other io code (and of libtorch).
#pragma once
#include <cxxopts.hpp>
#include <string>
#include <vector>

#include "io/error.h"

namespace llava::io {

namespace command_line_detail {

struct OptionValue {
  std::string name;  // as typed: --max-new-tokens or -n
  std::string value;
};

// Every option of argv with the value given to it (--name=value, --name value, -n value).
inline std::vector<OptionValue> option_values(int argc, const char* const* argv) {
  std::vector<OptionValue> out;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.size() < 2 || arg[0] != '-') continue;
    const size_t eq = arg.find('=');
    if (eq != std::string::npos) out.push_back({arg.substr(0, eq), arg.substr(eq + 1)});
    else if (i + 1 < argc) out.push_back({arg, argv[i + 1]});
  }
  return out;
}

inline bool value_contains(const std::string& value, const std::string& part) {
  if (value == part) return true;
  size_t start = 0;  // a list option (1,2,3) fails on one element
  while (start <= value.size()) {
    size_t end = value.find(',', start);
    if (end == std::string::npos) end = value.size();
    if (value.compare(start, end - start, part) == 0) return true;
    start = end + 1;
  }
  return false;
}

// What the option takes, found by asking cxxopts to parse probe values for it.
inline std::string expected_value(cxxopts::Options& options, const std::string& option) {
  auto parses = [&](const std::string& probe) {
    const std::string arg = option.rfind("--", 0) == 0 ? option + "=" + probe : option + probe;
    const char* argv[] = {"probe", arg.c_str()};
    try {
      options.parse(2, argv);
      return true;
    } catch (const cxxopts::exceptions::exception&) {
      return false;
    }
  };
  if (parses("0.5")) return "a number";
  if (!parses("7")) return parses("true") ? "true or false" : "a valid value (see --help)";
  if (!parses("-7")) return parses("5000000000") ? "an integer >= 0" : "an integer in [0, 4294967295]";
  return parses("5000000000") ? "an integer of at most 64 bits" : "an integer in [-2147483648, 2147483647]";
}

}  // namespace command_line_detail

// options.parse(argc, argv); any cxxopts error becomes one Error naming `program`, the option, the value
// given and what it takes.
inline cxxopts::ParseResult parse_command_line(cxxopts::Options& options, int argc, const char* const* argv,
                                               const std::string& program) {
  using namespace command_line_detail;
  try {
    return options.parse(argc, argv);
  } catch (const cxxopts::exceptions::incorrect_argument_type& e) {
    const std::string message = e.what();
    for (const auto& given : option_values(argc, argv)) {
      const std::string& v = given.value;
      const bool named = message.find(cxxopts::LQUOTE + v + cxxopts::RQUOTE) != std::string::npos;
      bool element = false;  // one element of a list value
      for (size_t q = message.find(cxxopts::LQUOTE); !named && q != std::string::npos; q = std::string::npos) {
        const size_t start = q + cxxopts::LQUOTE.size(), end = message.find(cxxopts::RQUOTE, start);
        if (end != std::string::npos) element = value_contains(v, message.substr(start, end - start));
      }
      if (named || element)
        fail(program, "option " + given.name + ": expected " + expected_value(options, given.name) + ", got '" + v + "'");
    }
    fail(program, message + " (see --help)");
  } catch (const cxxopts::exceptions::exception& e) {
    fail(program, std::string(e.what()) + " (see --help)");
  }
}

// The value of a numeric option, refused outside [min, max] with the same wording.
template <class T>
T option_in_range(const cxxopts::ParseResult& args, const std::string& name, T min, T max, const std::string& program) {
  const T value = args[name].as<T>();
  if (!(value >= min && value <= max)) {  // NaN too
    auto text = [](T x) {
      std::string s = std::to_string(x);  // 0.500000 -> 0.5
      if (s.find('.') != std::string::npos) s.erase(s.find_last_not_of('0') + 1), s.erase(s.find_last_not_of('.') + 1);
      return s;
    };
    fail(program, "option --" + name + ": expected " + (std::is_integral_v<T> ? "an integer" : "a number") + " in [" +
                      text(min) + ", " + text(max) + "], got " + text(value));
  }
  return value;
}

}  // namespace llava::io
