// Image decoding (stb_image) and CLIP preprocessing with PIL's resampling semantics.
#pragma once
#include <array>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace llava::data {

struct Image {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // [H,W,3] row-major
};

// PIL's Image.MAX_IMAGE_PIXELS (1024^3 / 4 / 3, its decompression-bomb threshold): an image with more
// pixels is refused from its header, before anything is decoded, and so is a pad-to-square canvas or a
// shortest-edge resize (an extreme aspect ratio) that would have more.
constexpr int64_t kMaxImagePixels = 89'478'485;

// Decoded pixels in flight in this process (every loader worker, every thread) are bounded by this many
// bytes: each image's decode + preprocessing takes its estimated peak from the budget before it starts and
// gives it back when done. One image above the budget still runs, alone.
constexpr uint64_t kImageBudgetBytes = 2ull << 30;

// A counting budget of bytes shared by threads.
class ByteBudget {
 public:
  explicit ByteBudget(uint64_t capacity) : capacity_(capacity) {}
  ByteBudget(const ByteBudget&) = delete;
  ByteBudget& operator=(const ByteBudget&) = delete;

  class Lease {
   public:
    Lease(ByteBudget* budget, uint64_t bytes) : budget_(budget), bytes_(bytes) {}
    Lease(Lease&& other) noexcept : budget_(other.budget_), bytes_(other.bytes_) { other.budget_ = nullptr; }
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    Lease& operator=(Lease&&) = delete;
    ~Lease() {
      if (budget_) budget_->release(bytes_);
    }

   private:
    ByteBudget* budget_;
    uint64_t bytes_;
  };

  // Blocks until `bytes` fit beside what others hold; a request larger than the whole budget waits until
  // nothing is held and then holds it alone. So at most max(capacity, the largest request) is ever held.
  Lease acquire(uint64_t bytes);
  uint64_t capacity() const { return capacity_; }
  uint64_t held() const;
  uint64_t peak_held() const;  // the most ever held at once (tests)

 private:
  void release(uint64_t bytes);
  const uint64_t capacity_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  uint64_t held_ = 0, peak_ = 0;
};

// The process-wide budget of decoded image bytes (kImageBudgetBytes).
ByteBudget& image_budget();

// JPEG/PNG/... -> RGB (gray replicated, alpha dropped like PIL's convert("RGB")). Error names the file (and
// its dimensions when they are over kMaxImagePixels). The file is read with io::read_input_file(kImage);
// the decode holds its bytes from image_budget().
Image load_image(const std::string& path);
Image decode_image(const std::string& bytes, const std::string& where);

// LLaVA's expand2square: the image pasted centered on a square canvas of `fill`.
Image expand_to_square(const Image& img, std::array<uint8_t, 3> fill);

// PIL's Image.resize(BICUBIC): separable, antialiased (support scaled by the downscale factor), 22-bit
// fixed-point weights, horizontal pass first with a uint8 intermediate.
Image resize_bicubic(const Image& img, int width, int height);

// The CLIPImageProcessor settings we use (preprocessor_config.json names).
struct ClipImageConfig {
  int shortest_edge = 336;
  int crop_height = 336, crop_width = 336;
  bool do_resize = true, do_center_crop = true, do_rescale = true, do_normalize = true;
  double rescale_factor = 1.0 / 255.0;
  std::array<float, 3> image_mean{0.48145466f, 0.4578275f, 0.40821073f};
  std::array<float, 3> image_std{0.26862954f, 0.26130258f, 0.27577711f};
  bool pad_to_square = false;  // LLaVA's image_aspect_ratio: pad
};

// Reads `path` (a preprocessor_config.json); keys that are absent keep the CLIP-336 defaults.
ClipImageConfig read_clip_image_config(const std::string& path);

// Resize shortest edge, center crop, rescale, normalize -> [3,crop_h,crop_w] float32. Error when the
// pad-to-square canvas or the resized image would exceed kMaxImagePixels.
torch::Tensor clip_preprocess(const Image& img, const ClipImageConfig& cfg);

// load_image + clip_preprocess under one lease of image_budget() that covers the decode and every
// intermediate image: what the data loader's workers and `llava infer --image` use.
torch::Tensor load_clip_pixels(const std::string& path, const ClipImageConfig& cfg);

}  // namespace llava::data
