#include "io/file_util.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "io/error.h"

namespace llava::io {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, std::string("cannot open for reading: ") + std::strerror(errno));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) fail(path, "read error");
  return buffer.str();
}

void fsync_dir(const std::string& dir) {
  int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;  // best effort: some filesystems do not allow opening directories
  ::fsync(fd);
  ::close(fd);
}

namespace {

// Disk-full injection for the reliability tests: with LLAVA_FAULT_WRITE_AFTER_BYTES=N in the environment
// (read once), the writes of this process through write_file_atomic share a budget of N bytes; past it
// they fail with ENOSPC, as on a full disk. Every file we write goes through here.
struct WriteFault {
  bool enabled = false;
  uint64_t bytes_left = 0;
};

WriteFault& write_fault() {
  static WriteFault fault = [] {
    WriteFault f;
    if (const char* env = std::getenv("LLAVA_FAULT_WRITE_AFTER_BYTES"); env && *env) {
      f.enabled = true;
      f.bytes_left = std::strtoull(env, nullptr, 10);
    }
    return f;
  }();
  return fault;
}

ssize_t write_within_budget(void* real_file, const char* data, size_t n) {
  uint64_t& left = write_fault().bytes_left;
  const size_t allowed = static_cast<size_t>(std::min<uint64_t>(n, left));
  const size_t written = allowed ? std::fwrite(data, 1, allowed, static_cast<std::FILE*>(real_file)) : 0;
  left -= written;
  if (written == n) return static_cast<ssize_t>(n);
  if (written == allowed) errno = ENOSPC;  // else fwrite's own errno
  return written ? static_cast<ssize_t>(written) : -1;
}

// The stream `fill` writes to: `file` itself, or a stream over it that runs out of space when injected.
std::FILE* writable_stream(std::FILE* file) {
  if (!write_fault().enabled) return file;
  cookie_io_functions_t io{nullptr, write_within_budget, nullptr, nullptr};
  std::FILE* stream = ::fopencookie(file, "w", io);
  return stream ? stream : file;
}

// Flushes `stream` (and `file` under it); 0 or the errno of the first failure.
int flush_error(std::FILE* stream, std::FILE* file) {
  for (std::FILE* f : {stream, file}) {
    errno = 0;
    if (std::fflush(f) != 0 || std::ferror(f)) return errno ? errno : EIO;
  }
  return 0;
}

}  // namespace

void write_file_atomic(const std::string& path, const std::function<void(std::FILE*)>& fill) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  std::FILE* file = std::fopen(tmp.c_str(), "wb");
  if (!file) fail(path, std::string("cannot create file: ") + std::strerror(errno));
  std::FILE* stream = writable_stream(file);
  auto close_all = [&] {
    if (stream != file) std::fclose(stream);  // the injection's stream only: it does not close `file`
    std::fclose(file);
  };
  auto give_up = [&](const std::string& why) {
    close_all();
    std::remove(tmp.c_str());
    fail(path, why);
  };
  try {
    fill(stream);
  } catch (...) {
    close_all();
    std::remove(tmp.c_str());
    throw;
  }
  if (int err = flush_error(stream, file)) give_up(std::string("write failed: ") + std::strerror(err));
  if (stream != file) std::fclose(stream);
  stream = file;
  if (::fsync(::fileno(file)) != 0) give_up(std::string("fsync failed: ") + std::strerror(errno));
  if (std::fclose(file) != 0) {
    std::remove(tmp.c_str());
    fail(path, std::string("close failed: ") + std::strerror(errno));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    std::remove(tmp.c_str());
    fail(path, std::string("rename failed: ") + std::strerror(err));
  }
  fsync_dir(std::filesystem::path(path).parent_path().string());
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  write_file_atomic(path, [&](std::FILE* f) {
    if (!bytes.empty() && std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size())
      fail(path, std::string("write failed: ") + std::strerror(errno));
  });
}

}  // namespace llava::io
