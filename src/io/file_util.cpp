#include "io/file_util.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
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
// they fail with ENOSPC, as on a full disk. Every file we write goes through here (one file at a time:
// the checkpoint writer thread writes while the main thread writes none).
struct WriteFault {
  bool enabled = false;
  std::atomic<uint64_t> bytes_left{0};
};

WriteFault& write_fault() {
  static WriteFault fault;
  static const bool once = [] {
    if (const char* env = std::getenv("LLAVA_FAULT_WRITE_AFTER_BYTES"); env && *env) {
      fault.enabled = true;
      fault.bytes_left = std::strtoull(env, nullptr, 10);
    }
    return true;
  }();
  (void)once;
  return fault;
}

// Where `fill`'s stream ends up: write(2) on the temp file. Every kWritebackChunk bytes it starts the
// kernel's writeback of what was just written (sync_file_range, which does not wait), so the disk works
// while we go on filling the page cache and the final fsync finds most of the file written; without it
// the dirty pages wait for the fsync (or for the kernel's dirty limits to throttle the writer), and the
// copying and the disk take turns instead of overlapping.
constexpr uint64_t kWritebackChunk = 16ull << 20;

struct FileSink {
  int fd = -1;
  uint64_t written = 0;         // bytes in the file so far
  uint64_t writeback_from = 0;  // bytes before this offset have had their writeback started
};

// Starts writeback of what was written since the last call once that is at least kWritebackChunk.
void start_writeback(FileSink& sink) {
  if (sink.written - sink.writeback_from < kWritebackChunk) return;
  ::sync_file_range(sink.fd, static_cast<off64_t>(sink.writeback_from),
                    static_cast<off64_t>(sink.written - sink.writeback_from), SYNC_FILE_RANGE_WRITE);
  sink.writeback_from = sink.written;
}

ssize_t sink_write(void* cookie, const char* data, size_t n) {
  auto& sink = *static_cast<FileSink*>(cookie);
  WriteFault& fault = write_fault();
  const size_t allowed = fault.enabled ? static_cast<size_t>(std::min<uint64_t>(n, fault.bytes_left.load())) : n;
  size_t done = 0;
  while (done < allowed) {  // in chunks, so a large tensor's first part is on its way to disk early
    const ssize_t w = ::write(sink.fd, data + done, std::min<size_t>(allowed - done, kWritebackChunk));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) break;  // errno says why
    done += static_cast<size_t>(w);
    sink.written += static_cast<uint64_t>(w);
    start_writeback(sink);
  }
  if (fault.enabled) fault.bytes_left -= done;
  if (done == n) return static_cast<ssize_t>(n);
  if (done == allowed) errno = ENOSPC;  // the injected budget ran out; else write(2)'s own errno
  return done ? static_cast<ssize_t>(done) : -1;
}

}  // namespace

void write_file_atomic(const std::string& path, const std::function<void(std::FILE*)>& fill) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  FileSink sink;
  sink.fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (sink.fd < 0) fail(path, std::string("cannot create file: ") + std::strerror(errno));
  cookie_io_functions_t io{nullptr, sink_write, nullptr, nullptr};
  std::FILE* stream = ::fopencookie(&sink, "w", io);
  if (!stream) {
    const int err = errno;
    ::close(sink.fd);
    std::remove(tmp.c_str());
    fail(path, std::string("cannot create file: ") + std::strerror(err));
  }
  std::setvbuf(stream, nullptr, _IOFBF, 1 << 20);  // small records (headers, JSON) go out in large writes
  auto give_up = [&](const std::string& why) {
    if (stream) std::fclose(stream);
    ::close(sink.fd);
    std::remove(tmp.c_str());
    fail(path, why);
  };
  try {
    fill(stream);
  } catch (...) {
    std::fclose(stream);
    ::close(sink.fd);
    std::remove(tmp.c_str());
    throw;
  }
  errno = 0;
  const bool flushed = std::fflush(stream) == 0 && !std::ferror(stream);
  const int flush_errno = errno ? errno : EIO;
  std::fclose(stream);  // the cookie stream only: the file descriptor stays open
  stream = nullptr;
  if (!flushed) give_up(std::string("write failed: ") + std::strerror(flush_errno));
  if (::fsync(sink.fd) != 0) give_up(std::string("fsync failed: ") + std::strerror(errno));
  if (::close(sink.fd) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    fail(path, std::string("close failed: ") + std::strerror(err));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
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
