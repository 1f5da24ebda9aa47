#include "checkpoint/checkpoint_dir.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <regex>

#include "io/error.h"
#include "io/file_util.h"

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
  std::vector<std::pair<long long, std::string>> found;
  if (!fs::is_directory(output_dir)) return {};
  for (auto& entry : fs::directory_iterator(output_dir)) {
    std::smatch m;
    const std::string name = entry.path().filename().string();
    if (entry.is_directory() && std::regex_match(name, m, pattern))
      found.emplace_back(std::stoll(m[1].str()), entry.path().string());
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
      {"total_flos", s.total_flos},
      {"train_batch_size", s.train_batch_size},
      {"trial_name", nullptr},
      {"trial_params", nullptr},
  };
  io::write_file_atomic(path, j.dump(2) + "\n");
}

TrainerState read_trainer_state(const std::string& path) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(io::read_file(path));
  } catch (const nlohmann::json::exception& e) {
    fail(path, std::string("not valid JSON: ") + e.what());
  }
  TrainerState s;
  try {
    s.epoch = j.value("epoch", 0.0);
    s.global_step = j.at("global_step").get<int64_t>();
    s.max_steps = j.value("max_steps", int64_t(0));
    s.logging_steps = j.value("logging_steps", int64_t(500));
    s.eval_steps = j.value("eval_steps", int64_t(500));
    s.save_steps = j.value("save_steps", int64_t(500));
    s.train_batch_size = j.value("train_batch_size", int64_t(1));
    s.num_train_epochs = j.value("num_train_epochs", int64_t(1));
    s.total_flos = j.value("total_flos", 0.0);
    s.log_history = j.value("log_history", nlohmann::json::array());
  } catch (const nlohmann::json::exception& e) {
    fail(path, std::string("unexpected trainer state: ") + e.what());
  }
  return s;
}

}  // namespace llava::checkpoint
