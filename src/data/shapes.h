// A synthetic image-caption / question-answer data set the demo trains on: one colored shape (circle,
// square, triangle) in one quadrant of a small image, drawn here; captions for stage 1 and questions about
// color, shape and position for stage 2, in LLaVA's JSON format. Everything random comes from torch's
// global generator, so a seed set with torch::manual_seed makes the whole set reproducible.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "data/image.h"

namespace llava::data::shapes {

const std::vector<std::string>& color_names();     // "red", "green", ...
const std::vector<std::string>& shape_names();     // "circle", "square", "triangle"
const std::vector<std::string>& position_names();  // "top left", "top right", "bottom left", "bottom right"

struct Scene {
  int color = 0, shape = 0, position = 0;  // indices into the name lists
  double center_x = 0, center_y = 0, radius = 0;  // pixels
  std::array<uint8_t, 3> fill{}, background{};
};

Scene random_scene(int image_size);
Image draw(const Scene& scene, int image_size);  // antialiased (4x4 samples per pixel)
void write_png(const std::string& path, const Image& image);  // atomic; Error names the file

struct Question {
  std::string kind;  // "color" | "shape" | "position"
  std::string text, answer;
};

std::string random_caption(const Scene& scene);
// One question of each kind, phrasing drawn at random.
std::vector<Question> random_questions(const Scene& scene);

// LLaVA records: {"id", "image", "conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}.
nlohmann::json caption_record(const std::string& id, const std::string& image, const std::string& caption);
nlohmann::json question_record(const std::string& id, const std::string& image, const Question& q);

}  // namespace llava::data::shapes
