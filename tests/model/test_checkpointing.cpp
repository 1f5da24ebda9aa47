// Activation checkpointing: the loss and every gradient (model parameters and adapter tensors, with
// dropout drawing random masks) are bitwise those of the plain backward pass, and the peak of live CPU
// tensor bytes during forward + backward is lower.
#include <catch2/catch.hpp>
#include <iostream>
#include <set>

#include "model/checkpointing.h"
#include "model/llava.h"
#include "model/tiny_config.h"
#include "model/cpu_memory_counter.h"

using namespace llava;
using model::LlavaForConditionalGeneration;

namespace {

model::LlavaConfig tiny_config() { return test::tiny_llava_config(/*text_layers=*/3); }

LlavaForConditionalGeneration random_model(const model::LlavaConfig& c, c10::ScalarType dtype = torch::kFloat32) {
  torch::manual_seed(0);
  LlavaForConditionalGeneration m(c, torch::TensorOptions().dtype(dtype));
  torch::NoGradGuard no_grad;
  for (auto& p : m->parameters()) p.normal_(0, 0.2);
  m->train();
  return m;
}

// LoRA's shape with its own dropout: B(A(dropout(x))). B starts non-zero so that A gets gradients too.
struct DropoutAdapter : model::LinearAdapter {
  torch::Tensor A, B;  // [r,in], [out,r]
  double p;
  DropoutAdapter(int64_t in, int64_t out, double dropout, c10::ScalarType dtype = torch::kFloat32) : p(dropout) {
    A = (torch::randn({4, in}) * 0.2).to(dtype).requires_grad_(true);
    B = (torch::randn({out, 4}) * 0.2).to(dtype).requires_grad_(true);
  }
  torch::Tensor forward(const torch::Tensor& x) override {
    return torch::nn::functional::linear(torch::nn::functional::linear(torch::dropout(x, p, true), A), B);
  }
};

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Adapters on every q_proj / v_proj / fc1 (vision and text), like a LoRA over both towers.
std::vector<std::shared_ptr<DropoutAdapter>> attach_adapters(LlavaForConditionalGeneration& m, double dropout,
                                                              c10::ScalarType dtype = torch::kFloat32) {
  torch::manual_seed(1);
  std::vector<std::shared_ptr<DropoutAdapter>> adapters;
  for (auto& item : m->named_modules()) {
    auto* linear = item.value()->as<model::LinearImpl>();
    const auto& path = item.key();
    if (!linear || !(ends_with(path, "q_proj") || ends_with(path, "v_proj") || ends_with(path, "fc1"))) continue;
    adapters.push_back(std::make_shared<DropoutAdapter>(linear->in_features(), linear->out_features(), dropout, dtype));
    linear->adapter = adapters.back();
  }
  return adapters;
}

struct Batch {
  torch::Tensor input_ids, attention_mask, pixel_values, labels;
};

// Two rows of `length` tokens, each with one image's slots after a BOS; the second row left-padded by 2.
Batch make_batch(const model::LlavaConfig& c, int64_t length, bool with_images) {
  torch::manual_seed(2);
  const int64_t image_slots = c.image_seq_length();
  auto ids = torch::randint(1, c.image_token_index, {2, length}, torch::kInt64);
  Batch b;
  if (with_images) {
    ids[0].narrow(0, 1, image_slots).fill_(c.image_token_index);
    ids[1].narrow(0, 3, image_slots).fill_(c.image_token_index);  // row 1: BOS at 2, image from 3
    b.pixel_values = torch::randn({2, 3, c.vision.image_size, c.vision.image_size});
  }
  b.input_ids = ids;
  b.attention_mask = torch::ones({2, length}, torch::kInt64);
  b.attention_mask[1].narrow(0, 0, 2).fill_(0);
  b.labels = ids.masked_fill(ids == c.image_token_index, -100).masked_fill(b.attention_mask == 0, -100);
  return b;
}

// Loss and gradients of one forward + backward, starting from the same RNG state each time.
struct Pass {
  torch::Tensor loss;
  std::vector<torch::Tensor> grads;  // model parameters that require grad, then adapter A, B (undefined: none)
  int64_t checkpointed_layers = 0;   // CheckpointFunction nodes in the graph
};

int64_t count_checkpoint_nodes(const torch::Tensor& loss) {
  std::set<torch::autograd::Node*> seen;
  std::vector<torch::autograd::Node*> todo = {loss.grad_fn().get()};
  int64_t count = 0;
  while (!todo.empty()) {
    auto* node = todo.back();
    todo.pop_back();
    if (!node || !seen.insert(node).second) continue;
    if (node->name().find("CheckpointFunction") != std::string::npos) ++count;
    for (auto& edge : node->next_edges()) todo.push_back(edge.function.get());
  }
  return count;
}

Pass run_pass(LlavaForConditionalGeneration& m, const std::vector<std::shared_ptr<DropoutAdapter>>& adapters,
              const Batch& b, bool checkpointing) {
  m->set_gradient_checkpointing(checkpointing);
  for (auto& p : m->parameters()) p.mutable_grad() = torch::Tensor();
  for (auto& a : adapters) a->A.mutable_grad() = torch::Tensor(), a->B.mutable_grad() = torch::Tensor();
  torch::manual_seed(3);  // dropout masks
  Pass pass;
  auto logits = m->forward(b.input_ids, b.attention_mask, b.pixel_values);
  pass.loss = model::causal_lm_loss(logits, b.labels);
  pass.checkpointed_layers = count_checkpoint_nodes(pass.loss);
  pass.loss.backward();
  for (auto& p : m->parameters())
    if (p.requires_grad()) pass.grads.push_back(p.grad());
  for (auto& a : adapters) pass.grads.push_back(a->A.grad()), pass.grads.push_back(a->B.grad());
  return pass;
}

// Bitwise equality of every gradient, each non-zero (really computed). Returns how many were defined
// (parameters unused by the loss, like CLIP's post_layernorm, get none, in both passes).
size_t check_same_gradients(const Pass& plain, const Pass& recomputed) {
  REQUIRE(plain.grads.size() == recomputed.grads.size());
  size_t defined = 0;
  for (size_t i = 0; i < plain.grads.size(); ++i) {
    INFO("gradient #" << i);
    REQUIRE(plain.grads[i].defined() == recomputed.grads[i].defined());
    if (!plain.grads[i].defined()) continue;
    ++defined;
    CHECK(plain.grads[i].abs().sum().item<double>() > 0);
    CHECK(torch::equal(plain.grads[i], recomputed.grads[i]));
  }
  return defined;
}

}  // namespace

TEST_CASE("checkpointing leaves the loss and every gradient bitwise unchanged, dropout included") {
  const auto config = tiny_config();
  auto m = random_model(config);
  const auto adapters = attach_adapters(m, /*dropout=*/0.3);
  const auto batch = make_batch(config, 12, /*with_images=*/true);

  const auto plain = run_pass(m, adapters, batch, false);
  const auto recomputed = run_pass(m, adapters, batch, true);
  CHECK(plain.checkpointed_layers == 0);
  CHECK(recomputed.checkpointed_layers == config.vision.num_hidden_layers + config.text.num_hidden_layers);
  CHECK(torch::equal(plain.loss, recomputed.loss));
  // Every parameter but CLIP's post_layernorm weight and bias (unused by LLaVA) gets a gradient.
  CHECK(check_same_gradients(plain, recomputed) == m->parameters().size() - 2 + 2 * adapters.size());

  // Dropout really draws masks (another seed, another loss), and the recomputation put the generator
  // back where the plain pass leaves it.
  torch::manual_seed(4);
  auto other = model::causal_lm_loss(m->forward(batch.input_ids, batch.attention_mask, batch.pixel_values), batch.labels);
  CHECK_FALSE(torch::equal(other, plain.loss));
  run_pass(m, adapters, batch, false);
  const auto after_plain = torch::rand({4});
  run_pass(m, adapters, batch, true);
  CHECK(torch::equal(torch::rand({4}), after_plain));
}

TEST_CASE("in bf16 (the trainer's bf16 mode computes in bf16) the gradients are bitwise unchanged too") {
  const auto config = tiny_config();
  auto m = random_model(config, torch::kBFloat16);
  const auto adapters = attach_adapters(m, /*dropout=*/0.3, torch::kBFloat16);
  const auto batch = make_batch(config, 12, /*with_images=*/true);
  const auto plain = run_pass(m, adapters, batch, false);
  const auto recomputed = run_pass(m, adapters, batch, true);
  CHECK(recomputed.checkpointed_layers == config.vision.num_hidden_layers + config.text.num_hidden_layers);
  CHECK(torch::equal(plain.loss, recomputed.loss));
  CHECK(check_same_gradients(plain, recomputed) == m->parameters().size() - 2 + 2 * adapters.size());
}

TEST_CASE("a frozen stack with adapters gets their gradients even when its input needs none") {
  // LoRA stage: only adapters train, and a text-only batch gives the first decoder layer an input that
  // requires no grad. The vision tower (frozen, adapter-free here) is not checkpointed at all.
  const auto config = tiny_config();
  auto m = random_model(config);
  for (auto& p : m->parameters()) p.requires_grad_(false);
  std::vector<std::shared_ptr<DropoutAdapter>> adapters;
  torch::manual_seed(1);
  for (auto& layer : *m->model->language_model->layers) {
    auto& v_proj = layer->as<model::LlamaDecoderLayerImpl>()->self_attn->v_proj;
    adapters.push_back(std::make_shared<DropoutAdapter>(v_proj->in_features(), v_proj->out_features(), 0.1));
    v_proj->adapter = adapters.back();
  }
  for (bool with_images : {false, true}) {
    INFO("with images: " << with_images);
    const auto batch = make_batch(config, 12, with_images);
    const auto plain = run_pass(m, adapters, batch, false);
    const auto recomputed = run_pass(m, adapters, batch, true);
    CHECK(recomputed.checkpointed_layers == config.text.num_hidden_layers);
    CHECK(torch::equal(plain.loss, recomputed.loss));
    CHECK(plain.grads.size() == 2 * adapters.size());
    CHECK(check_same_gradients(plain, recomputed) == 2 * adapters.size());
  }
}

TEST_CASE("checkpointing is off in eval mode and without grad, like HF") {
  const auto config = tiny_config();
  auto m = random_model(config);
  const auto batch = make_batch(config, 12, true);
  m->set_gradient_checkpointing(true);
  m->eval();
  auto eval_loss = model::causal_lm_loss(m->forward(batch.input_ids, batch.attention_mask, batch.pixel_values), batch.labels);
  CHECK(count_checkpoint_nodes(eval_loss) == 0);
  CHECK(eval_loss.requires_grad());
  m->train();
  torch::NoGradGuard no_grad;
  auto no_grad_loss = model::causal_lm_loss(m->forward(batch.input_ids, batch.attention_mask, batch.pixel_values), batch.labels);
  CHECK_FALSE(no_grad_loss.requires_grad());
  CHECK(torch::equal(no_grad_loss, eval_loss));
}

TEST_CASE("checkpointing lowers the peak of live CPU tensor bytes during forward + backward") {
  // Big enough for activations to dominate: 4 decoder layers over 2 x 256 tokens, full fine-tune.
  auto config = tiny_config();
  config.vision.hidden_size = 64;
  config.vision.intermediate_size = 256;
  config.vision.image_size = 32;
  config.vision.patch_size = 4;  // 64 image tokens
  config.text.vocab_size = 512;
  config.text.hidden_size = 128;
  config.text.intermediate_size = 344;
  config.text.num_hidden_layers = 4;
  config.text.num_attention_heads = 4;
  config.text.num_key_value_heads = 4;
  config.text.head_dim = 32;
  config.image_token_index = 511;
  auto& counter = test::CpuMemoryCounter::install();
  auto m = random_model(config);
  const auto batch = make_batch(config, 256, true);

  auto peak_of_step = [&](bool checkpointing) {
    auto pass = run_pass(m, {}, batch, checkpointing);  // warm-up: one-time allocations happen here
    pass = Pass();  // run_pass drops the .grads: the measured step allocates them afresh
    const int64_t before = counter.live_bytes();
    counter.reset_peak();
    pass = run_pass(m, {}, batch, checkpointing);
    return std::make_pair(counter.peak_bytes() - before, pass);
  };
  const auto [plain_peak, plain] = peak_of_step(false);
  const auto [recomputed_peak, recomputed] = peak_of_step(true);
  int64_t parameter_bytes = 0;
  for (auto& p : m->parameters()) parameter_bytes += p.numel() * 4;
  std::cout << "activation checkpointing: peak of live CPU tensor bytes in forward+backward, above the "
            << parameter_bytes / 1024 << " KiB of parameters: without " << plain_peak / 1024 << " KiB, with "
            << recomputed_peak / 1024 << " KiB" << std::endl;
  CHECK(recomputed_peak < plain_peak);
  CHECK(torch::equal(plain.loss, recomputed.loss));
}
