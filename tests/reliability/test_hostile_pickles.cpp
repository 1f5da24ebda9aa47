// Regression tests for the pickles fuzzing turned up (tests/fuzz/corpus/pickle/regress-*): before the
// reader bounded nesting and sharing, each crashed `llava inspect` (stack overflow) or never finished.
#include <catch2/catch.hpp>

#include "io/error.h"
#include "io/pickle.h"

using namespace llava::io;
using namespace std::string_literals;  // the pickles hold NUL bytes

namespace {

c10::IValue load(const std::string& bytes) {
  auto no_storage = [](const pickle::StorageRef&) -> torch::Tensor { throw llava::Error("no storages here"); };
  return pickle::loads(bytes, no_storage, "x.pt");
}

std::string repeat(const std::string& s, size_t n) {
  std::string out;
  for (size_t i = 0; i < n; ++i) out += s;
  return out;
}

}  // namespace

TEST_CASE("cyclic, over-deep and exponentially shared pickles are refused with a clear error") {
  const std::string proto = "\x80\x02"s;
  // {} memoized, then d['a'] = d
  CHECK_THROWS_WITH(load(proto + "}q\x00X\x01\x00\x00\x00" "ah\x00s."s), Catch::Contains("x.pt: data.pkl") && Catch::Contains("cyclic"));
  // [] memoized, then l.append(l)
  CHECK_THROWS_WITH(load(proto + "]q\x00h\x00" "a."s), Catch::Contains("cyclic"));
  // 100000 nested 1-tuples and 50000 nested lists
  CHECK_THROWS_WITH(load(proto + "N" + repeat("\x85", 100000) + "."), Catch::Contains("nest deeper than 64 levels"));
  CHECK_THROWS_WITH(load(proto + repeat("]", 50000) + repeat("a", 49999) + "."), Catch::Contains("nest deeper than 64 levels"));
  // A raw tuple (it holds a global) paired with itself 40 times: 2^40 items if copies were deep. Refused
  // quickly, at the nesting limit or for the malformed stack it leaves.
  const std::string doubling = proto + "ctorch\nFloatStorage\n\x85q\x00"s + repeat("h\x00h\x00\x86q\x00"s, 40) + "0N.";
  CHECK_THROWS_AS(load(doubling), llava::Error);
}

TEST_CASE("nesting up to the limit and shared sub-values still load") {
  const std::string proto = "\x80\x02"s;
  auto v = load(proto + "N" + repeat("\x85", 63) + ".");  // 63 nested tuples
  int depth = 0;
  while (v.isTuple()) v = v.toTupleRef().elements()[0], ++depth;
  CHECK(depth == 63);
  // [x, x] where x = [1] is the same list twice (memo): fine, it is not changed after being shared.
  auto shared = load(proto + "]q\x00(]q\x01K\x01" "ah\x01" "e."s);
  REQUIRE(shared.isList());
  CHECK(shared.toList().size() == 2);
}
