// Small file helpers: every input file is read through one bounded reader; nothing is ever written in place.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

namespace llava::io {

// What an input file is, which decides how large it may be. Every limit is far above any real file of
// that kind and far below what would exhaust memory: a hostile or mistaken path (a sparse 1 TB file,
// /dev/zero, a FIFO) is refused before one byte is read.
enum class InputKind {
  kConfig,          // JSON configs and metadata: config.json, tokenizer(_config).json, trainer_state.json,
                    // adapter_config.json, *.index.json, preprocessor_config.json, DeepSpeed JSON
  kYamlConfig,      // a training or data YAML config (io/yaml_config.h)
  kDataset,         // a LLaVA data file (JSON list or JSONL), parsed whole
  kTokenizerModel,  // sentencepiece tokenizer.model
  kImage,           // an encoded image (PNG, JPEG, ...); its decoded size is bounded in data/image.h
};

constexpr uint64_t kMaxConfigFileBytes = 128ull << 20;          // largest real: tokenizer.json, ~35 MB
constexpr uint64_t kMaxYamlConfigFileBytes = 4ull << 20;        // a training config is a few KiB
constexpr uint64_t kMaxDatasetFileBytes = 4ull << 30;           // LLaVA-Instruct-665k: 1 GB
constexpr uint64_t kMaxTokenizerModelFileBytes = 64ull << 20;   // a 256k-piece sentencepiece model: ~4 MB
constexpr uint64_t kMaxImageFileBytes = 256ull << 20;           // an 89.5 MP PNG, poorly compressed

uint64_t max_input_bytes(InputKind kind);
const char* input_kind_name(InputKind kind);  // "config file", "data file", ...

// Reads a whole input file. Refused with an Error naming the file, before anything is read: a path that
// is not a regular file (a directory, a FIFO, a device such as /dev/zero: opened without blocking), and a
// file larger than max_input_bytes(kind) (the message gives its size and the limit).
std::string read_input_file(const std::string& path, InputKind kind);

// Reads a whole regular file we wrote ourselves (tests, tools): read_input_file with the largest limit.
std::string read_file(const std::string& path);

// Writes `path` atomically: `fill` writes into `<path>.tmp.<pid>`, which is fsynced and renamed over
// `path`, then the directory is fsynced. On any failure the temp file is removed, `path` is untouched,
// and Error names the file and the system error.
void write_file_atomic(const std::string& path, const std::function<void(std::FILE*)>& fill);
void write_file_atomic(const std::string& path, const std::string& bytes);

// Whether `path` can become a file we write (checked before any work, so a mistaken path fails at once, not
// after hours of training): it must not exist as anything but a regular file (never replace a device, a FIFO
// or a directory: the atomic rename would), and its nearest existing ancestor must be a writable directory.
// Error names `what` (the option or key, e.g. "--metrics-out") and the path.
void check_output_file(const std::string& path, const std::string& what);
// The same for a directory we create and fill (output_dir): absent, or a writable directory.
void check_output_dir(const std::string& path, const std::string& what);

// fsync a directory (after renames inside it).
void fsync_dir(const std::string& dir);

}  // namespace llava::io
