#include "io/file_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>

#include "io/error.h"

namespace llava::io {

uint64_t max_input_bytes(InputKind kind) {
  switch (kind) {
    case InputKind::kConfig: return kMaxConfigFileBytes;
    case InputKind::kYamlConfig: return kMaxYamlConfigFileBytes;
    case InputKind::kDataset: return kMaxDatasetFileBytes;
    case InputKind::kTokenizerModel: return kMaxTokenizerModelFileBytes;
    case InputKind::kImage: return kMaxImageFileBytes;
  }
  return kMaxConfigFileBytes;
}

const char* input_kind_name(InputKind kind) {
  switch (kind) {
    case InputKind::kConfig: return "config file";
    case InputKind::kYamlConfig: return "YAML config file";
    case InputKind::kDataset: return "data file";
    case InputKind::kTokenizerModel: return "tokenizer model";
    case InputKind::kImage: return "image file";
  }
  return "file";
}

namespace {

const char* file_type_name(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

struct FdCloser {
  int fd;
  ~FdCloser() { ::close(fd); }
};

std::string read_bounded(const std::string& path, uint64_t limit, const char* kind_name) {
  // O_NONBLOCK: opening a FIFO with no writer would otherwise wait forever; fstat then refuses it.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) fail(path, std::string("cannot open for reading: ") + std::strerror(errno));
  FdCloser closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) fail(path, std::string("cannot stat: ") + std::strerror(errno));
  if (!S_ISREG(st.st_mode))
    fail(path, std::string("is ") + file_type_name(st.st_mode) + ", expected a regular " + kind_name);
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size > limit)
    fail(path, std::string("is ") + std::to_string(size) + " bytes, more than the limit of " + std::to_string(limit) +
                   " bytes for a " + kind_name);
  std::string bytes(size, '\0');
  uint64_t done = 0;
  while (done < size) {  // a file that shrinks meanwhile gives what is there; one that grows, its first `size`
    const ssize_t got = ::read(fd, bytes.data() + done, std::min<uint64_t>(size - done, 1u << 30));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) fail(path, std::string("read failed: ") + std::strerror(errno));
    if (got == 0) break;
    done += static_cast<uint64_t>(got);
  }
  bytes.resize(done);
  return bytes;
}

}  // namespace

std::string read_input_file(const std::string& path, InputKind kind) {
  return read_bounded(path, max_input_bytes(kind), input_kind_name(kind));
}

std::string read_file(const std::string& path) { return read_bounded(path, kMaxDatasetFileBytes, "file"); }

void fsync_dir(const std::string& dir) {
  int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;  // best effort: some filesystems do not allow opening directories
  ::fsync(fd);
  ::close(fd);
}

namespace {

// Test hooks, read once from the environment:
// - LLAVA_FAULT_WRITE_AFTER_BYTES=N: disk-full injection for the reliability tests. The writes of this
//   process through write_file_atomic share a budget of N bytes; past it they fail with ENOSPC, as on a
//   full disk. Every file we write goes through here (one at a time).
// - LLAVA_WRITE_LOG=FILE: each file write_file_atomic commits is appended to FILE, one path a line, so a
//   test knows the order of a save's files without relying on timestamps (files written within one clock
//   tick share an mtime).
struct WriteHooks {
  bool fault_enabled = false;
  std::atomic<uint64_t> bytes_left{0};
  std::string log_path;
};

WriteHooks& write_hooks() {
  static WriteHooks hooks;
  static const bool once = [] {
    if (const char* env = std::getenv("LLAVA_FAULT_WRITE_AFTER_BYTES"); env && *env) {
      hooks.fault_enabled = true;
      hooks.bytes_left = std::strtoull(env, nullptr, 10);
    }
    if (const char* env = std::getenv("LLAVA_WRITE_LOG"); env && *env) hooks.log_path = env;
    return true;
  }();
  (void)once;
  return hooks;
}

void log_committed(const std::string& path) {
  const std::string& log = write_hooks().log_path;
  if (log.empty()) return;
  if (std::FILE* f = std::fopen(log.c_str(), "a")) {
    std::fprintf(f, "%s\n", path.c_str());
    std::fclose(f);
  }
}

// Where `fill`'s stream ends up. The bytes collect in one aligned kChunk buffer that goes to the temp file
// a whole chunk at a time with O_DIRECT (as `dd oflag=direct` and DeepSpeed's FastPersist write): a
// checkpoint's gigabytes go straight to the disk instead of through the page cache, whose writeback
// otherwise trails far behind the copying and leaves the final fsync waiting for most of the file. The
// tail that is not a whole number of blocks is written after O_DIRECT is cleared. Where the filesystem
// refuses O_DIRECT (tmpfs, some FUSE), the chunks go through the page cache and each one's writeback is
// started right away (sync_file_range, which does not wait), so the disk still works while we copy.
constexpr size_t kChunk = 16u << 20;
constexpr size_t kBlock = 4096;  // O_DIRECT alignment of memory, offsets and sizes

struct FileSink {
  int fd = -1;
  bool direct = false;
  uint64_t written = 0;  // bytes in the file so far
  std::unique_ptr<char, decltype(&std::free)> buffer{nullptr, &std::free};
  size_t used = 0;  // bytes waiting in buffer
  int error = 0;    // errno of the first failed write: the stream only keeps an error flag
};

bool set_direct(int fd, bool on) {
  const int flags = ::fcntl(fd, F_GETFL);
  return flags >= 0 && ::fcntl(fd, F_SETFL, on ? (flags | O_DIRECT) : (flags & ~O_DIRECT)) == 0;
}

// Writes buffer[0, n) at the end of the file; false with errno set on failure.
bool write_out(FileSink& sink, size_t n) {
  const char* data = sink.buffer.get();
  const uint64_t start = sink.written;
  size_t done = 0;
  while (done < n) {
    const ssize_t w = ::write(sink.fd, data + done, n - done);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EINVAL && sink.direct && set_direct(sink.fd, false)) {
      sink.direct = false;  // O_DIRECT refused (or a short write left us unaligned): the page cache it is
      continue;
    }
    if (w <= 0) {
      if (w == 0) errno = EIO;
      return false;
    }
    done += static_cast<size_t>(w);
    sink.written += static_cast<uint64_t>(w);
  }
  if (!sink.direct) ::sync_file_range(sink.fd, static_cast<off64_t>(start), static_cast<off64_t>(n), SYNC_FILE_RANGE_WRITE);
  return true;
}

// Writes what is left in the buffer: the whole blocks directly, the rest through the page cache.
bool write_rest(FileSink& sink) {
  const size_t whole = sink.direct ? sink.used / kBlock * kBlock : 0;
  if (whole > 0 && !write_out(sink, whole)) return false;
  if (sink.used == whole) return true;
  if (sink.direct && !set_direct(sink.fd, false)) return false;
  sink.direct = false;
  std::memmove(sink.buffer.get(), sink.buffer.get() + whole, sink.used - whole);
  sink.used -= whole;
  const bool ok = write_out(sink, sink.used);
  sink.used = 0;
  return ok;
}

ssize_t sink_write(void* cookie, const char* data, size_t n) {
  auto& sink = *static_cast<FileSink*>(cookie);
  WriteHooks& hooks = write_hooks();
  const size_t allowed = hooks.fault_enabled ? static_cast<size_t>(std::min<uint64_t>(n, hooks.bytes_left.load())) : n;
  if (allowed > 0 && !sink.buffer) {
    void* buffer = nullptr;
    if (::posix_memalign(&buffer, kBlock, kChunk) != 0) {
      errno = sink.error = ENOMEM;
      return -1;
    }
    sink.buffer.reset(static_cast<char*>(buffer));
  }
  size_t done = 0;
  while (done < allowed) {
    const size_t take = std::min(allowed - done, kChunk - sink.used);
    std::memcpy(sink.buffer.get() + sink.used, data + done, take);
    sink.used += take;
    done += take;
    if (sink.used == kChunk) {
      if (!write_out(sink, kChunk)) {
        sink.error = errno;
        return -1;
      }
      sink.used = 0;
    }
  }
  if (hooks.fault_enabled) hooks.bytes_left -= done;
  if (done == n) return static_cast<ssize_t>(n);
  errno = sink.error = ENOSPC;  // the injected budget ran out
  return done ? static_cast<ssize_t>(done) : -1;
}

// Opens the temp file with O_DIRECT where the filesystem allows it.
int open_for_writing(const std::string& tmp, bool& direct) {
  const int flags = O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC;
  int fd = ::open(tmp.c_str(), flags | O_DIRECT, 0644);
  direct = fd >= 0;
  if (fd < 0 && errno == EINVAL) fd = ::open(tmp.c_str(), flags, 0644);
  return fd;
}

}  // namespace

namespace {

// The nearest ancestor of `path` that exists ("." for a relative path with none): it must be a writable
// directory for anything to be created below it.
void check_creatable_below(const std::filesystem::path& path, const std::string& what) {
  std::filesystem::path ancestor = path.parent_path();
  std::error_code ec;
  while (!ancestor.empty() && !std::filesystem::exists(ancestor, ec)) ancestor = ancestor.parent_path();
  if (ancestor.empty()) ancestor = ".";
  if (!std::filesystem::is_directory(ancestor, ec))
    fail(what, "'" + path.string() + "': cannot be created, '" + ancestor.string() + "' is not a directory");
  if (::access(ancestor.c_str(), W_OK | X_OK) != 0)
    fail(what, "'" + path.string() + "': cannot be created, directory '" + ancestor.string() + "' is not writable");
}

}  // namespace

void check_output_file(const std::string& path, const std::string& what) {
  if (path.empty()) fail(what, "expected a file name, got ''");
  const std::string subject = what == path ? "" : "'" + path + "' ";  // the error line names the path once
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return check_creatable_below(std::filesystem::path(path), what);
  if (!S_ISREG(st.st_mode))
    fail(what, subject + "exists and is not a regular file (" +
                   (S_ISDIR(st.st_mode) ? "a directory" : "a device, FIFO or socket") + "): refusing to replace it");
  // Replaced by a rename: its directory must be writable, not the file.
  const auto dir = std::filesystem::path(path).parent_path();
  const std::string dir_name = dir.empty() ? "." : dir.string();
  if (::access(dir_name.c_str(), W_OK | X_OK) != 0) fail(what, subject + "cannot be replaced: directory '" + dir_name + "' is not writable");
}

void check_output_dir(const std::string& path, const std::string& what) {
  if (path.empty()) fail(what, "expected a directory name, got ''");
  std::error_code ec;
  if (std::filesystem::exists(path, ec)) {
    if (!std::filesystem::is_directory(path, ec)) fail(what, "'" + path + "' exists and is not a directory");
    if (::access(path.c_str(), W_OK | X_OK) != 0) fail(what, "'" + path + "' is not writable");
    return;
  }
  check_creatable_below(std::filesystem::path(path), what);
}

void write_file_atomic(const std::string& path, const std::function<void(std::FILE*)>& fill) {
  check_output_file(path, path);
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  FileSink sink;
  sink.fd = open_for_writing(tmp, sink.direct);
  if (sink.fd < 0) fail(path, std::string("cannot create file: ") + std::strerror(errno));
  cookie_io_functions_t io{nullptr, sink_write, nullptr, nullptr};
  std::FILE* stream = ::fopencookie(&sink, "w", io);
  if (!stream) {
    const int err = errno;
    ::close(sink.fd);
    std::remove(tmp.c_str());
    fail(path, std::string("cannot create file: ") + std::strerror(err));
  }
  std::setvbuf(stream, nullptr, _IONBF, 0);  // the sink buffers: one copy of each byte, not two
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
  bool flushed = std::fflush(stream) == 0 && !std::ferror(stream);
  if (flushed) flushed = write_rest(sink);
  const int flush_errno = sink.error ? sink.error : errno ? errno : EIO;
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
  log_committed(path);
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  write_file_atomic(path, [&](std::FILE* f) {
    if (!bytes.empty() && std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size())
      fail(path, std::string("write failed: ") + std::strerror(errno));
  });
}

}  // namespace llava::io
