#include "data/shapes.h"

#include <algorithm>
#include <cmath>

#include <nlohmann/json.hpp>
#include <stb/stb_image_write.h>
#include <torch/torch.h>

#include "io/error.h"
#include "io/file_util.h"

namespace llava::data::shapes {

namespace {

int64_t draw_index(int64_t n) { return torch::randint(n, {1}, torch::kInt64).item<int64_t>(); }
double draw_uniform(double lo, double hi) { return lo + (hi - lo) * torch::rand({1}, torch::kFloat64).item<double>(); }

template <typename T>
const T& pick(const std::vector<T>& options) {
  return options[draw_index(static_cast<int64_t>(options.size()))];
}

// Colors far apart in RGB, so each stays recognizable after the per-image jitter.
const std::vector<std::array<int, 3>>& base_colors() {
  static const std::vector<std::array<int, 3>> rgb = {
      {220, 40, 40}, {40, 170, 60}, {40, 80, 220}, {230, 210, 40}, {150, 60, 190}};
  return rgb;
}

// Whether a point (pixel units, origin top left) lies inside the shape.
bool inside(const Scene& s, double x, double y) {
  const double dx = x - s.center_x, dy = y - s.center_y, r = s.radius;
  switch (s.shape) {
    case 0: return dx * dx + dy * dy <= r * r;                              // circle
    case 1: return std::abs(dx) <= 0.85 * r && std::abs(dy) <= 0.85 * r;   // square (about the circle's area)
    default: return dy >= -r && dy <= r && std::abs(dx) <= (dy + r) / 2;   // triangle, apex up, base 2r
  }
}

std::string fill_in(std::string text, const Scene& s) {
  auto replace = [&](const std::string& key, const std::string& value) {
    for (size_t at; (at = text.find(key)) != std::string::npos;) text.replace(at, key.size(), value);
  };
  replace("{color}", color_names()[s.color]);
  replace("{shape}", shape_names()[s.shape]);
  replace("{position}", position_names()[s.position]);
  return text;
}

nlohmann::json record(const std::string& id, const std::string& image, const std::string& human, const std::string& gpt) {
  return {{"id", id},
          {"image", image},
          {"conversations", nlohmann::json::array({{{"from", "human"}, {"value", human}}, {{"from", "gpt"}, {"value", gpt}}})}};
}

}  // namespace

const std::vector<std::string>& color_names() {
  static const std::vector<std::string> names = {"red", "green", "blue", "yellow", "purple"};
  return names;
}

const std::vector<std::string>& shape_names() {
  static const std::vector<std::string> names = {"circle", "square", "triangle"};
  return names;
}

const std::vector<std::string>& position_names() {
  static const std::vector<std::string> names = {"top left", "top right", "bottom left", "bottom right"};
  return names;
}

Scene random_scene(int image_size) {
  Scene s;
  s.color = static_cast<int>(draw_index(static_cast<int64_t>(color_names().size())));
  s.shape = static_cast<int>(draw_index(static_cast<int64_t>(shape_names().size())));
  s.position = static_cast<int>(draw_index(static_cast<int64_t>(position_names().size())));
  const double quadrant = image_size / 2.0;
  s.radius = quadrant * draw_uniform(0.32, 0.45);
  const double slack = std::max(0.0, quadrant / 2 - s.radius - 0.5);  // keeps the shape inside its quadrant
  s.center_x = quadrant * (s.position % 2 + 0.5) + draw_uniform(-slack, slack);
  s.center_y = quadrant * (s.position / 2 + 0.5) + draw_uniform(-slack, slack);
  const auto& rgb = base_colors()[s.color];
  for (int c = 0; c < 3; ++c) s.fill[c] = static_cast<uint8_t>(std::clamp<int64_t>(rgb[c] + draw_index(41) - 20, 0, 255));
  const int64_t gray = 200 + draw_index(56);
  for (int c = 0; c < 3; ++c) s.background[c] = static_cast<uint8_t>(std::clamp<int64_t>(gray + draw_index(11) - 5, 0, 255));
  return s;
}

Image draw(const Scene& scene, int image_size) {
  constexpr int kSamples = 4;  // per axis: edge pixels blend by covered fraction
  Image img{image_size, image_size, std::vector<uint8_t>(static_cast<size_t>(image_size) * image_size * 3)};
  for (int y = 0; y < image_size; ++y)
    for (int x = 0; x < image_size; ++x) {
      int hits = 0;
      for (int sy = 0; sy < kSamples; ++sy)
        for (int sx = 0; sx < kSamples; ++sx)
          hits += inside(scene, x + (sx + 0.5) / kSamples, y + (sy + 0.5) / kSamples);
      const double a = static_cast<double>(hits) / (kSamples * kSamples);
      for (int c = 0; c < 3; ++c)
        img.rgb[(static_cast<size_t>(y) * image_size + x) * 3 + c] =
            static_cast<uint8_t>(std::lround(a * scene.fill[c] + (1 - a) * scene.background[c]));
    }
  return img;
}

void write_png(const std::string& path, const Image& image) {
  std::string bytes;
  auto append = [](void* context, void* data, int size) {
    static_cast<std::string*>(context)->append(static_cast<const char*>(data), size);
  };
  if (!stbi_write_png_to_func(append, &bytes, image.width, image.height, 3, image.rgb.data(), image.width * 3))
    fail(path, "PNG encoding failed");
  io::write_file_atomic(path, bytes);
}

std::string random_caption(const Scene& scene) {
  static const std::vector<std::string> templates = {
      "a {color} {shape} in the {position}", "a {color} {shape} in the {position} corner",
      "the {position} of the picture shows a {color} {shape}"};
  return fill_in(pick(templates), scene);
}

std::vector<Question> random_questions(const Scene& scene) {
  static const std::vector<std::string> color = {"What color is the shape?", "What is the color of the {shape}?"};
  static const std::vector<std::string> shape = {"What shape is in the image?", "What shape is the {color} object?"};
  static const std::vector<std::string> position = {"Where is the shape?", "Where is the {color} {shape}?"};
  return {{"color", fill_in(pick(color), scene), color_names()[scene.color]},
          {"shape", fill_in(pick(shape), scene), shape_names()[scene.shape]},
          {"position", fill_in(pick(position), scene), position_names()[scene.position]}};
}

nlohmann::json caption_record(const std::string& id, const std::string& image, const std::string& caption) {
  return record(id, image, "<image>", caption);  // LLaVA's pretraining records: the image alone, then the caption
}

nlohmann::json question_record(const std::string& id, const std::string& image, const Question& q) {
  return record(id, image, "<image>\n" + q.text, q.answer);
}

}  // namespace llava::data::shapes
