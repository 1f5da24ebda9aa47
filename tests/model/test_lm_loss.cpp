// scored_causal_lm_loss (lm_head only at scored positions) against causal_lm_loss over the full logits:
// the same loss and the same gradient for every parameter, untied and tied lm_head; a batch with nothing
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

void check_same(bool tied) {
  const auto config = tiny_config(tied);
  auto m = random_model(config);
  const auto batch = make_batch(config);
  auto [full_loss, full_grads] = loss_and_grads(m, batch, false);
  auto [loss, grads] = loss_and_grads(m, batch, true);
  INFO("full logits " << full_loss.item<double>() << ", scored rows " << loss.item<double>());
  CHECK(loss.item<double>() == Approx(full_loss.item<double>()).epsilon(1e-6));
  REQUIRE(grads.size() == full_grads.size());
  int64_t compared = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    INFO("parameter #" << i);
    REQUIRE(grads[i].defined() == full_grads[i].defined());
    if (!grads[i].defined()) continue;
    const double scale = full_grads[i].abs().max().item<double>();
    CHECK((grads[i] - full_grads[i]).abs().max().item<double>() <= 1e-5 * scale + 1e-9);
    compared += scale > 0;
  }
  CHECK(compared > 20);  // the projector, every text layer, lm_head / embeddings
}

}  // namespace

TEST_CASE("loss on scored rows equals the loss over all logits, with the same gradients") { check_same(false); }

TEST_CASE("the same with lm_head tied to the embeddings") { check_same(true); }

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
