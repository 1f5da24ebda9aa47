#include "io/file_util.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
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

void write_file_atomic(const std::string& path, const std::function<void(std::FILE*)>& fill) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  std::FILE* file = std::fopen(tmp.c_str(), "wb");
  if (!file) fail(path, std::string("cannot create file: ") + std::strerror(errno));
  auto give_up = [&](const std::string& why) {
    std::fclose(file);
    std::remove(tmp.c_str());
    fail(path, why);
  };
  try {
    fill(file);
  } catch (...) {
    std::fclose(file);
    std::remove(tmp.c_str());
    throw;
  }
  if (std::ferror(file) || std::fflush(file) != 0) give_up(std::string("write failed: ") + std::strerror(errno));
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
