// Small file helpers shared by every writer: nothing is ever written in place.
#pragma once
#include <functional>
#include <string>

namespace llava::io {

// Reads a whole file; Error names the file when it cannot be read.
std::string read_file(const std::string& path);

// Writes `path` atomically: `fill` writes into `<path>.tmp.<pid>`, which is fsynced and renamed over
// `path`, then the directory is fsynced. On any failure the temp file is removed, `path` is untouched,
// and Error names the file and the system error.
void write_file_atomic(const std::string& path, const std::function<void(std::FILE*)>& fill);
void write_file_atomic(const std::string& path, const std::string& bytes);

// fsync a directory (after renames inside it).
void fsync_dir(const std::string& dir);

}  // namespace llava::io
