// The one save call and the one restore call on plain training state: what checkpoint-N holds for a
// stage-1 (projector) run, that restore gives the same weights, optimizer state, lr and generator back, that
// an async save writes the same bytes as a synchronous one, and that rotation keeps save_total_limit folders.
#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>

#include "checkpoint/checkpoint_saver.h"
#include "checkpoint/restore.h"
#include "distributed/communicator.h"
#include "io/test_helpers.h"
#include "model/llava.h"
#include "model/tiny_config.h"

using namespace llava;
namespace fs = std::filesystem;

namespace {

using Weights = checkpoint::TrainingState::Weights;

struct ProjectorRun {
  model::LlavaForConditionalGeneration model{test::tiny_llava_config(), torch::TensorOptions()};
  std::vector<checkpoint::ParamGroup> groups;

  ProjectorRun() {
    checkpoint::ParamGroup g{"decay", {}, {}, /*base_lr=*/2e-3, /*lr=*/2e-3, /*weight_decay=*/0.1};
    torch::NoGradGuard no_grad;
    torch::manual_seed(5);  // finite weights (the model's tensors start uninitialized; a resume refuses NaN)
    for (auto& p : model->model->multi_modal_projector->named_parameters()) {
      p.value().uniform_(-1, 1);
      g.names.push_back("model.multi_modal_projector." + p.key());
      g.params.push_back(p.value());
    }
    groups = {g};
  }

  // After `step` steps: moments 0.1 x / 0.01 x |the parameter| (the second parameter never updated); the
  // sampler where the trainer puts it (an epoch longer than the run).
  checkpoint::TrainingState state(int64_t step) {
    checkpoint::TrainingState s;
    s.trainer.global_step = step;
    s.trainer.max_steps = 10;
    s.signature.samples_per_step = 4;
    s.signature.sampler = {{"epoch", 0}, {"position", step * 4}};
    for (size_t i = 0; i < groups[0].names.size(); ++i)
      s.signature.trainables.push_back({groups[0].names[i], groups[0].params[i].sizes().vec()});
    s.weights = Weights::kProjector;
    for (size_t i = 0; i < groups[0].names.size(); ++i) s.weights_to_save.emplace_back(groups[0].names[i], groups[0].params[i]);
    s.groups = groups;
    s.next_lr_factor = 0.5;
    s.whole = checkpoint::AdamWState{groups, {}, {std::vector<checkpoint::AdamState>(groups[0].params.size())}};
    s.whole->state[0][0] = {groups[0].params[0].detach() * 0.1, groups[0].params[0].detach().abs() * 0.01, step};
    s.rng_states = {checkpoint::cpu_rng_state()};
    return s;
  }
};

checkpoint::SaveOptions options(const std::string& out, bool async, int64_t limit = 0) {
  checkpoint::SaveOptions o;
  o.output_dir = out;
  o.base_model = out + "/no-base-model";  // no config.json to copy
  o.async = async;
  o.save_total_limit = limit;
  return o;
}

std::set<std::string> files_in(const std::string& dir) {
  std::set<std::string> names;
  for (auto& e : fs::recursive_directory_iterator(dir)) if (e.is_regular_file()) names.insert(fs::relative(e.path(), dir).string());
  return names;
}

std::string bytes_of(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

}  // namespace

TEST_CASE("save then restore gives the projector, the optimizer state, the next lr and the generator back") {
  ProjectorRun run;
  const std::string out = test::temp_dir("save-restore");
  auto comm = dist::Communicator::single_process();
  const auto rng_before = checkpoint::cpu_rng_state();
  std::vector<torch::Tensor> saved;
  for (auto& p : run.groups[0].params) saved.push_back(p.detach().clone());
  {
    checkpoint::CheckpointSaver saver(options(out, /*async=*/false), comm);
    saver.save([&] { return run.state(7); });
    saver.finish();
  }
  const std::string dir = out + "/checkpoint-7";
  CHECK(files_in(dir) == std::set<std::string>{"mm_projector.bin", "optimizer.pt", "scheduler.pt", "trainer_state.json",
                                               "llava_resume.json", "llava_rng_state.safetensors", "rng_state.pth"});

  torch::manual_seed(123);  // another generator state, other weights
  {
    torch::NoGradGuard no_grad;
    for (auto& p : run.groups[0].params) p.zero_();
  }
  checkpoint::RestoreRequest request;
  request.dir = dir;
  request.base_model = out + "/no-base-model";
  request.now = run.state(0).signature;
  request.weights = Weights::kProjector;
  request.model = &run.model;
  request.groups = run.groups;
  const auto restored = checkpoint::restore(request);
  CHECK(restored.trainer.global_step == 7);
  REQUIRE(restored.saved.has_value());
  CHECK(restored.changes.empty());
  for (size_t i = 0; i < saved.size(); ++i) CHECK(run.groups[0].params[i].equal(saved[i]));
  REQUIRE(restored.whole.has_value());
  CHECK(restored.ranges.empty());
  const auto& st = restored.whole->state[0];
  CHECK(st[0].step == 7);
  CHECK(st[0].exp_avg.equal(saved[0] * 0.1));
  CHECK(st[0].exp_avg_sq.equal(saved[0].abs() * 0.01));
  CHECK_FALSE(st[1].initialized());                     // never updated: no state, as torch keeps it
  CHECK(restored.whole->groups[0].lr == Approx(1e-3));  // optimizer.pt holds the next step's lr
  CHECK(restored.whole->groups[0].base_lr == Approx(2e-3));
  REQUIRE(restored.cpu_rng.has_value());
  CHECK(restored.cpu_rng->equal(rng_before));
  CHECK_FALSE(restored.cuda_rng.has_value());

  // Without our generator file the state comes from HF's rng_state.pth, written beside it.
  std::filesystem::remove(dir + "/llava_rng_state.safetensors");
  const auto from_hf = checkpoint::restore(request);
  REQUIRE(from_hf.cpu_rng.has_value());
  CHECK(from_hf.cpu_rng->equal(rng_before));
  CHECK_FALSE(from_hf.cuda_rng.has_value());

  request.now.samples_per_step = 8;  // another run: refused, naming the difference
  CHECK_THROWS_WITH(checkpoint::restore(request), Catch::Contains("cannot resume") && Catch::Contains("8"));
}

TEST_CASE("an async save writes the bytes a synchronous one writes, and rotation keeps save_total_limit folders") {
  ProjectorRun run;
  const std::string sync_out = test::temp_dir("save-sync"), async_out = test::temp_dir("save-async");
  auto comm = dist::Communicator::single_process();
  for (bool async : {false, true}) {
    checkpoint::CheckpointSaver saver(options(async ? async_out : sync_out, async, /*limit=*/2), comm);
    for (int64_t step : {1, 2, 3}) {
      saver.save([&] { return run.state(step); });
      saver.before_update();
      saver.check();
    }
    saver.finish();
    CHECK(saver.timings().size() == 3);
    CHECK(saver.timings().back().write_seconds >= 0);
  }
  for (const auto& out : {sync_out, async_out})
    CHECK(files_in(out).count("checkpoint-1/optimizer.pt") == 0);  // rotated away
  const auto names = files_in(sync_out + "/checkpoint-3");
  REQUIRE(names == files_in(async_out + "/checkpoint-3"));
  for (auto& name : names)
    CHECK(bytes_of(sync_out + "/checkpoint-3/" + name) == bytes_of(async_out + "/checkpoint-3/" + name));
  CHECK(fs::exists(sync_out + "/checkpoint-2"));
}
