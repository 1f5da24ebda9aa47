// Image decoding (stb_image) and CLIP preprocessing with PIL's resampling semantics.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace llava::data {

struct Image {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // [H,W,3] row-major
};

// JPEG/PNG/... -> RGB (gray replicated, alpha dropped like PIL's convert("RGB")). Error names the file.
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

// Resize shortest edge, center crop, rescale, normalize -> [3,crop_h,crop_w] float32.
torch::Tensor clip_preprocess(const Image& img, const ClipImageConfig& cfg);

}  // namespace llava::data
