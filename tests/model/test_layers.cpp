// Unit tests of the numerics that must match HF exactly, against independent double-precision formulas.
#include <catch2/catch.hpp>
#include <cmath>

#include "model/generate.h"
#include "model/layers.h"
#include "model/linear.h"
#include "model/llama.h"

using namespace llava::model;

TEST_CASE("RMSNorm equals x / sqrt(mean(x^2) + eps) * w computed in double") {
  torch::manual_seed(0);
  RMSNorm norm(16, 1e-5, torch::TensorOptions().dtype(torch::kFloat32));
  norm->weight.data().copy_(torch::randn({16}));
  auto x = torch::randn({3, 5, 16}) * 3;
  auto x64 = x.to(torch::kFloat64);
  auto expected = x64 / torch::sqrt(x64.pow(2).mean(-1, true) + 1e-5) * norm->weight.to(torch::kFloat64);
  auto got = norm(x).to(torch::kFloat64);
  CHECK((got - expected).abs().max().item<double>() < 1e-5);
  RMSNorm bf16_norm(16, 1e-5, torch::TensorOptions().dtype(torch::kBFloat16));
  bf16_norm->weight.data().fill_(1);
  CHECK(bf16_norm(x.to(torch::kBFloat16)).scalar_type() == torch::kBFloat16);  // fp32 inside, bf16 out
}

TEST_CASE("RoPE rotates each (i, i + d/2) pair by position * theta^(-2i/d)") {
  TextConfig c;
  c.head_dim = 8;
  c.rope_theta = 1e6;
  Rope rope(c);
  auto positions = torch::tensor({0, 3, 17}, torch::kInt64).view({1, 3});
  auto [cos, sin] = rope.tables(positions, torch::kFloat32);
  torch::manual_seed(1);
  auto x = torch::randn({1, 2, 3, 8});  // [B,H,T,D]
  auto got = apply_rope(x, cos, sin);
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t t = 0; t < 3; ++t)
      for (int64_t i = 0; i < 4; ++i) {
        double angle = positions[0][t].item<double>() * std::pow(1e6, -2.0 * i / 8.0);
        double a = x[0][h][t][i].item<double>(), b = x[0][h][t][i + 4].item<double>();
        CHECK(got[0][h][t][i].item<double>() == Approx(a * std::cos(angle) - b * std::sin(angle)).margin(1e-5));
        CHECK(got[0][h][t][i + 4].item<double>() == Approx(b * std::cos(angle) + a * std::sin(angle)).margin(1e-5));
      }
}

TEST_CASE("linear rope scaling divides the frequencies by the factor") {
  TextConfig c;
  c.head_dim = 8;
  Rope plain(c);
  c.rope_type = "linear";
  c.rope_factor = 4.0;
  Rope scaled(c);
  CHECK(torch::allclose(scaled.inv_freq * 4.0, plain.inv_freq));
}

TEST_CASE("causal mask combines causality, padding and the cache offset") {
  auto m = causal_mask(torch::tensor({0, 1, 1, 1}).view({1, 4}), 1, 2, 2, torch::kFloat32, torch::kCPU);
  CHECK_FALSE(m.live_rows.defined());  // every query sees some key
  auto mask = m.additive;
  REQUIRE(mask.sizes() == torch::IntArrayRef({1, 1, 2, 4}));
  float lowest = std::numeric_limits<float>::lowest();
  // query 0 is position 2: sees keys 1, 2 (key 0 is padding); query 1 (position 3) sees keys 1..3.
  std::vector<float> expected = {lowest, 0, 0, lowest, lowest, 0, 0, 0};
  auto flat = mask.reshape({-1});
  for (int i = 0; i < 8; ++i) CHECK(flat[i].item<float>() == expected[i]);

  // Left padding without a cache: the pad query at t=0 sees nothing.
  auto left = causal_mask(torch::tensor({0, 1, 1}).view({1, 3}), 1, 3, 0, torch::kFloat32, torch::kCPU);
  REQUIRE(left.live_rows.defined());
  CHECK_FALSE(left.live_rows.view({-1})[0].item<bool>());
  CHECK(left.live_rows.view({-1})[1].item<bool>());
}

TEST_CASE("a Linear's adapter output is added to the projection") {
  struct AddOne : LinearAdapter {
    torch::Tensor forward(const torch::Tensor& x) override { return torch::ones({x.size(0), 2}); }
  };
  Linear linear(3, 2, true, torch::TensorOptions().dtype(torch::kFloat32));
  linear->reset_parameters();
  auto x = torch::randn({4, 3});
  auto base = linear(x);
  linear->adapter = std::make_shared<AddOne>();
  CHECK(torch::allclose(linear(x), base + 1));
  CHECK(linear->named_parameters().size() == 2);  // the adapter adds no parameters to the model
}

TEST_CASE("top-p keeps the smallest most-likely set reaching p") {
  auto logits = torch::log(torch::tensor({0.1f, 0.5f, 0.15f, 0.25f})).view({1, 4});
  auto kept = torch::isfinite(top_p_filter(logits, 0.7)).view({-1});
  CHECK(kept[1].item<bool>());   // 0.5
  CHECK(kept[3].item<bool>());   // 0.25: 0.75 >= 0.7
  CHECK_FALSE(kept[2].item<bool>());
  CHECK_FALSE(kept[0].item<bool>());
  auto only_top = torch::isfinite(top_p_filter(logits, 1e-6)).view({-1});
  CHECK(only_top.sum().item<int64_t>() == 1);
  CHECK(only_top[1].item<bool>());
}
