// The HF Trainer's `output_dir/checkpoint-<global_step>/` folders, written so that a crash never leaves a
// half checkpoint behind a valid name: files go into `output_dir/.checkpoint-<step>.partial`, every file
// and the folder are fsynced, then the folder is renamed to `checkpoint-<step>` and output_dir is fsynced.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace llava::checkpoint {

// The largest step count a checkpoint may name (global_step in trainer_state.json, N in checkpoint-N):
// 2^53, the last integer every JSON reader (Python's float, JavaScript) holds exactly, and far beyond
// any run. Larger or negative steps from a file are an Error naming it.
constexpr int64_t kMaxStep = int64_t(1) << 53;

class PendingCheckpoint {
 public:
  // Starts `output_dir/.checkpoint-<step>.partial` (removing a stale one from an earlier crash).
  PendingCheckpoint(const std::string& output_dir, int64_t step);
  ~PendingCheckpoint();  // an uncommitted partial folder is removed
  PendingCheckpoint(const PendingCheckpoint&) = delete;
  PendingCheckpoint& operator=(const PendingCheckpoint&) = delete;

  const std::string& dir() const { return partial_; }  // write the checkpoint's files here
  // fsync + rename to checkpoint-<step> (replacing an existing one of that step). Returns the final path.
  std::string commit();

 private:
  std::string output_dir_, partial_, final_;
  bool committed_ = false;
};

// Complete checkpoint-N folders of `output_dir`, oldest (smallest N) first. A folder whose N is above
// kMaxStep is an Error naming it (it cannot be ordered against the others; renaming it is the user's call).
std::vector<std::string> complete_checkpoints(const std::string& output_dir);

// The newest complete checkpoint (largest N, as transformers' get_last_checkpoint), if any.
std::optional<std::string> latest_checkpoint(const std::string& output_dir);

// save_total_limit: removes the oldest complete checkpoints beyond `limit` (0 = keep all); the newest is
// always kept. Returns the removed folders.
std::vector<std::string> rotate_checkpoints(const std::string& output_dir, int64_t limit);

// trainer_state.json as TrainerState.save_to_json writes it (indent 2, sorted keys), with the fields of
// transformers >= 4.41 (stateful_callbacks: HF Trainer 5 fails at its next save without it). transformers
// 4.37 (LLaVA's pin) rejects that key, as it rejects the files every transformers since 4.41 writes.
struct TrainerState {
  double epoch = 0;
  int64_t global_step = 0;
  int64_t max_steps = 0;
  int64_t logging_steps = 500, eval_steps = 500, save_steps = 500;
  int64_t train_batch_size = 1;
  int64_t num_train_epochs = 1;
  double total_flos = 0;
  nlohmann::json log_history = nlohmann::json::array();
};
void write_trainer_state(const std::string& path, const TrainerState& state);
TrainerState read_trainer_state(const std::string& path);

}  // namespace llava::checkpoint
