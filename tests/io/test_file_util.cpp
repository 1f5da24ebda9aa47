// write_file_atomic's sink: bytes collect in 16 MiB aligned chunks that go out with O_DIRECT, and the tail
// that is not whole 4 KiB blocks goes through the page cache. Whatever the sizes and the mix of small and
// large writes, the file must hold exactly the bytes written, in order.
#include <catch2/catch.hpp>

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "io/file_util.h"
#include "io/test_helpers.h"

using namespace llava;

namespace {

constexpr size_t kMiB = 1u << 20;

std::string random_bytes(size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::string bytes(n, '\0');
  for (auto& b : bytes) b = static_cast<char>(gen());
  return bytes;
}

}  // namespace

TEST_CASE("write_file_atomic keeps every byte at chunk and block boundaries") {
  const std::string dir = test::temp_dir("file-util");
  // Around the 4 KiB block and the 16 MiB chunk: empty, sub-block, whole blocks, whole chunks, and beyond.
  for (size_t size : {size_t{0}, size_t{1}, size_t{4095}, size_t{4096}, size_t{4097}, 16 * kMiB - 1, 16 * kMiB,
                      16 * kMiB + 1, 33 * kMiB + 4096 + 7}) {
    const std::string bytes = random_bytes(size, static_cast<unsigned>(size));
    const std::string path = dir + "/one-write-" + std::to_string(size);
    io::write_file_atomic(path, bytes);
    CHECK(io::read_file(path) == bytes);
  }
}

TEST_CASE("write_file_atomic keeps the order of many small and large writes") {
  const std::string dir = test::temp_dir("file-util-mixed");
  // What a torch.save archive looks like to the sink: tiny headers between large records.
  const std::vector<size_t> pieces = {30, 6, 64, 5 * kMiB + 3, 1, 11 * kMiB + 4093, 17, 20 * kMiB, 2, 4096};
  std::string expected;
  unsigned seed = 1;
  const std::string path = dir + "/mixed.bin";
  io::write_file_atomic(path, [&](std::FILE* f) {
    for (size_t n : pieces) {
      const std::string piece = random_bytes(n, seed++);
      REQUIRE(std::fwrite(piece.data(), 1, piece.size(), f) == piece.size());
      expected += piece;
    }
  });
  CHECK(io::read_file(path) == expected);
  // Rewriting replaces the file whole, shorter this time.
  io::write_file_atomic(path, std::string("short"));
  CHECK(io::read_file(path) == "short");
}
