// checkpoint-N folders: nothing half-written ever carries a checkpoint name; discovery and rotation.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>

#include "checkpoint/checkpoint_dir.h"
#include "io/error.h"
#include "io/file_util.h"
#include "io/test_helpers.h"

using namespace llava;
namespace fs = std::filesystem;

namespace {

std::string fresh_dir(const std::string& name) { return test::temp_dir("ckpt-" + name); }

void save(const std::string& out, int64_t step, const std::string& text) {
  checkpoint::PendingCheckpoint pending(out, step);
  io::write_file_atomic(pending.dir() + "/weights.txt", text);
  pending.commit();
}

}  // namespace

TEST_CASE("an uncommitted checkpoint never appears under a checkpoint-N name") {
  auto out = fresh_dir("partial");
  {
    checkpoint::PendingCheckpoint pending(out, 5);
    io::write_file_atomic(pending.dir() + "/weights.txt", "half");
    CHECK(fs::exists(pending.dir()));
    CHECK_FALSE(checkpoint::latest_checkpoint(out).has_value());  // a crash here leaves no checkpoint-5
  }
  CHECK(fs::is_empty(out));  // abandoned: the partial folder is cleaned up
  save(out, 5, "five");
  CHECK(checkpoint::latest_checkpoint(out).value() == out + "/checkpoint-5");
  CHECK(io::read_file(out + "/checkpoint-5/weights.txt") == "five");
  CHECK(checkpoint::complete_checkpoints(out).size() == 1);
  save(out, 5, "five again");  // a re-save of the same step replaces it whole
  CHECK(io::read_file(out + "/checkpoint-5/weights.txt") == "five again");
  CHECK(checkpoint::complete_checkpoints(out).size() == 1);
}

TEST_CASE("the latest checkpoint is the largest step, not the last in lexicographic order") {
  auto out = fresh_dir("latest");
  for (int64_t step : {9, 10, 100, 20}) save(out, step, std::to_string(step));
  fs::create_directories(out + "/.checkpoint-200.partial");  // left by a crash mid-save
  fs::create_directories(out + "/checkpoint-final");         // not checkpoint-<int>
  CHECK(checkpoint::latest_checkpoint(out).value() == out + "/checkpoint-100");
  auto all = checkpoint::complete_checkpoints(out);
  REQUIRE(all.size() == 4);
  CHECK(all.front() == out + "/checkpoint-9");
}

TEST_CASE("rotation removes the oldest beyond save_total_limit and never the newest") {
  auto out = fresh_dir("rotate");
  for (int64_t step : {2, 4, 6, 8, 10}) save(out, step, "x");
  CHECK(checkpoint::rotate_checkpoints(out, 0).empty());  // 0: keep all
  auto removed = checkpoint::rotate_checkpoints(out, 2);
  CHECK(removed.size() == 3);
  auto left = checkpoint::complete_checkpoints(out);
  REQUIRE(left.size() == 2);
  CHECK(left[0] == out + "/checkpoint-8");
  CHECK(left[1] == out + "/checkpoint-10");
  checkpoint::rotate_checkpoints(out, 1);
  CHECK(checkpoint::latest_checkpoint(out).value() == out + "/checkpoint-10");
  CHECK(checkpoint::complete_checkpoints(out).size() == 1);
}

TEST_CASE("trainer_state.json round trips and a broken one is a clear error") {
  auto out = fresh_dir("state");
  checkpoint::TrainerState s;
  s.global_step = 7;
  s.max_steps = 20;
  s.epoch = 0.35;
  s.log_history.push_back({{"loss", 1.5}, {"step", 7}});
  checkpoint::write_trainer_state(out + "/trainer_state.json", s);
  auto back = checkpoint::read_trainer_state(out + "/trainer_state.json");
  CHECK(back.global_step == 7);
  CHECK(back.max_steps == 20);
  CHECK(back.epoch == Approx(0.35));
  CHECK(back.log_history.size() == 1);
  std::ofstream(out + "/bad.json") << "{\"global_step\": ";
  CHECK_THROWS_WITH(checkpoint::read_trainer_state(out + "/bad.json"), Catch::Contains("bad.json"));
}
