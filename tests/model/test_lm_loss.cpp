// scored_causal_lm_loss (the last decoder layer and lm_head only at scored positions) against
// causal_lm_loss over the full logits: the same loss and the same gradient for every parameter, untied and
// tied lm_head, right and left padding, with and without activation checkpointing; a batch with nothing
// to score gives 0 and zero gradients instead of nan.
#include <catch2/catch.hpp>

#include "model/llava.h"
#include "model/tiny_config.h"
#include "model/lm_loss.h"

using namespace llava;
using model::LlavaForConditionalGeneration;

namespace {

model::LlavaConfig tiny_config(bool tied) {
  auto c = test::tiny_llava_config();
  c.tie_word_embeddings = tied;
  return c;
}

LlavaForConditionalGeneration random_model(const model::LlavaConfig& c) {
  torch::manual_seed(0);
  LlavaForConditionalGeneration m(c, torch::TensorOptions().dtype(torch::kFloat32));
  torch::NoGradGuard no_grad;
  for (auto& p : m->parameters()) p.normal_(0, 0.3);
  m->train();
  return m;
}

struct Batch {
  torch::Tensor input_ids, attention_mask, pixel_values, labels;
};

// Two rows of 14 tokens like LLaVA's: BOS, an image's slots, a prompt (-100) and an answer; row 1 is
// right-padded by 3.
Batch make_batch(const model::LlavaConfig& c) {
  torch::manual_seed(2);
  auto ids = torch::randint(1, c.image_token_index, {2, 14}, torch::kInt64);
  ids.narrow(1, 1, c.image_seq_length()).fill_(c.image_token_index);
  Batch b{ids, torch::ones({2, 14}, torch::kInt64), torch::randn({2, 3, 8, 8}), ids.clone()};
  b.attention_mask[1].narrow(0, 11, 3).fill_(0);
  b.labels.narrow(1, 0, 8).fill_(-100);  // BOS, image, prompt: not scored
  b.labels.masked_fill_(b.attention_mask == 0, -100);
  return b;
}

std::pair<torch::Tensor, std::vector<torch::Tensor>> loss_and_grads(LlavaForConditionalGeneration& m, const Batch& b,
                                                                   bool scored_only) {
  for (auto& p : m->parameters()) p.mutable_grad() = torch::Tensor();
  auto loss = scored_only ? model::scored_causal_lm_loss(m, b.input_ids, b.attention_mask, b.pixel_values, b.labels)
                          : model::causal_lm_loss(m->forward(b.input_ids, b.attention_mask, b.pixel_values), b.labels);
  loss.backward();
  std::vector<torch::Tensor> grads;
  for (auto& p : m->parameters()) grads.push_back(p.grad());
  return {loss.detach(), grads};
}

struct Variant {
  bool tied = false, left_padding = false, checkpointing = false;
};

void check_same(Variant v) {
  const auto config = tiny_config(v.tied);
  auto m = random_model(config);
  auto batch = make_batch(config);
  if (v.left_padding) {  // row 0 starts with 2 pads: those queries see no key at all (live_rows)
    batch.attention_mask[0].narrow(0, 0, 2).fill_(0);
    batch.labels.masked_fill_(batch.attention_mask == 0, -100);
  }
  auto [full_loss, full_grads] = loss_and_grads(m, batch, false);
  m->set_gradient_checkpointing(v.checkpointing);
  auto [loss, grads] = loss_and_grads(m, batch, true);
  INFO("full logits " << full_loss.item<double>() << ", scored rows " << loss.item<double>());
  CHECK(loss.item<double>() == Approx(full_loss.item<double>()).epsilon(1e-6));
  REQUIRE(grads.size() == full_grads.size());
  double largest = 0;
  for (auto& g : full_grads)
    if (g.defined()) largest = std::max(largest, g.abs().max().item<double>());
  std::vector<std::string> names;
  for (auto& p : m->named_parameters()) names.push_back(p.key());
  int64_t compared = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    INFO("parameter #" << i << " " << names[i]);
    REQUIRE(grads[i].defined() == full_grads[i].defined());
    if (!grads[i].defined()) continue;
    const double scale = full_grads[i].abs().max().item<double>();
    INFO("largest gradient " << scale << " (of all parameters: " << largest << ")");
    // Relative to the tensor, plus float noise of the whole backward: the key biases' exact gradient is
    // 0 (softmax ignores a per-query constant), so theirs are noise of ~1e-9 in either computation.
    CHECK((grads[i] - full_grads[i]).abs().max().item<double>() <= 1e-5 * scale + 1e-7 * largest);
    compared += scale > 0;
  }
  CHECK(compared > 20);  // the projector, every text layer, lm_head / embeddings
}

}  // namespace

TEST_CASE("loss on scored rows equals the loss over all logits, with the same gradients") { check_same({}); }

TEST_CASE("the same with lm_head tied to the embeddings") { check_same({/*tied=*/true, /*left_padding=*/false, /*checkpointing=*/false}); }

TEST_CASE("the same with a left-padded row (queries that see no key)") { check_same({/*tied=*/false, /*left_padding=*/true, /*checkpointing=*/false}); }

TEST_CASE("the same with activation checkpointing (the row-only last layer is recomputed too)") {
  check_same({/*tied=*/false, /*left_padding=*/false, /*checkpointing=*/true});
}

TEST_CASE("forward_rows equals the full forward at those rows") {
  const auto config = test::tiny_llava_config(/*text_layers=*/3);
  auto m = random_model(config);
  const auto batch = make_batch(config);
  torch::NoGradGuard no_grad;
  auto embeds = m->model->input_embeddings(batch.input_ids, batch.pixel_values);  // [2,14,16]
  auto full = m->model->language_model->forward(embeds, batch.attention_mask, {}, nullptr).reshape({28, 16});
  auto rows = torch::tensor({0, 3, 13, 14, 20, 27}, torch::kInt64);  // both rows, a padded position (27)
  auto got = m->model->language_model->forward_rows(embeds, batch.attention_mask, rows);
  REQUIRE(got.sizes() == torch::IntArrayRef({6, 16}));
  auto want = full.index_select(0, rows);
  CHECK((got - want).abs().max().item<double>() <= 1e-5 * want.abs().max().item<double>());
}

TEST_CASE("a batch with no scored token gives 0 and zero gradients, not nan") {
  const auto config = tiny_config(false);
  auto m = random_model(config);
  auto batch = make_batch(config);
  batch.labels.fill_(-100);
  auto [loss, grads] = loss_and_grads(m, batch, true);
  CHECK(loss.item<double>() == 0.0);
  for (auto& g : grads)
    if (g.defined()) CHECK(g.abs().max().item<double>() == 0.0);
}

// The layout the trainer computes from its host batch (so a GPU step never waits to learn a shape),
// against a count written out by hand.
TEST_CASE("batch_layout counts the scored positions, image slots and keyless rows of a batch") {
  const auto config = tiny_config(false);
  for (bool left_padding : {false, true}) {
    INFO("left padding " << left_padding);
    auto b = make_batch(config);
    if (left_padding) {
      b.attention_mask[0].narrow(0, 0, 2).fill_(0);
      b.labels.masked_fill_(b.attention_mask == 0, -100);
    }
    const auto layout = model::batch_layout(b.input_ids, b.attention_mask, b.labels, config.image_token_index);
    std::vector<int64_t> scored, per_row(2, 0);
    int64_t slots = 0;
    auto labels = b.labels.accessor<int64_t, 2>();
    auto ids = b.input_ids.accessor<int64_t, 2>();
    for (int64_t row = 0; row < 2; ++row)
      for (int64_t t = 0; t < 14; ++t) {
        slots += ids[row][t] == config.image_token_index;
        if (t + 1 < 14 && labels[row][t + 1] != -100) scored.push_back(row * 14 + t), ++per_row[row];
      }
    REQUIRE(layout.scored.numel() == static_cast<int64_t>(scored.size()));
    CHECK(std::vector<int64_t>(layout.scored.data_ptr<int64_t>(), layout.scored.data_ptr<int64_t>() + scored.size()) ==
          scored);
    CHECK(layout.scored_per_row == per_row);
    CHECK(per_row[0] == 6);  // answers at 8..13, predicted from positions 7..12
    CHECK(per_row[1] == 3);  // row 1: answers at 8..10 (11..13 padded)
    CHECK(layout.image_rows.numel() == slots);
    CHECK(torch::equal(layout.image_rows, b.input_ids.eq(config.image_token_index).reshape({-1}).nonzero().squeeze(1)));
    CHECK(slots == 2 * config.image_seq_length());
    CHECK(layout.every_query_sees_a_key == !left_padding);
  }
}

TEST_CASE("the loss with the host's layout is bitwise the loss that counts the layout itself") {
  const auto config = tiny_config(false);
  for (bool left_padding : {false, true}) {
    INFO("left padding " << left_padding);
    auto m = random_model(config);
    auto b = make_batch(config);
    if (left_padding) {
      b.attention_mask[0].narrow(0, 0, 2).fill_(0);
      b.labels.masked_fill_(b.attention_mask == 0, -100);
    }
    auto [counted, counted_grads] = loss_and_grads(m, b, true);
    for (auto& p : m->parameters()) p.mutable_grad() = torch::Tensor();
    auto layout = model::batch_layout(b.input_ids, b.attention_mask, b.labels, config.image_token_index);
    auto loss = model::scored_causal_lm_loss(m, b.input_ids, b.attention_mask, b.pixel_values, b.labels, layout);
    loss.backward();
    CHECK(torch::equal(loss.detach(), counted));
    auto params = m->parameters();
    for (size_t i = 0; i < params.size(); ++i)
      if (counted_grads[i].defined()) CHECK(torch::equal(params[i].grad(), counted_grads[i]));
    // The layout is what the model uses: image rows one short are refused by their count.
    layout.image_rows = layout.image_rows.narrow(0, 1, layout.image_rows.numel() - 1);
    CHECK_THROWS_WITH(
        model::scored_causal_lm_loss(m, b.input_ids, b.attention_mask, b.pixel_values, b.labels, layout),
        Catch::Contains(std::to_string(2 * config.image_seq_length() - 1) + " tokens with id"));
  }
}
