// Bounded images: an image over kMaxImagePixels is refused from its header (before stb allocates
// anything), so is a canvas or resize that an extreme aspect ratio would blow up; and the byte budget
// that every decode takes from never lets the bytes held at once exceed max(capacity, one request).
#include <catch2/catch.hpp>

#include <stb/stb_image_write.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "data/image.h"
#include "io/error.h"
#include "io/file_util.h"
#include "io/test_helpers.h"

using namespace llava;
using Catch::Matchers::Contains;
using test::error_of;

namespace {

// A valid PNG of w x h gray pixels (tiny on disk when constant).
std::string png(int w, int h) {
  std::vector<uint8_t> pixels(static_cast<size_t>(w) * h, 128);
  std::string out;
  stbi_write_png_to_func([](void* ctx, void* data, int size) { static_cast<std::string*>(ctx)->append(static_cast<char*>(data), size); },
                         &out, w, h, 1, pixels.data(), w);
  return out;
}

// Only the signature and IHDR of a w x h RGB PNG: what the header check reads.
std::string png_header(uint32_t w, uint32_t h) {
  std::string ihdr = "IHDR";
  for (uint32_t v : {w, h})
    for (int shift : {24, 16, 8, 0}) ihdr += static_cast<char>((v >> shift) & 0xff);
  ihdr += std::string("\x08\x02\x00\x00\x00", 5);
  return std::string("\x89PNG\r\n\x1a\n", 8) + std::string("\x00\x00\x00\x0d", 4) + ihdr + std::string(4, '\0');
}

}  // namespace

TEST_CASE("an image over PIL's pixel limit is refused from its header, naming the file and its size") {
  const std::string dir = test::temp_dir("image-bounds");
  for (auto [w, h] : {std::pair<uint32_t, uint32_t>{18900, 18900}, {100000, 1000}, {9460, 9460}}) {
    const std::string path = dir + "/big.png";
    test::write_bytes(path, png_header(w, h));
    const std::string msg = error_of([&] { data::load_image(path); });
    CHECK_THAT(msg, Contains(path) && Contains(std::to_string(w) + "x" + std::to_string(h)) && Contains("89478485"));
    CHECK(data::image_budget().held() == 0);
  }
}

TEST_CASE("an extreme aspect ratio is refused before its canvas or resize is made") {
  const std::string dir = test::temp_dir("image-aspect");
  const std::string path = dir + "/strip.png";
  test::write_bytes(path, png(20000, 1));  // 20000 pixels: fine to decode
  data::ClipImageConfig cfg;  // shortest edge 336: 6.7M x 336 after the resize
  CHECK_THAT(error_of([&] { data::load_clip_pixels(path, cfg); }),
             Contains(path) && Contains("20000x1") && Contains("aspect ratio"));
  cfg.pad_to_square = true;  // 20000 x 20000 canvas
  CHECK_THAT(error_of([&] { data::load_clip_pixels(path, cfg); }), Contains("pad-to-square canvas 20000x20000"));
  test::write_bytes(path, png(40, 30));
  const auto pixels = data::load_clip_pixels(path, cfg);
  CHECK(pixels.sizes() == torch::IntArrayRef({3, 336, 336}));
  CHECK(data::image_budget().held() == 0);
}

TEST_CASE("ByteBudget holds at most its capacity, or one larger request alone") {
  data::ByteBudget budget(100);
  std::atomic<int> inside{0};
  std::atomic<int> most_inside{0};
  auto worker = [&](uint64_t bytes) {
    for (int i = 0; i < 20; ++i) {
      auto lease = budget.acquire(bytes);
      const int now = ++inside;
      int seen = most_inside.load();
      while (now > seen && !most_inside.compare_exchange_weak(seen, now)) {}
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      --inside;
    }
  };
  {
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) threads.emplace_back(worker, 60);  // two never fit together
    for (auto& t : threads) t.join();
  }
  CHECK(budget.peak_held() == 60);
  CHECK(most_inside == 1);
  CHECK(budget.held() == 0);
  {
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) threads.emplace_back(worker, 30);  // three fit at once
    threads.emplace_back(worker, 250);                               // runs alone
    for (auto& t : threads) t.join();
  }
  CHECK(budget.peak_held() == 250);
  CHECK(budget.held() == 0);
}
