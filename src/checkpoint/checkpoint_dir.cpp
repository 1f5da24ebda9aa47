#include "checkpoint/checkpoint_dir.h"

#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <regex>

#include "io/error.h"
#include "io/file_util.h"
#include "io/json_input.h"

namespace llava::checkpoint {

namespace fs = std::filesystem;

namespace {

void fsync_tree(const fs::path& dir) {
  for (auto& entry : fs::recursive_directory_iterator(dir)) {
    if (!entry.is_regular_file()) continue;
    std::FILE* f = std::fopen(entry.path().c_str(), "rb");
    if (!f) fail(entry.path().string(), "cannot open to fsync");
    const int rc = ::fsync(::fileno(f));
    std::fclose(f);
    if (rc != 0) fail(entry.path().string(), std::string("fsync failed: ") + std::strerror(errno));
  }
  for (auto& entry : fs::recursive_directory_iterator(dir))
    if (entry.is_directory()) io::fsync_dir(entry.path().string());
  io::fsync_dir(dir.string());
}

// The N of a checkpoint-N folder: a step we could have written (0 to kMaxStep), else an Error naming it.
int64_t checkpoint_step(const std::string& digits, const std::string& folder) {
  int64_t step = 0;
  const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), step);
  if (ec != std::errc() || end != digits.data() + digits.size() || step > kMaxStep)
    fail(folder, "the step number " + digits + " is out of range (a checkpoint-N folder has N from 0 to " +
                     std::to_string(kMaxStep) + "); rename or remove the folder");
  return step;
}

}  // namespace

PendingCheckpoint::PendingCheckpoint(const std::string& output_dir, int64_t step) : output_dir_(output_dir) {
  partial_ = (fs::path(output_dir) / (".checkpoint-" + std::to_string(step) + ".partial")).string();
  final_ = (fs::path(output_dir) / ("checkpoint-" + std::to_string(step))).string();
  std::error_code ec;
  fs::remove_all(partial_, ec);
  fs::create_directories(partial_, ec);
  if (ec) fail(partial_, "cannot create checkpoint folder: " + ec.message());
}

PendingCheckpoint::~PendingCheckpoint() {
  if (committed_) return;
  std::error_code ec;
  fs::remove_all(partial_, ec);
}

std::string PendingCheckpoint::commit() {
  fsync_tree(partial_);
  std::error_code ec;
  if (fs::exists(final_)) {  // a re-save of the same step: move the old one aside, then drop it
    const std::string old = final_ + ".old";
    fs::remove_all(old, ec);
    fs::rename(final_, old, ec);
    if (ec) fail(final_, "cannot replace the existing checkpoint: " + ec.message());
    fs::rename(partial_, final_, ec);
    if (ec) fail(final_, "cannot rename the new checkpoint into place: " + ec.message());
    fs::remove_all(old, ec);
  } else {
    fs::rename(partial_, final_, ec);
    if (ec) fail(final_, "cannot rename the new checkpoint into place: " + ec.message());
  }
  io::fsync_dir(output_dir_);
  committed_ = true;
  return final_;
}

std::vector<std::string> complete_checkpoints(const std::string& output_dir) {
  static const std::regex pattern(R"(^checkpoint-(\d+)$)");
  std::vector<std::pair<int64_t, std::string>> found;
  if (!fs::is_directory(output_dir)) return {};
  for (auto& entry : fs::directory_iterator(output_dir)) {
    std::smatch m;
    const std::string name = entry.path().filename().string();
    std::error_code ec;  // an entry that cannot be stat'ed (a symlink loop, a dangling link) is no checkpoint
    if (entry.is_directory(ec) && !ec && std::regex_match(name, m, pattern))
      found.emplace_back(checkpoint_step(m[1].str(), entry.path().string()), entry.path().string());
  }
  std::sort(found.begin(), found.end());
  std::vector<std::string> out;
  for (auto& [_, path] : found) out.push_back(path);
  return out;
}

std::optional<std::string> latest_checkpoint(const std::string& output_dir) {
  auto all = complete_checkpoints(output_dir);
  if (all.empty()) return std::nullopt;
  return all.back();
}

std::vector<std::string> rotate_checkpoints(const std::string& output_dir, int64_t limit) {
  auto all = complete_checkpoints(output_dir);
  std::vector<std::string> removed;
  if (limit <= 0) return removed;
  const size_t keep = std::max<int64_t>(limit, 1);
  for (size_t i = 0; i + keep < all.size(); ++i) {
    std::error_code ec;
    fs::remove_all(all[i], ec);
    if (ec) fail(all[i], "cannot remove old checkpoint: " + ec.message());
    removed.push_back(all[i]);
  }
  return removed;
}

void write_trainer_state(const std::string& path, const TrainerState& s) {
  nlohmann::json j = {  // sorted keys, like json.dumps(..., sort_keys=True)
      {"best_metric", nullptr},
      {"best_model_checkpoint", nullptr},
      {"epoch", s.epoch},
      {"eval_steps", s.eval_steps},
      {"global_step", s.global_step},
      {"is_hyper_param_search", false},
      {"is_local_process_zero", true},
      {"is_world_process_zero", true},
      {"log_history", s.log_history},
      {"logging_steps", s.logging_steps},
      {"max_steps", s.max_steps},
      {"num_input_tokens_seen", 0},
      {"num_train_epochs", s.num_train_epochs},
      {"save_steps", s.save_steps},
      // transformers >= 4.41 keeps its TrainerControl here and indexes it when it saves again: a state
      // without it resumes, then fails at HF's next save (KeyError 'TrainerControl'). Written as HF does at a save.
      {"stateful_callbacks",
       {{"TrainerControl",
         {{"args",
           {{"should_epoch_stop", false},
            {"should_evaluate", false},
            {"should_log", false},
            {"should_save", true},
            {"should_training_stop", s.max_steps > 0 && s.global_step >= s.max_steps}}},
          {"attributes", nlohmann::json::object()}}}}},
      {"total_flos", s.total_flos},
      {"train_batch_size", s.train_batch_size},
      {"trial_name", nullptr},
      {"trial_params", nullptr},
  };
  io::write_file_atomic(path, j.dump(2) + "\n");
}

TrainerState read_trainer_state(const std::string& path) {
  const nlohmann::json j = io::read_json_file(path);
  if (!j.is_object()) fail(path, "expected a trainer state object, got " + std::string(j.type_name()));
  if (!j.contains("global_step")) fail(path, "no 'global_step'");
  TrainerState s;
  // Step counts index the data order and name checkpoint folders: whole numbers from 0 to kMaxStep.
  s.global_step = io::json_integer_field(j, "global_step", 0, path, 0, kMaxStep);
  s.max_steps = io::json_integer_field(j, "max_steps", 0, path, -1, kMaxStep);  // HF writes -1 for "by epochs"
  s.logging_steps = io::json_integer_field(j, "logging_steps", 500, path, 0, kMaxStep);
  s.eval_steps = io::json_integer_field(j, "eval_steps", 500, path, 0, kMaxStep);
  s.save_steps = io::json_integer_field(j, "save_steps", 500, path, 0, kMaxStep);
  s.train_batch_size = io::json_integer_field(j, "train_batch_size", 1, path, 0, kMaxStep);
  s.num_train_epochs = io::json_integer_field(j, "num_train_epochs", 1, path, 0, kMaxStep);
  try {
    s.epoch = j.value("epoch", 0.0);
    s.total_flos = j.value("total_flos", 0.0);
    s.log_history = j.value("log_history", nlohmann::json::array());
  } catch (const nlohmann::json::exception& e) {
    fail(path, "unexpected trainer state: " + io::json_error_text(e));
  }
  if (!s.log_history.is_array()) fail(path, "'log_history' must be a list");
  return s;
}

}  // namespace llava::checkpoint
