// The HF-style log line prints floats as Python's repr does (expected strings are Python 3.11's repr).
#include <catch2/catch.hpp>

#include "train/trainer.h"

using llava::train::format_float;

TEST_CASE("format_float prints what Python's repr prints") {
  const std::vector<std::pair<double, std::string>> cases = {
      {0.0, "0.0"},           {5e-05, "5e-05"},
      {0.0001, "0.0001"},     {2.5, "2.5"},
      {100.0, "100.0"},       {1e16, "1e+16"},
      {1.2345e15, "1234500000000000.0"},
      {6.524446964263916, "6.524446964263916"},
      {0.0003806023374435663, "0.0003806023374435663"},
      {-1.5e-07, "-1.5e-07"}, {123456789.125, "123456789.125"},
      {1.0 / 3.0, "0.3333333333333333"}, {2e-4, "0.0002"}};
  for (auto& [x, want] : cases) {
    INFO(want);
    CHECK(format_float(x) == want);
  }
}
