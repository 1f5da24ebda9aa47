#include "data/image.h"

#include <stb/stb_image.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "io/error.h"
#include "io/json_input.h"

namespace llava::data {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;  // PIL's fixed-point weights

double bicubic_filter(double x) {  // Keys cubic, a = -0.5, support 2
  constexpr double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// For each output pixel: the first input pixel it reads, and its fixed-point weights.
struct Coeffs {
  int ksize = 0;
  std::vector<int> first, count;
  std::vector<int32_t> weights;  // [out, ksize]
};

Coeffs precompute_coeffs(int in_size, int out_size) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);  // widen the filter when shrinking (antialiasing)
  const double support = 2.0 * filterscale;
  Coeffs c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.first.resize(out_size);
  c.count.resize(out_size);
  c.weights.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> k(c.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    int xmin = std::max(static_cast<int>(center - support + 0.5), 0);
    int xmax = std::min(static_cast<int>(center + support + 0.5), in_size) - xmin;
    double total = 0.0;
    for (int x = 0; x < xmax; ++x) {
      k[x] = bicubic_filter((x + xmin - center + 0.5) / filterscale);
      total += k[x];
    }
    for (int x = 0; x < xmax; ++x) {
      const double w = total != 0.0 ? k[x] / total : k[x];
      c.weights[static_cast<size_t>(xx) * c.ksize + x] =
          static_cast<int32_t>(w < 0 ? -0.5 + w * (1 << kPrecisionBits) : 0.5 + w * (1 << kPrecisionBits));
    }
    c.first[xx] = xmin;
    c.count[xx] = xmax;
  }
  return c;
}

uint8_t clip8(int64_t v) {
  if (v >= (int64_t(1) << kPrecisionBits << 8)) return 255;
  if (v <= 0) return 0;
  return static_cast<uint8_t>(v >> kPrecisionBits);
}

// One pass along x (stride 3 within a row) or y (stride 3*width).
Image resample_horizontal(const Image& in, int out_w) {
  const Coeffs c = precompute_coeffs(in.width, out_w);
  Image out{out_w, in.height, std::vector<uint8_t>(static_cast<size_t>(out_w) * in.height * 3)};
  for (int y = 0; y < in.height; ++y) {
    const uint8_t* row = &in.rgb[static_cast<size_t>(y) * in.width * 3];
    for (int xx = 0; xx < out_w; ++xx) {
      const int32_t* k = &c.weights[static_cast<size_t>(xx) * c.ksize];
      for (int ch = 0; ch < 3; ++ch) {
        int64_t acc = int64_t(1) << (kPrecisionBits - 1);
        for (int x = 0; x < c.count[xx]; ++x) acc += int64_t(row[(c.first[xx] + x) * 3 + ch]) * k[x];
        out.rgb[(static_cast<size_t>(y) * out_w + xx) * 3 + ch] = clip8(acc);
      }
    }
  }
  return out;
}

Image resample_vertical(const Image& in, int out_h) {
  const Coeffs c = precompute_coeffs(in.height, out_h);
  Image out{in.width, out_h, std::vector<uint8_t>(static_cast<size_t>(in.width) * out_h * 3)};
  const size_t stride = static_cast<size_t>(in.width) * 3;
  for (int yy = 0; yy < out_h; ++yy) {
    const int32_t* k = &c.weights[static_cast<size_t>(yy) * c.ksize];
    for (size_t i = 0; i < stride; ++i) {
      int64_t acc = int64_t(1) << (kPrecisionBits - 1);
      for (int y = 0; y < c.count[yy]; ++y) acc += int64_t(in.rgb[(c.first[yy] + y) * stride + i]) * k[y];
      out.rgb[yy * stride + i] = clip8(acc);
    }
  }
  return out;
}

}  // namespace

// ------------------------------------------------------------------------------------ bounded decoding

ByteBudget::Lease ByteBudget::acquire(uint64_t bytes) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return held_ == 0 || held_ + bytes <= capacity_; });
  held_ += bytes;
  peak_ = std::max(peak_, held_);
  return Lease(this, bytes);
}

void ByteBudget::release(uint64_t bytes) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    held_ -= bytes;
  }
  cv_.notify_all();
}

uint64_t ByteBudget::held() const {
  std::lock_guard<std::mutex> lock(mu_);
  return held_;
}

uint64_t ByteBudget::peak_held() const {
  std::lock_guard<std::mutex> lock(mu_);
  return peak_;
}

ByteBudget& image_budget() {
  static ByteBudget budget(kImageBudgetBytes);
  return budget;
}

namespace {

// What the header says, read without decoding a pixel.
struct ImageHeader {
  int width = 0, height = 0, channels = 0;
  bool sixteen_bit = false;
  int64_t pixels() const { return int64_t(width) * height; }
};

std::string dims(int64_t w, int64_t h) { return std::to_string(w) + "x" + std::to_string(h); }

ImageHeader read_header(const std::string& bytes, const std::string& where) {
  const auto* data = reinterpret_cast<const unsigned char*>(bytes.data());
  const int size = static_cast<int>(bytes.size());  // io::kMaxImageFileBytes fits an int
  ImageHeader h;
  if (!stbi_info_from_memory(data, size, &h.width, &h.height, &h.channels))
    fail(where, std::string("cannot decode image: ") + stbi_failure_reason());
  h.sixteen_bit = stbi_is_16_bit_from_memory(data, size) != 0;
  if (h.width < 1 || h.height < 1) fail(where, "cannot decode image: it has no pixels (" + dims(h.width, h.height) + ")");
  if (h.pixels() > kMaxImagePixels)
    fail(where, "image is " + dims(h.width, h.height) + " = " + std::to_string(h.pixels()) + " pixels, more than the limit of " +
                    std::to_string(kMaxImagePixels) + " (PIL's MAX_IMAGE_PIXELS); refused before decoding");
  return h;
}

// stb's peak while decoding: the inflated/unfiltered source (up to 2 bytes x channels per pixel, twice)
// and the RGB result, plus our copy of it.
uint64_t decode_bytes(const ImageHeader& h) {
  const uint64_t source = uint64_t(h.channels) * (h.sixteen_bit ? 2 : 1);
  return uint64_t(h.pixels()) * (2 * source + 3 + 3);
}

Image decode_pixels(const std::string& bytes, const std::string& where, const ImageHeader& header) {
  int w = 0, h = 0, channels = 0;
  unsigned char* data = stbi_load_from_memory(reinterpret_cast<const unsigned char*>(bytes.data()),
                                              static_cast<int>(bytes.size()), &w, &h, &channels, 3);
  if (!data) fail(where, std::string("cannot decode image: ") + stbi_failure_reason());
  if (w != header.width || h != header.height) {  // never seen; the budget and limit were for the header's size
    stbi_image_free(data);
    fail(where, "cannot decode image: the header says " + dims(header.width, header.height) + ", the pixels are " + dims(w, h));
  }
  Image img{w, h, std::vector<uint8_t>(data, data + static_cast<size_t>(w) * h * 3)};
  stbi_image_free(data);
  return img;
}

// The sizes clip_preprocess goes through for a width x height input: the pad-to-square canvas and the
// shortest-edge resize. Each is refused above kMaxImagePixels (an extreme aspect ratio).
struct PreprocessSizes {
  int64_t canvas_w, canvas_h, resized_w, resized_h;
};

PreprocessSizes preprocess_sizes(int64_t width, int64_t height, const ClipImageConfig& cfg, const std::string& where) {
  PreprocessSizes s{width, height, width, height};
  if (cfg.pad_to_square) s.canvas_w = s.canvas_h = std::max(width, height);
  if (s.canvas_w * s.canvas_h > kMaxImagePixels)
    fail(where, "image is " + dims(width, height) + ": its pad-to-square canvas " + dims(s.canvas_w, s.canvas_h) +
                    " has more than the limit of " + std::to_string(kMaxImagePixels) + " pixels");
  s.resized_w = s.canvas_w, s.resized_h = s.canvas_h;
  if (cfg.do_resize) {
    const bool wide = s.canvas_w >= s.canvas_h;
    const int64_t short_side = wide ? s.canvas_h : s.canvas_w, long_side = wide ? s.canvas_w : s.canvas_h;
    const double new_long = static_cast<double>(cfg.shortest_edge) * long_side / short_side;
    if (new_long * cfg.shortest_edge > static_cast<double>(kMaxImagePixels))
      fail(where, "image is " + dims(width, height) + ": resizing its shortest edge to " + std::to_string(cfg.shortest_edge) +
                      " makes more than the limit of " + std::to_string(kMaxImagePixels) + " pixels (aspect ratio too extreme)");
    (wide ? s.resized_w : s.resized_h) = static_cast<int64_t>(new_long);
    (wide ? s.resized_h : s.resized_w) = cfg.shortest_edge;
  }
  return s;
}

// Every buffer clip_preprocess may hold at once, as an upper bound: its copy of the input, the canvas,
// both resize passes, and the cropped float64 image with its normalized float32 result.
uint64_t preprocess_bytes(const ImageHeader& h, const PreprocessSizes& s, const ClipImageConfig& cfg) {
  const uint64_t rgb = 3;
  return uint64_t(h.pixels()) * rgb + uint64_t(s.canvas_w * s.canvas_h) * rgb + uint64_t(s.resized_w * s.canvas_h) * rgb +
         uint64_t(s.resized_w * s.resized_h) * rgb + uint64_t(cfg.crop_height) * cfg.crop_width * rgb * (8 + 8 + 4);
}

}  // namespace

Image decode_image(const std::string& bytes, const std::string& where) {
  const ImageHeader header = read_header(bytes, where);
  auto lease = image_budget().acquire(decode_bytes(header));
  return decode_pixels(bytes, where, header);
}

Image load_image(const std::string& path) { return decode_image(io::read_input_file(path, io::InputKind::kImage), path); }

torch::Tensor load_clip_pixels(const std::string& path, const ClipImageConfig& cfg) {
  const std::string bytes = io::read_input_file(path, io::InputKind::kImage);
  const ImageHeader header = read_header(bytes, path);
  const PreprocessSizes sizes = preprocess_sizes(header.width, header.height, cfg, path);
  auto lease = image_budget().acquire(decode_bytes(header) + preprocess_bytes(header, sizes, cfg));
  return clip_preprocess(decode_pixels(bytes, path, header), cfg);
}

Image expand_to_square(const Image& img, std::array<uint8_t, 3> fill) {
  if (img.width == img.height) return img;
  const int side = std::max(img.width, img.height);
  const int left = (side - img.width) / 2, top = (side - img.height) / 2;
  Image out{side, side, std::vector<uint8_t>(static_cast<size_t>(side) * side * 3)};
  for (size_t i = 0; i < out.rgb.size(); ++i) out.rgb[i] = fill[i % 3];
  for (int y = 0; y < img.height; ++y)
    std::copy_n(&img.rgb[static_cast<size_t>(y) * img.width * 3], img.width * 3,
                &out.rgb[(static_cast<size_t>(y + top) * side + left) * 3]);
  return out;
}

Image resize_bicubic(const Image& img, int width, int height) {
  Image out = img;
  if (width != img.width) out = resample_horizontal(out, width);
  if (height != img.height) out = resample_vertical(out, height);
  return out;
}

ClipImageConfig read_clip_image_config(const std::string& path) {
  const nlohmann::json j = io::read_json_file(path);
  if (!j.is_object()) fail(path, "expected a JSON object");
  ClipImageConfig cfg;
  // Sizes in pixels: at least 1, at most a side whose square is within kMaxImagePixels.
  auto side = [&](const nlohmann::json& v, const std::string& key) {
    return static_cast<int>(io::json_integer(v, path + ": " + key, 1, 9459));
  };
  auto side_in = [&](const nlohmann::json& v, const char* outer, const char* key) {
    if (!v.is_object() || !v.contains(key)) fail(path, std::string(outer) + ": expected a number or {\"" + key + "\": ...}");
    return side(v[key], std::string(outer) + "." + key);
  };
  try {
    if (j.contains("size")) {  // 336 or {"shortest_edge": 336}
      const auto& s = j["size"];
      cfg.shortest_edge = s.is_number() ? side(s, "size") : side_in(s, "size", "shortest_edge");
    }
    if (j.contains("crop_size")) {  // 336 or {"height": 336, "width": 336}
      const auto& s = j["crop_size"];
      cfg.crop_height = s.is_number() ? side(s, "crop_size") : side_in(s, "crop_size", "height");
      cfg.crop_width = s.is_number() ? side(s, "crop_size") : side_in(s, "crop_size", "width");
    }
    cfg.do_resize = j.value("do_resize", cfg.do_resize);
    cfg.do_center_crop = j.value("do_center_crop", cfg.do_center_crop);
    cfg.do_rescale = j.value("do_rescale", cfg.do_rescale);
    cfg.do_normalize = j.value("do_normalize", cfg.do_normalize);
    cfg.rescale_factor = j.value("rescale_factor", cfg.rescale_factor);
    if (j.contains("image_mean")) cfg.image_mean = j["image_mean"].get<std::array<float, 3>>();
    if (j.contains("image_std")) cfg.image_std = j["image_std"].get<std::array<float, 3>>();
    if (io::json_integer_field(j, "resample", 3, path) != 3) fail(path, "resample: only 3 (bicubic) is supported");
  } catch (const nlohmann::json::exception& e) {
    fail(path, "unexpected value: " + io::json_error_text(e));
  }
  return cfg;
}

torch::Tensor clip_preprocess(const Image& input, const ClipImageConfig& cfg) {
  (void)preprocess_sizes(input.width, input.height, cfg, "image");  // the limits, for callers that decoded themselves
  Image img = input;
  if (cfg.pad_to_square) {
    std::array<uint8_t, 3> fill;  // LLaVA: tuple(int(x*255) for x in image_mean)
    for (int c = 0; c < 3; ++c) fill[c] = static_cast<uint8_t>(static_cast<int>(cfg.image_mean[c] * 255));
    img = expand_to_square(img, fill);
  }
  if (cfg.do_resize) {  // shortest edge -> shortest_edge, long edge truncated like HF
    const bool wide = img.width >= img.height;
    const int short_side = wide ? img.height : img.width, long_side = wide ? img.width : img.height;
    const int new_long = static_cast<int>(static_cast<double>(cfg.shortest_edge) * long_side / short_side);
    img = wide ? resize_bicubic(img, new_long, cfg.shortest_edge) : resize_bicubic(img, cfg.shortest_edge, new_long);
  }
  // [H,W,3] uint8 -> [3,H,W]; cropped while still uint8 (the float64 copy is then only the crop's size:
  // converting is exact, so crop-then-convert equals convert-then-crop).
  torch::Tensor t = torch::from_blob(img.rgb.data(), {img.height, img.width, 3}, torch::kUInt8).permute({2, 0, 1});
  if (cfg.do_center_crop) {  // zero padding where the crop leaves the image, as HF does
    const int top = (img.height - cfg.crop_height) / 2, left = (img.width - cfg.crop_width) / 2;
    torch::Tensor out = torch::zeros({3, cfg.crop_height, cfg.crop_width}, torch::kFloat64);
    const int y0 = std::max(top, 0), x0 = std::max(left, 0);
    const int y1 = std::min(top + cfg.crop_height, img.height), x1 = std::min(left + cfg.crop_width, img.width);
    out.narrow(1, y0 - top, y1 - y0).narrow(2, x0 - left, x1 - x0).copy_(t.narrow(1, y0, y1 - y0).narrow(2, x0, x1 - x0));
    t = out;
  } else {
    t = t.to(torch::kFloat64);
  }
  if (cfg.do_rescale) t = t * cfg.rescale_factor;
  t = t.to(torch::kFloat32);
  if (cfg.do_normalize) {
    auto mean = torch::tensor(std::vector<float>(cfg.image_mean.begin(), cfg.image_mean.end())).view({3, 1, 1});
    auto std = torch::tensor(std::vector<float>(cfg.image_std.begin(), cfg.image_std.end())).view({3, 1, 1});
    t = (t - mean) / std;
  }
  return t.contiguous();
}

}  // namespace llava::data
